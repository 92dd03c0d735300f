"""Start an emulator over real HTTP inside a test process: `with EmulatorServer() as emu: ...`."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import requests
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Response
from werkzeug.wsgi import ClosingIterator

from broker.emulator import create_app
from broker.emulator.control import Fault
from broker.emulator.core import BATCH_PREFIX, EXTENSION_KEY, Emulator

log = logging.getLogger("broker.emulator.testing")


class _InFlight:
    """WSGI wrapper counting requests being handled, so `stop()` can wait for them.

    Closing the store under a request still running (a latency fault outliving a client's
    timeout) would fail that request with "Cannot operate on a closed database" at teardown.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._changed = threading.Condition()
        self._active = 0
        self._closing = False

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self._changed:
            if self._closing:
                refuse = Response("emulator stopping", status=503, headers={"Connection": "close"})
                return refuse(environ, start_response)
            self._active += 1
        try:
            return ClosingIterator(self.app(environ, start_response), self._finished)
        except BaseException:
            self._finished()
            raise

    def _finished(self) -> None:
        with self._changed:
            self._active -= 1
            self._changed.notify_all()

    def close_and_wait(self, timeout: float) -> bool:
        """Refuse new requests, then wait for running ones; False if some outlived `timeout`."""
        with self._changed:
            self._closing = True
            return self._changed.wait_for(lambda: self._active == 0, timeout)


class EmulatorServer:
    """An emulator on a free port of 127.0.0.1, served by a threaded server in a daemon thread.

    Controls are enabled by default. Without `data_dir` a temporary folder is used and removed
    on `stop()`.
    """

    def __init__(
        self, data_dir: str | Path | None = None, config: dict[str, Any] | None = None
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cf-emulator-")
            data_dir = self._tmp.name
        settings: dict[str, Any] = {"DATA_DIR": str(data_dir), "CONTROL_ENABLED": True}
        settings.update(config or {})
        self.app: Flask = create_app(settings)
        self._keep_public_url = bool((config or {}).get("PUBLIC_URL"))
        self._server: BaseWSGIServer | None = None
        self._in_flight: _InFlight | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    @property
    def emulator(self) -> Emulator:
        """Return the in-process emulator object (store, controls, notifier)."""
        return self.app.extensions[EXTENSION_KEY]

    @property
    def account_id(self) -> str:
        """Return the emulated account id."""
        return self.emulator.account_id

    @property
    def api_token(self) -> str:
        """Return the API token the emulator accepts."""
        return self.emulator.api_token

    @property
    def account_hash(self) -> str:
        """Return the account hash used in upload and delivery URLs."""
        return self.emulator.account_hash

    @property
    def api_base(self) -> str:
        """Return the REST base URL, as given to the SDK's `base_url`."""
        return f"{self.url}/client/v4"

    @property
    def batch_base(self) -> str:
        """Return the batch host's base URL (its paths then start with `/images/…`)."""
        return f"{self.url}{BATCH_PREFIX}"

    def start(self) -> EmulatorServer:
        """Bind a free port, point PUBLIC_URL at it and start serving."""
        if self._server is not None:
            return self
        self._in_flight = _InFlight(self.app)
        self._server = make_server("127.0.0.1", 0, self._in_flight, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        if not self._keep_public_url:
            # Upload and delivery URLs in answers must point at this very server.
            self.app.config["PUBLIC_URL"] = self.url
        # A short poll interval keeps stop() (and so every test using a server) fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="cf-images-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wait for running requests, close the store, remove a temporary folder."""
        if self._server is not None:
            self._server.shutdown()
            # Handler threads are daemons the server does not join: wait for their requests
            # (keep-alive connections may still bring new ones; those are refused).
            if self._in_flight is not None and not self._in_flight.close_and_wait(timeout=30):
                log.warning("emulator stopped with requests still running")
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.emulator.close()
        finally:
            # Even when closing failed: a TemporaryDirectory left to the garbage collector warns
            # from its finalizer, which pytest (warnings are errors) reports against a random
            # later test as "Exception ignored in: <finalize object …; dead>".
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Controls, in process (they work even when CONTROL_ENABLED is off).

    def counters(self) -> dict[str, int]:
        """Return the per-endpoint request counters."""
        return self.emulator.controls.counters()

    def peak_in_flight(self) -> dict[str, int]:
        """Return, per endpoint, the most requests the emulator handled at once."""
        return self.emulator.controls.peak_in_flight()

    def reset_counters(self) -> None:
        """Zero the request counters."""
        self.emulator.controls.reset_counters()

    def inject_fault(
        self,
        endpoint: str = "*",
        *,
        status: int | None = None,
        latency_ms: int = 0,
        error_rate: float = 1.0,
        drop: bool = False,
        count: int | None = None,
    ) -> str:
        """Make requests to `endpoint` fail or slow down; return the fault id."""
        fault = Fault(endpoint, status, latency_ms, error_rate, drop, count)
        return self.emulator.controls.add_fault(fault).id

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        self.emulator.controls.clear_faults()

    def advance(self, seconds: float) -> None:
        """Move the emulator's clock forward by `seconds`."""
        self.emulator.controls.advance(seconds)

    def kinds(self) -> dict[str, int]:
        """Return how many requests went to the global API, the batch host and the rest."""
        return self.emulator.controls.kinds()

    def forbid_batch(self, *endpoints: str) -> None:
        """Make these endpoints answer code 103 "forbidden endpoint" on the batch host."""
        self.emulator.batch.forbid(set(endpoints))

    def revoke_batch_tokens(self) -> None:
        """Make every batch token issued so far fail authentication."""
        self.emulator.batch.revoke_all()

    def revoke_batch_token(self, token: str) -> None:
        """Make one batch token fail authentication (the others keep working)."""
        assert self.emulator.batch.revoke(token), "no such batch token"

    def batch_token_use(self, token: str) -> tuple[int, int]:
        """Return the calls the batch host let through with `token`, and the most in any
        one-second window."""
        return self.emulator.batch.use_of(token)

    def reset(self) -> None:
        """Clear counters, faults, rate-limit state, batch host state and clock offset."""
        self.emulator.controls.reset()
        self.emulator.batch.reset()

    def client(self) -> ImagesClient:
        """Return an authenticated REST client for this server (close it when done)."""
        return ImagesClient(self)


class ImagesClient:
    """A minimal bearer-authenticated client for the emulator's Images REST API (tests only)."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.base = f"{server.url}/client/v4/accounts/{server.account_id}/images"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {server.api_token}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Call `base + path` and return the response with its body already read."""
        kwargs.setdefault("timeout", 10)
        with self.session.request(method, self.base + path, **kwargs) as resp:
            resp.content  # noqa: B018 - read the body before the connection is released
            return resp

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET a path of the API."""
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        """POST to a path of the API."""
        return self.request("POST", path, **kwargs)

    def upload(self, data: bytes, filename: str = "pic.png", **fields: Any) -> dict[str, Any]:
        """Upload through v1 and return the Image, asserting success."""
        resp = self.post("/v1", files={"file": (filename, data)}, data=fields)
        assert resp.status_code == 200, resp.text
        return resp.json()["result"]

    def direct_upload(self, **fields: Any) -> dict[str, Any]:
        """Create a direct upload (multipart) and return `{id, uploadURL}`, asserting success."""
        # An empty extra part forces multipart even without fields, as the SDK sends.
        resp = self.post("/v2/direct_upload", files={"_": (None, "")}, data=fields)
        assert resp.status_code == 200, resp.text
        return resp.json()["result"]

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def __enter__(self) -> ImagesClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_image(
    width: int = 64,
    height: int = 48,
    fmt: str = "PNG",
    color: tuple[int, int, int] = (200, 30, 30),
    exif: dict[int, str] | None = None,
) -> bytes:
    """Return a real encoded image of the given size (for uploads in tests)."""
    import io

    from PIL import Image

    from broker.emulator.imaging import register_heif

    register_heif()  # so fmt="HEIF" writes HEIC
    out = io.BytesIO()
    with Image.new("RGB", (width, height), color) as img:
        params: dict[str, Any] = {}
        if exif:
            tags = Image.Exif()
            for tag, value in exif.items():
                tags[tag] = value
            params["exif"] = tags.tobytes()
        img.save(out, fmt, **params)
    return out.getvalue()
