"""`make run`: the embedded default — emulator, broker and inline worker in one process.

Development only. With no Cloudflare account configured it starts the local Cloudflare Images
emulator on its own port (so the browser's upload is cross-origin, as in production) and points
the broker at it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sys
import threading
from pathlib import Path

from flask import Flask
from werkzeug.serving import make_server

from broker.auth.demo import ensure_demo_user
from broker.images import keys, variants
from broker.platform.config import DEV_EMULATOR_FILE, ConfigError
from broker.platform.db import db
from broker.upstream import batch
from broker.upstream.cloudflare import UpstreamError, get_client

log = logging.getLogger("broker.devserver")

HOST = "127.0.0.1"
BROKER_PORT = int(os.environ.get("BROKER_PORT", "5000"))
EMULATOR_PORT = int(os.environ.get("EMULATOR_PORT", "8788"))


def _start_emulator(instance_path: Path) -> str | None:
    """Start the emulator in a thread when no real account is configured; return its base URL."""
    if os.environ.get("BROKER_CLOUDFLARE_ACCOUNT_ID"):
        return None
    try:
        from broker.emulator import create_app as create_emulator
    except ImportError:  # the emulator is optional in a trimmed install
        log.warning("no Cloudflare account configured and no emulator available")
        return None
    base = f"http://{HOST}:{EMULATOR_PORT}"
    # The emulator notifies the broker of finished uploads, as Cloudflare's webhook would.
    notify_secret = os.environ.setdefault(
        "BROKER_CLOUDFLARE_WEBHOOK_SECRET", secrets.token_urlsafe(24)
    )
    emulator = create_emulator(
        {
            "DATA_DIR": str(instance_path / "emulator"),
            "PUBLIC_URL": base,
            "ACCOUNT_ID": "emulator-account",
            "API_TOKEN": "emulator-token",
            "CONTROL_ENABLED": True,
            "NOTIFY_URL": f"http://{HOST}:{BROKER_PORT}/hooks/cloudflare",
            "NOTIFY_SECRET": notify_secret,
        }
    )
    server = make_server(HOST, EMULATOR_PORT, emulator, threaded=True)
    threading.Thread(target=server.serve_forever, name="emulator", daemon=True).start()
    settings = {
        "CLOUDFLARE_API_BASE": f"{base}/client/v4",
        "CLOUDFLARE_ACCOUNT_ID": "emulator-account",
        "CLOUDFLARE_API_TOKEN": "emulator-token",
        "CLOUDFLARE_ACCOUNT_HASH": emulator.config["ACCOUNT_HASH"],
        "CLOUDFLARE_DELIVERY_BASE": base,
        "CLOUDFLARE_UPLOAD_ORIGIN": base,
        "CLOUDFLARE_BATCH_BASE": f"{base}/batch",
    }
    for key, value in settings.items():
        os.environ.setdefault(f"BROKER_{key}", value)
    # `flask --app broker …` commands run beside `make run` read this (development only), so
    # `keys sync`, `variants sync` or `worker --once` reach the same emulator.
    (instance_path / DEV_EMULATOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return base


def forget_emulator_batch_token(app: Flask) -> None:
    """Drop the batch token a previous run stored: the emulator just started keeps its tokens
    in memory only, so it would refuse that one and send the batch endpoints to the global API
    for the cool-down. The first batch call fetches a token from this emulator instead."""
    route = app.extensions.get(batch.EXTENSION_KEY)
    if route is not None:
        route.forget_token()


def prepare_upstream() -> list[str]:
    """Create or update the declared variants and mirror the signing keys (dev server start);
    return banner lines. Failures are reported, not raised: the pages still work without."""
    client = get_client()
    try:
        done = variants.sync_variants(client, variants.declared_variants())
        synced = keys.sync_keys(db.session, client)
        db.session.commit()
    except UpstreamError as exc:
        db.session.rollback()
        return [f"Variants/signing keys not synced ({exc}); run `flask variants sync`."]
    names = ", ".join(d.name for d in done) or "none"
    signer = keys.active_key(db.session)
    key = f"signing key {signer.name}" if signer else "no signing key"
    return [f"Variants: {names}; {key} ({len(synced.added)} new)."]


def _prepare(app: Flask) -> list[str]:
    """Get the app ready for a demo (variants, keys, worker thread); return lines to print."""
    lines = prepare_upstream()
    if app.config.get("WORKER_INLINE"):
        from broker.worker import ensure_inline

        ensure_inline(app)  # now rather than with the first request; that one finds it running
        lines.append("Worker: inline thread (completion checks, webhooks, key sync)")
    return lines


def main() -> int:
    """Start the emulator (if needed), the broker and its inline worker; serve until Ctrl-C."""
    from broker import create_app

    # The broker logs one line per request itself; werkzeug's access line would repeat it.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if os.environ.get("BROKER_ENV", "development") != "development":
        print("make run is the development server; use gunicorn in production", file=sys.stderr)
        return 2
    instance = Path(os.environ.get("BROKER_INSTANCE_PATH") or Path.cwd() / "instance").resolve()
    instance.mkdir(parents=True, exist_ok=True)
    os.environ["BROKER_INSTANCE_PATH"] = str(instance)
    try:
        emulator_url = _start_emulator(instance)
        app = create_app()
        # Bound before anything is printed: a port in use is said plainly, not as a traceback.
        server = make_server(HOST, BROKER_PORT, app, threaded=True)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"cannot listen on {HOST} ({exc.strerror}); choose free ports with"
            " `BROKER_PORT=… EMULATOR_PORT=… make run`",
            file=sys.stderr,
        )
        return 2
    url = f"http://{HOST}:{BROKER_PORT}"
    print(f"\n  Upload broker: {url}", flush=True)
    if emulator_url:
        print(f"  Cloudflare Images emulator: {emulator_url}", flush=True)
    with app.app_context():
        # The login first, so that nothing failing after it can hide it.
        for line in ensure_demo_user(app):
            print(f"  {line}", flush=True)
        db.session.commit()
        if emulator_url:
            forget_emulator_batch_token(app)
        for line in _prepare(app):
            print(f"  {line}", flush=True)
    print("  Press Ctrl-C to stop.\n", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
