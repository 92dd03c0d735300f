"""A local Cloudflare Images: REST API, direct-upload URLs and delivery with variants, one port."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from flask import Flask

DEFAULTS: dict[str, Any] = {
    "DATA_DIR": "instance/emulator",
    "ACCOUNT_ID": "emulator-account",
    "API_TOKEN": "emulator-token",
    # Real account hashes are 22 URL-safe characters.
    "ACCOUNT_HASH": "emuhash000000000000000",
    # Empty: links use the host the request came to (right for any port); set it when clients
    # must see another address than the API caller does.
    "PUBLIC_URL": "",
    "NOTIFY_URL": None,
    "NOTIFY_SECRET": None,
    "NOTIFY_TIMEOUT": 5.0,
    "RATE_LIMIT": 1200,
    "RATE_WINDOW": 300,
    # Batch tokens (the batch host is served under /batch on this port).
    "BATCH_TOKEN_TTL": 3600,
    "BATCH_RATE_LIMIT": 200,
    "CONTROL_ENABLED": False,
    # Empty: the controls answer loopback clients only. Set: any client sending it as a bearer.
    "CONTROL_TOKEN": "",
    "CLOCK": None,
    "IMAGES_ALLOWED": 100_000,
    # Multipart overhead on top of the 10 MB file limit; beyond this werkzeug answers 413 itself.
    "MAX_CONTENT_LENGTH": 12 * 1024 * 1024,
}


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the emulator app; read `EMULATOR_*` variables only when `config` is None."""
    from broker.emulator import api, control, delivery, upload
    from broker.emulator.control import utc_now
    from broker.emulator.core import BATCH_BLUEPRINT, BATCH_PREFIX, Emulator, install

    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(DEFAULTS)
    if config is None:
        app.config.from_prefixed_env("EMULATOR")
    else:
        app.config.from_mapping(config)
    clock: Callable[[], datetime] = app.config["CLOCK"] or utc_now
    install(app, Emulator(app.config, clock))
    app.register_blueprint(api.bp)
    # The batch host (batch.imagedelivery.net) serves the same views under /batch/images.
    app.register_blueprint(api.bp, name=BATCH_BLUEPRINT, url_prefix=f"{BATCH_PREFIX}/images")
    app.register_blueprint(upload.bp)
    app.register_blueprint(control.bp)
    # Last: its catch-all `/<hash>/<id>/<variant>` must not shadow the other prefixes.
    app.register_blueprint(delivery.bp)
    return app
