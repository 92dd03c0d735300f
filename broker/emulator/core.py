"""The per-app emulator object and the request hooks shared by every blueprint:
counting, fault injection, authentication, the rate limit and Cloudflare-shaped errors.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import time
from contextlib import suppress
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import quote

from flask import Flask, Request, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from broker.emulator.batch import BATCH_ENDPOINTS, BATCH_PREFIX_NAME, FORBIDDEN_CODE, BatchHost
from broker.emulator.control import Clock, Controls
from broker.emulator.errors import CfError
from broker.emulator.notify import Notifier
from broker.emulator.store import ImageRecord, Store

log = logging.getLogger(__name__)

EXTENSION_KEY = "cf_images_emulator"
API_BLUEPRINT = "cf_api"
# The same REST views, mounted again under BATCH_PREFIX as the batch host.
BATCH_BLUEPRINT = "cf_batch"
BATCH_PREFIX = "/batch"
UPLOAD_BLUEPRINT = "cf_upload"
DELIVERY_BLUEPRINT = "cf_delivery"
CONTROL_BLUEPRINT = "emulator_control"


class Emulator:
    """Everything one emulator app holds: store, controls, notifier and account identity."""

    def __init__(self, config: dict[str, Any], clock: Clock) -> None:
        self.account_id: str = str(config["ACCOUNT_ID"])
        self.api_token: str = str(config["API_TOKEN"])
        self.account_hash: str = str(config["ACCOUNT_HASH"])
        self.images_allowed: int = int(config["IMAGES_ALLOWED"])
        self.store = Store(config["DATA_DIR"])
        self.controls = Controls(clock, int(config["RATE_LIMIT"]), float(config["RATE_WINDOW"]))
        self.batch = BatchHost(float(config["BATCH_TOKEN_TTL"]), int(config["BATCH_RATE_LIMIT"]))
        self.notifier = Notifier(
            config.get("NOTIFY_URL") or None,
            config.get("NOTIFY_SECRET") or None,
            float(config["NOTIFY_TIMEOUT"]),
        )

    def close(self) -> None:
        """Wait briefly for notifications in flight and close the database."""
        self.notifier.join(timeout=self.notifier.timeout)
        self.store.close()

    def now(self) -> datetime:
        """Return the emulator's current time."""
        return self.controls.now()

    def now_ms(self) -> int:
        """Return the emulator's current time in Unix milliseconds."""
        return int(self.controls.now().timestamp() * 1000)

    def public_url(self) -> str:
        """Return the base URL of upload and delivery links (configured, else this request's)."""
        configured = current_app.config.get("PUBLIC_URL")
        return str(configured or request.url_root).rstrip("/")

    def upload_url(self, image_id: str) -> str:
        """Return the one-time upload URL of a draft."""
        return f"{self.public_url()}/upload/{self.account_hash}/{quote(image_id, safe='/')}"

    def delivery_url(self, image_id: str, variant: str) -> str:
        """Return the delivery URL of an image variant (unsigned)."""
        return f"{self.public_url()}/{self.account_hash}/{quote(image_id, safe='/')}/{variant}"

    def image_json(
        self, image: ImageRecord, variant_ids: list[str] | None = None
    ) -> dict[str, Any]:
        """Return the wire Image object (pass `variant_ids` when rendering many images)."""
        if variant_ids is None:
            variant_ids = self.variant_ids()
        body: dict[str, Any] = {"id": image.id}
        if image.filename is not None:
            body["filename"] = image.filename
        body.update(
            creator=image.creator,
            meta=image.meta,
            requireSignedURLs=image.require_signed,
            uploaded=rfc3339_ms(image.uploaded_ms),
            variants=[self.delivery_url(image.id, v) for v in variant_ids],
        )
        if image.draft:
            body["draft"] = True
        return body

    def variant_ids(self) -> list[str]:
        """Return the names of every variant, in creation order."""
        return [v.id for v in self.store.list_variants()]


def rfc3339_ms(ms: int) -> str:
    """Format Unix milliseconds as RFC 3339 with milliseconds and `Z`."""
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def current_emulator() -> Emulator:
    """Return the emulator of the current app."""
    return current_app.extensions[EXTENSION_KEY]


def endpoint_name() -> str:
    """Return the short, stable name of the matched endpoint (`unknown` when nothing matched);
    the batch host's are `batch.<name>`."""
    endpoint = request.endpoint
    name = endpoint.rsplit(".", 1)[-1] if endpoint else "unknown"
    return BATCH_PREFIX_NAME + name if request.blueprint == BATCH_BLUEPRINT else name


def _drop_connection() -> Response:
    """Cut the TCP connection under the request so the client sees it dropped mid-call."""
    sock = request.environ.get("werkzeug.socket")
    if isinstance(sock, socket.socket):
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        # The server's write then fails and it drops the request quietly.
        return Response(b"", status=502)
    # Servers without socket access (gunicorn) get the closest thing: an empty 502.
    return Response(b"", status=502, headers={"Connection": "close"})


def _fault_response(status: int) -> Response:
    if request.blueprint == DELIVERY_BLUEPRINT:
        return Response(f"ERROR {status}: injected fault\n", status=status, mimetype="text/plain")
    code = 971 if status == 429 else 5000 + status
    err = CfError(code, "Injected fault", status)
    if status == 429:
        err.headers["Retry-After"] = "1"
    return err.response()


def _authenticate(emu: Emulator) -> str:
    """Return the caller's token, or raise the Cloudflare-shaped 401/403."""
    header = request.headers.get("Authorization", "")
    token = ""
    if header[:7].lower() == "bearer ":
        token = header[7:].strip()
    elif request.headers.get("X-Auth-Key") and request.headers.get("X-Auth-Email"):
        token = request.headers["X-Auth-Key"]
    if not token or not hmac.compare_digest(token.encode(), emu.api_token.encode()):
        raise CfError(10000, "Authentication error", 401)
    if g.get("account_id") != emu.account_id:
        raise CfError(5403, "Account not authorized to access Images", 403)
    return token


def _before_request() -> Response | None:
    if request.blueprint == CONTROL_BLUEPRINT:
        return None
    emu = current_emulator()
    name = endpoint_name()
    kind = {API_BLUEPRINT: "global_api", BATCH_BLUEPRINT: "batch"}.get(request.blueprint or "")
    emu.controls.count(name, kind or "other")
    g.emulator_endpoint = (name, emu.controls.enter(name))
    for fault in emu.controls.pick_faults(name):
        if fault.latency_ms:
            time.sleep(fault.latency_ms / 1000)
        if fault.drop:
            return _drop_connection()
        if fault.status is not None:
            return _fault_response(fault.status)
    if request.blueprint == BATCH_BLUEPRINT:
        _batch_gate(emu, name.removeprefix(BATCH_PREFIX_NAME))
        return None
    if request.blueprint == API_BLUEPRINT:
        token = _authenticate(emu)
        bucket = hashlib.sha256(token.encode()).hexdigest()
        retry_after = emu.controls.limiter.hit(bucket, emu.now().timestamp())
        if retry_after is not None:
            err = CfError(971, "Please wait and consider throttling your request speed", 429)
            err.headers["Retry-After"] = str(retry_after)
            raise err
    return None


def _after_request_done(exc: BaseException | None) -> None:
    entered = g.pop("emulator_endpoint", None)
    if entered is not None:
        current_emulator().controls.leave(*entered)


def _batch_gate(emu: Emulator, name: str) -> None:
    """Let a batch-host call through: a documented endpoint, a live batch token, 200/s."""
    if name not in BATCH_ENDPOINTS:
        raise CfError(7003, "No route for that URI", 404)
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not token or not emu.batch.valid(token, emu.now()):
        raise CfError(10000, "Authentication error", 401)
    if emu.batch.forbidden(name):
        raise CfError(FORBIDDEN_CODE, "forbidden endpoint", 403)
    retry_after = emu.batch.hit(token, emu.now().timestamp())
    if retry_after is not None:
        err = CfError(971, "Please wait and consider throttling your request speed", 429)
        err.headers["Retry-After"] = str(retry_after)
        raise err


def _count_throttled(response: Response) -> Response:
    """Count the 429s the API and the batch host answer (benchmarks report them)."""
    if response.status_code == 429 and request.blueprint in (API_BLUEPRINT, BATCH_BLUEPRINT):
        current_emulator().controls.count_throttled()
    return response


def _handle_cf_error(err: CfError) -> Response:
    return err.response()


def _is_delivery_path() -> bool:
    path = request.path
    return not path.startswith(("/client/", "/upload/", "/_emulator/", f"{BATCH_PREFIX}/"))


def _handle_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if request.blueprint == DELIVERY_BLUEPRINT or (
        request.blueprint is None and _is_delivery_path()
    ):
        code = 9425 if status == 403 else 9431 if status == 404 else 9500
        return Response(
            f"ERROR {code}: {exc.name}\n",
            status=status,
            mimetype="text/plain",
            headers={"Cf-Resized": f"err={code}"},
        )
    codes = {404: 7003, 405: 7001, 413: 5413}
    message = {
        404: "No route for that URI",
        405: "Method not allowed",
        413: "Image exceeds the 10 MB size limit",
    }.get(status, exc.name)
    return CfError(codes.get(status, 5000 + status), message, status).response()


def _handle_unexpected(exc: Exception) -> Response:
    log.exception("emulator request failed")
    if request.blueprint == DELIVERY_BLUEPRINT:
        return Response(
            "ERROR 9500: internal error\n",
            status=500,
            mimetype="text/plain",
            headers={"Cf-Resized": "err=9500"},
        )
    return CfError(5500, "Internal error").response()


class EmulatorRequest(Request):
    """A request that closes every file spool it opened, also when the client went away in the
    middle of a body (werkzeug closes only the files of a form it finished parsing)."""

    def _get_file_stream(self, *args: Any, **kwargs: Any) -> IO[bytes]:
        stream = super()._get_file_stream(*args, **kwargs)
        self.__dict__.setdefault("_spools", []).append(stream)
        return stream

    def close(self) -> None:
        """Close the parsed files and any spool left by a form that was cut off."""
        super().close()
        for stream in self.__dict__.pop("_spools", []):
            stream.close()


def install(app: Flask, emulator: Emulator) -> None:
    """Attach the emulator and its shared hooks and error handlers to `app`."""
    app.extensions[EXTENSION_KEY] = emulator
    app.request_class = EmulatorRequest
    app.before_request(_before_request)
    app.teardown_request(_after_request_done)
    app.after_request(_count_throttled)
    app.register_error_handler(CfError, _handle_cf_error)
    app.register_error_handler(HTTPException, _handle_http_error)
    app.register_error_handler(Exception, _handle_unexpected)
