"""Upload broker: authenticated Cloudflare Images direct uploads for an app's end users."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from flask import Flask
from flask.sansio.scaffold import find_package
from werkzeug.middleware.proxy_fix import ProxyFix

from broker.platform.config import DEFAULTS, DEV_EMULATOR_FILE, finalize, settings_of
from broker.platform.config import init_app as read_settings

_PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(name: str) -> str:
    """Find `templates`/`static`: in the package when installed, else at the repo's top level."""
    shipped = _PACKAGE_DIR / name
    return str(shipped if shipped.is_dir() else _PACKAGE_DIR.parent / name)


class BrokerFlask(Flask):
    """Flask, minus a per-request cost: whether a hook or view is a coroutine is asked once."""

    _sync: dict[Any, Any]

    def ensure_sync(self, func: Any) -> Any:
        """Return `func` ready to call synchronously (Flask's answer, remembered per function)."""
        try:
            cache = self._sync
        except AttributeError:
            cache = self._sync = {}
        ready = cache.get(func)
        if ready is None:
            ready = cache[func] = super().ensure_sync(func)
        return ready


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the broker app: config, extensions, blueprints, CLI. Reads the environment only
    when no `test_config` is given."""
    if test_config is None:
        instance_path = os.environ.get("BROKER_INSTANCE_PATH") or None
    else:
        instance_path = test_config.get("INSTANCE_PATH")
    app = BrokerFlask(
        __name__,
        instance_path=instance_path,
        instance_relative_config=True,
        template_folder=_resource_dir("templates"),
        static_folder=_resource_dir("static"),
    )
    app.config.from_mapping(DEFAULTS)
    if test_config is None:
        app.config.from_pyfile("config.py", silent=True)
        app.config.from_prefixed_env("BROKER")
        if app.config["ENV"] == "development" and not app.config.get("CLOUDFLARE_ACCOUNT_ID"):
            app.config.from_file(DEV_EMULATOR_FILE, load=json.load, silent=True)
    else:
        app.config.from_mapping(test_config)
    Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    sqlite_in_install = not app.config.get("DATABASE_URL") and _instance_in_install(instance_path)
    finalize(app.config, app.instance_path)
    read_settings(app)  # once: everything after this reads the typed settings
    settings = settings_of(app)
    from broker.uploads.profiles import profiles_of

    profiles_of(settings)  # the profiles file is checked at start: every problem at once
    if settings.proxy_count:
        # Trust exactly that many proxies' forwarding headers; never a client's own.
        hops = settings.proxy_count
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]

    from broker.platform import (
        cors,
        db,
        encryption,
        errors,
        extensions,
        headers,
        health,
        json_input,
        logs,
        outages,
        routing,
    )

    logs.init_app(app)
    json_input.init_app(app)
    routing.init_app(app)
    if settings.env == "production" and settings.ratelimit_storage_uri == "memory://":
        logging.getLogger("broker").warning(
            "BROKER_RATELIMIT_STORAGE_URI is memory://: each process counts login attempts on "
            "its own; use redis:// when more than one process serves requests"
        )
    if sqlite_in_install:
        logging.getLogger("broker").warning(
            "the SQLite database is in %s, inside the Python environment the broker is "
            "installed in: a new virtualenv loses it; set BROKER_INSTANCE_PATH (or "
            "BROKER_DATABASE_URL)",
            app.instance_path,
        )
    _import_models()
    db.init_app(app)
    encryption.init_app(app)
    errors.init_app(app)
    outages.init_app(app)  # before extensions: the limiter reads its fallback settings
    extensions.init_app(app)
    headers.init_app(app)
    cors.init_app(app)  # before auth: a preflight carries no credentials to check

    from broker import auth
    from broker.images import keys, variants
    from broker.upstream import batch, budget, cloudflare

    auth.init_app(app)
    budget.init_app(app)
    batch.init_app(app)
    cloudflare.init_app(app)
    keys.init_app(app)
    variants.init_app(app)

    from broker import api, cli, operations, web, worker
    from broker.images import redirect
    from broker.reconcile import usage
    from broker.uploads import cloudflare_hook, queries, warmup
    from broker.webhooks import endpoints

    _import_api_routes()
    app.register_blueprint(health.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(web.bp)
    app.register_blueprint(redirect.bp)
    cloudflare_hook.init_app(app)
    for collect in (
        queries.metric_lines,
        endpoints.metric_lines,
        budget.metric_lines,
        batch.metric_lines,
        operations.metric_lines,
        usage.metric_lines,
    ):
        health.register_metrics(app, collect)
    cli.init_app(app)
    worker.init_app(app)
    # Called by gunicorn.conf.py's post_worker_init, before a web process takes requests.
    app.extensions["warm_up"] = functools.partial(warmup.warm_up, app)
    # Called by gunicorn.conf.py in the master, which loads the app before forking.
    app.extensions["release_connections"] = functools.partial(_release_connections, app)
    return app


def _release_connections(app: Flask) -> None:
    """Close every database, Redis and Cloudflare connection of `app` (a process about to fork
    must hand none of them to its children: two processes on one connection corrupt each
    other)."""
    from broker.platform.db import db

    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()
    app.extensions["budget"].engine.dispose()
    app.extensions["tokens"].close()  # the version stamp's connection, Redis's
    app.extensions["cloudflare"].close()  # its pools; each process builds its own on first use


def _instance_in_install(instance_path: str | None) -> bool:
    """Whether the instance folder is Flask's default for an installed package,
    `<prefix>/var/broker-instance` (a checkout's is `instance/` beside the code)."""
    return instance_path is None and find_package(__name__)[0] is not None


def _import_models() -> None:
    """Register every feature's tables on the one metadata (migrations and tests read it)."""
    from broker import operations as _operations  # noqa: F401  (worker_heartbeats)
    from broker.api import models as _api  # noqa: F401
    from broker.audit import models as _audit  # noqa: F401
    from broker.auth import models as _auth  # noqa: F401
    from broker.erasure import models as _erasure  # noqa: F401
    from broker.images import models as _images  # noqa: F401
    from broker.reconcile import models as _reconcile  # noqa: F401
    from broker.uploads import models as _uploads  # noqa: F401
    from broker.upstream import models as _upstream  # noqa: F401
    from broker.webhooks import models as _webhooks  # noqa: F401


def _import_api_routes() -> None:
    """Attach each feature's /api/v1 routes to the API blueprint before it is registered."""
    from broker.audit import api as _audit  # noqa: F401
    from broker.auth import api as _auth  # noqa: F401
    from broker.erasure import api as _erasure  # noqa: F401
    from broker.images import api as _images  # noqa: F401
    from broker.uploads import api as _uploads  # noqa: F401
    from broker.webhooks import api as _webhooks  # noqa: F401
