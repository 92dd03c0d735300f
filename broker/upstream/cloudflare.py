"""The one HTTP client for every Cloudflare Images endpoint the broker uses.

`CloudflareImages` speaks the v4 envelope over pooled urllib3 connections, turns every failure
into a typed `CloudflareError`, puts a timeout on every call, spends the shared upstream budget
before each attempt, and retries only what is safe to retry:

- idempotent calls (GET, PUT, PATCH, DELETE) on connection errors, 429 and 5xx, with capped
  exponential backoff and full jitter, honouring `Retry-After`;
- a POST only when it provably never reached Cloudflare (connect refused / connect timeout) or
  Cloudflare refused it unprocessed (429). A POST that may have been processed is never re-sent:
  a second `direct_upload` would create a second draft.

Redirects are never followed (an answer is Cloudflare's or nobody's). The transport is urllib3,
the pool under `requests`, called directly: `requests` re-read ~150 environment entries for
proxies, merged cookies, hooks and auth on every call — about 1 ms of CPU per create. What it
took from the environment is read once per origin instead (`_Origins`): `HTTPS_PROXY`/
`HTTP_PROXY`/`ALL_PROXY` with `NO_PROXY`, and `REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE`. A call
whose answer is read whole goes over a connection of the origin's pool by
`broker.upstream.wire` (urllib3's own request and response objects cost four times the
exchange); a stream, or a call through a proxy, through urllib3's `urlopen`.

The app's shared client lives in `app.extensions["cloudflare"]` (see `init_app`/`get_client`).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
import logging
import os
import random
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast
from urllib.parse import quote, unquote, urlencode, urlsplit
from urllib.request import getproxies_environment

import urllib3
from flask import Flask
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as TransportError
from urllib3.fields import RequestField
from urllib3.util import Retry, create_urllib3_context, make_headers

from broker.platform import outages
from broker.platform.config import ConfigError, Settings, settings_of
from broker.upstream import wire

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

log = logging.getLogger("broker.cloudflare")

EXTENSION_KEY = "cloudflare"
# Cloudflare's own upload limit plus room for the multipart envelope.
MAX_BLOB_BYTES = 11 * 1024 * 1024


class Priority(enum.IntEnum):
    """Who is waiting for an upstream call: a person (interactive) or the worker (background)."""

    INTERACTIVE = 0
    BACKGROUND = 1


# ---------------------------------------------------------------------------------------------
# Errors


class UpstreamError(Exception):
    """Base of every failure to get an answer from Cloudflare (including our own budget)."""

    retry_after: float | None = None


class CloudflareError(UpstreamError):
    """Cloudflare answered with an error (or not at all); `status` 0 means no HTTP answer."""

    def __init__(
        self,
        status: int,
        code: int | None,
        message: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"Cloudflare {status} code={code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors or []
        self.retry_after = retry_after


class CloudflareAuthError(CloudflareError):
    """The token or account is wrong or lacks Images permission (401/403, codes 10000, 5403)."""


class CloudflareNotFound(CloudflareError):
    """The image, variant or key does not exist (404)."""


class CloudflareConflict(CloudflareError):
    """The resource already exists, e.g. a reused custom id (409, code 5409)."""


class CloudflareBadRequest(CloudflareError):
    """Cloudflare refused the request's content (other 4xx)."""


class CloudflareRateLimited(CloudflareError):
    """Cloudflare answered 429; every call is blocked until `retry_after` seconds pass."""


class CloudflareUnavailable(CloudflareError):
    """Cloudflare failed (5xx), or the connection failed before an answer."""


class CloudflareTimeout(CloudflareUnavailable):
    """No answer within the timeout."""


@dataclass(frozen=True)
class BudgetStatus:
    """A snapshot of a budget's window, for metrics, the admin page and pacing decisions."""

    used: int
    limit: int
    reserve: int
    window: int
    paused_for: float
    background: int = 0  # of `used`, the background side's calls
    # The calls a whole window would hold at the pace of its last slice or two: ahead of `used`
    # when traffic has just picked up (the window still holds the quiet minutes before it).
    pace: int = 0

    @property
    def background_left(self) -> int:
        """Calls a background call may still make in this window (both caps it must respect)."""
        return max(0, min(self.limit - self.used, self.limit - self.reserve - self.background))

    @property
    def projected(self) -> int:
        """The calls this window holds, or will hold if the recent pace goes on, if more."""
        return max(self.used, self.pace)


class CloudflareUnreachable(CloudflareUnavailable):
    """The connection failed before any byte of the request left: nothing was processed."""


class Budget(Protocol):
    """A budget of upstream calls: the shared window (broker.upstream.budget.UpstreamBudget)
    or the batch host's per-token rate (broker.upstream.batch). The client spends it before
    each attempt; the create path prepays it in its own transaction; pacing reads its status.
    """

    def acquire(self, priority: Priority) -> None:
        """Spend one call or raise BudgetExhausted."""

    def acquire_in(self, conn: Connection, priority: Priority) -> bool:
        """Spend one call inside the caller's transaction on `conn`; False when this budget
        cannot (nothing spent: use `acquire`). BudgetExhausted as `acquire`."""

    def pause(self, seconds: float) -> None:
        """Stop every process from calling upstream for `seconds` (after a 429)."""

    def status(self) -> BudgetStatus | None:
        """Return a snapshot of the window, or None for a budget that keeps none."""


class TokenCall(Protocol):
    """One call's batch token as the batch route hands it out (broker.upstream.batch.BatchCall):
    the client sends its value and gives it back to the route's `spend` and `failed`."""

    @property
    def value(self) -> str:
        """The token to send."""


Call = TypeVar("Call", bound=TokenCall)


class BatchRouting(Protocol[Call]):
    """What the client needs from the batch route (see broker.upstream.batch)."""

    base: str
    rate: Budget

    def uses_batch(self, endpoint: str) -> bool:
        """Tell whether `endpoint` goes to the batch host now."""

    def token(self, source: CloudflareImages, priority: Priority) -> Call | None:
        """Return a valid batch token for one call, fetching it when due, with the call's first
        attempt counted on that token's rate; None when there is none; BudgetExhausted when
        every token stays full."""

    def spend(self, call: Call) -> None:
        """Count one retry on `call`'s token's per-second rate (waits briefly when it is full);
        nothing for a first attempt `token` counted just before."""

    def failed(self, endpoint: str, error: CloudflareError, call: Call) -> bool:
        """Record a batch-host failure of `call`; True when the call may go to the global API
        now."""

    def succeeded(self, endpoint: str) -> None:
        """Reset the endpoint's run of errors."""


class _BatchSpend(Generic[Call]):
    """One call's batch token's rate, spent as a budget (waiting briefly when full)."""

    def __init__(self, route: BatchRouting[Call], call: Call) -> None:
        self.route, self.call = route, call

    def acquire(self, priority: Priority) -> None:
        """Take one call of the per-second rate."""
        self.route.spend(self.call)

    def acquire_in(self, conn: Connection, priority: Priority) -> bool:
        """The rate is counted on its own (waiting briefly): never inside a caller's work."""
        return False

    def pause(self, seconds: float) -> None:
        """The batch host's 429 is retried after its Retry-After: nothing to record."""

    def status(self) -> None:
        """A per-second rate keeps no window to report."""


# ---------------------------------------------------------------------------------------------
# Typed results

# Cloudflare's documented sizes: what the broker's columns hold.
MAX_ID = 1024
MAX_FILENAME = 255
MAX_CREATOR = 1024
MAX_URL = 2048
MAX_VARIANTS = 100


def _text(value: Any, limit: int) -> str | None:
    """A string field from Cloudflare: None when absent or not text, cut to `limit`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value[:limit]


def _parse_time(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Image:
    """An image record (`draft` is true while a direct upload has not received its file)."""

    id: str
    filename: str | None = None
    creator: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    require_signed_urls: bool = False
    uploaded: datetime | None = None
    variants: list[str] = field(default_factory=list)
    draft: bool = False

    @classmethod
    def from_api(cls, data: Any) -> Image:
        """Build from the API's JSON (`requireSignedURLs`, RFC 3339 `uploaded`, …).

        What Cloudflare sends is checked and cut to its documented shape here, at the boundary,
        so an odd answer (a longer filename, a number where a string belongs) cannot fail the
        database write of whoever stores it.
        """
        if not isinstance(data, dict):
            data = {}
        meta = data.get("meta")
        if not isinstance(meta, dict):
            meta = data.get("metadata")  # the direct-upload doc's spelling
        return cls(
            id=_text(data.get("id"), MAX_ID) or "",
            filename=_text(data.get("filename"), MAX_FILENAME),
            creator=_text(data.get("creator"), MAX_CREATOR),
            meta=meta if isinstance(meta, dict) else {},
            require_signed_urls=data.get("requireSignedURLs") is True,
            uploaded=_parse_time(data.get("uploaded")),
            variants=[
                v for v in data.get("variants") or [] if isinstance(v, str) and len(v) <= MAX_URL
            ][:MAX_VARIANTS],
            draft=data.get("draft") is True,
        )


@dataclass(frozen=True)
class DirectUpload:
    """A one-time upload URL and the id of the draft image behind it."""

    id: str
    upload_url: str


@dataclass(frozen=True)
class ImagePage:
    """One page of the v2 listing; `continuation_token` is None on the last page."""

    images: list[Image]
    continuation_token: str | None


@dataclass(frozen=True)
class SigningKeyValue:
    """A delivery signing key as Cloudflare stores it (the value is a secret)."""

    name: str
    value: str = field(repr=False)


@dataclass(frozen=True)
class Variant:
    """A named resize preset."""

    id: str
    fit: str
    width: int
    height: int
    metadata: str = "none"
    never_require_signed_urls: bool = False

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Variant:
        """Build from the API's JSON (`options`, `neverRequireSignedURLs`)."""
        options = data.get("options") or {}
        return cls(
            id=str(data.get("id") or ""),
            fit=str(options.get("fit") or "scale-down"),
            width=int(options.get("width") or 0),
            height=int(options.get("height") or 0),
            metadata=str(options.get("metadata") or "none"),
            never_require_signed_urls=bool(data.get("neverRequireSignedURLs", False)),
        )


@dataclass(frozen=True)
class Stats:
    """How many images the account holds and may hold."""

    current: int
    allowed: int


# ---------------------------------------------------------------------------------------------
# Helpers


def rfc3339(moment: datetime) -> str:
    """Format a timezone-aware moment as Cloudflare expects it (`2024-01-02T03:04:05Z`)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Read `Retry-After` as delta seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())


_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE"})
# What urllib3 makes of `retries=False, redirect=False` on every call (3 µs), made once.
_NO_RETRIES = Retry(False, redirect=False)
_HEADERS = {
    "Accept": "application/json",
    "Accept-Encoding": "gzip, deflate",
    "User-Agent": f"upload-broker urllib3/{urllib3.__version__}",
}


def _never_sent(exc: TransportError) -> bool:
    """Tell whether a transport error happened before any byte of the request left."""
    return isinstance(exc, (ConnectTimeoutError, NewConnectionError))


def _no_answer(timeout: float) -> CloudflareTimeout:
    return CloudflareTimeout(0, None, f"Cloudflare did not answer within {timeout:g}s")


def _connection_failed(exc: Exception, cls: type[CloudflareError]) -> CloudflareError:
    return cls(0, None, f"connection to Cloudflare failed ({type(exc).__name__})")


def _tls_context() -> ssl.SSLContext:
    """A context verifying certificates against the bundle REQUESTS_CA_BUNDLE or
    CURL_CA_BUNDLE names (a file or a directory), else certifi's, as `requests` does;
    ConfigError naming the variable when its bundle cannot be read."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        bundle = os.environ.get(name)
        if bundle:
            try:
                return _verifying(bundle)
            except (OSError, ssl.SSLError) as exc:
                # Refused at start, in one line: a bad bundle would fail every call later.
                reason = getattr(exc, "strerror", None) or exc
                raise ConfigError(
                    f"{name}={bundle}: cannot read this CA bundle ({reason})"
                ) from None
    return _verifying(None)


@functools.cache
def _verifying(bundle: str | None) -> ssl.SSLContext:
    """A context verifying against `bundle`, else certifi's; built once per process."""
    context = create_urllib3_context()
    if bundle and os.path.isdir(bundle):
        context.load_verify_locations(capath=bundle)
    else:
        import certifi

        context.load_verify_locations(cafile=bundle or certifi.where())
    return context


def _bypasses_proxy(host: str, port: int | None, proxies: dict[str, str]) -> bool:
    """Tell whether NO_PROXY names the host: a name or a suffix of it (`.example.com`), with
    or without the port, `*`, or for an IP address a network holding it (`10.0.0.0/8`)."""
    if urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]  # no stub
        f"{host}:{port}" if port else host, proxies
    ):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in proxies.get("no", "").replace(" ", "").split(","):
        try:
            if entry and address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # a host name, not a network
            continue
    return False


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`,
    lower case first, unless `NO_PROXY` names the host), read as `requests` reads it."""
    parts = urlsplit(url)
    proxies = getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or _bypasses_proxy(parts.hostname or "", parts.port, proxies):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


class _Origins:
    """How calls reach each origin (scheme://host:port): its own connection pool, or the
    manager of the proxy the environment names for it, decided when the origin is first used."""

    def __init__(self, pool_size: int) -> None:
        self._pool_size = pool_size
        # An origin's pool, or the urlopen of its proxy's manager.
        self._openers: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def opener(
        self, url: str
    ) -> tuple[Callable[..., urllib3.BaseHTTPResponse], str, urllib3.HTTPConnectionPool | None]:
        """Return what opens `url`, the URL to give it (the path alone for a pool), and the
        origin's own pool (None through a proxy)."""
        end = url.find("/", url.find("//") + 2)
        origin = url if end < 0 else url[:end]
        opener = self._openers.get(origin)
        if opener is None:
            with self._lock:
                opener = self._openers.get(origin)
                if opener is None:
                    opener = self._openers[origin] = self._build(origin)
        if isinstance(opener, urllib3.HTTPConnectionPool):
            return opener.urlopen, url[len(origin) :] or "/", opener
        return opener, url, None

    def _build(self, origin: str) -> Any:
        kw: dict[str, Any] = {"maxsize": self._pool_size}
        if origin.lower().startswith("https:"):
            kw["ssl_context"] = _tls_context()
        proxy = _proxy_for(origin)
        if proxy is None:
            # One origin, one pool: urlopen on it skips a manager's URL parsing and lookup.
            pool = urllib3.connection_from_url(origin, **kw)
            self._closers.append(pool.close)
            return pool
        parts = urlsplit(proxy)
        username, password = unquote(parts.username or ""), unquote(parts.password or "")
        manager: urllib3.PoolManager
        if parts.scheme.startswith("socks"):
            from urllib3.contrib.socks import SOCKSProxyManager

            manager = SOCKSProxyManager(proxy, username=username, password=password, **kw)
        else:
            auth = make_headers(proxy_basic_auth=f"{username}:{password}") if username else None
            if parts.scheme == "https":
                # The proxy's own certificate is checked against the same bundle, as `requests`
                # did (ssl_context covers only the origin's, through the tunnel).
                kw["proxy_ssl_context"] = _tls_context()
            manager = urllib3.ProxyManager(proxy, proxy_headers=auth, **kw)
        self._closers.append(manager.clear)
        return manager.urlopen

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            for close in self._closers:
                close()
            self._closers.clear()
            self._openers.clear()


def _multipart(files: list[tuple[str, tuple[str | None, Any]]]) -> tuple[bytes, str]:
    """Encode form fields `(name, (filename or None, value))` as `requests` sends them: a part
    without a filename is a plain field (no Content-Type). The names are the client's own;
    plain text parts are written directly (urllib3's RequestField costs ~30 µs a part)."""
    boundary = os.urandom(16).hex()
    out = bytearray()
    for name, (filename, value) in files:
        out += f"--{boundary}\r\n".encode()
        if filename is None and isinstance(value, str):
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            out += value.encode()
        else:
            part = RequestField(name=name, data=value, filename=filename)
            part.make_multipart()
            out += part.render_headers().encode("latin-1")
            out += value.encode() if isinstance(value, str) else value
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _error_class(status: int, code: int | None) -> type[CloudflareError]:
    if status in (401, 403) or code in (10000, 10001, 5403, 9109):
        return CloudflareAuthError
    if status == 429:
        return CloudflareRateLimited
    if status == 404:
        return CloudflareNotFound
    if status == 409 or code == 5409:
        return CloudflareConflict
    if status >= 500:
        return CloudflareUnavailable
    return CloudflareBadRequest


# ---------------------------------------------------------------------------------------------
# The client


def _image_fields(
    creator: str | None,
    metadata: dict[str, Any] | None,
    custom_id: str | None,
    require_signed_urls: bool,
) -> list[tuple[str, tuple[None, str]]]:
    """Return the multipart fields v1 upload and v2 direct upload share."""
    fields = [("requireSignedURLs", (None, "true" if require_signed_urls else "false"))]
    if creator is not None:
        fields.append(("creator", (None, creator)))
    if metadata:
        fields.append(("metadata", (None, json.dumps(metadata, separators=(",", ":")))))
    if custom_id is not None:
        fields.append(("id", (None, custom_id)))
    return fields


class CloudflareImages:
    """Typed, budgeted, retrying access to the Cloudflare Images API of one account."""

    def __init__(
        self,
        api_base: str,
        account_id: str,
        api_token: str,
        *,
        timeout: float = 10.0,
        budget: Budget | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_retries: int = 3,
        backoff_base: float = 0.25,
        backoff_cap: float = 4.0,
        account_hash: str | None = None,
        delivery_base: str = "https://imagedelivery.net",
        pool_size: int = 32,
        batch_route: BatchRouting[Any] | None = None,
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self.account_id = account_id
        self.account_hash = account_hash
        self.delivery_base = delivery_base.rstrip("/")
        self.timeout = timeout
        self.budget = budget
        self.batch_route = batch_route
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._sleep = sleep
        self._token = api_token
        # Drawn from the OS: a Random() seeded in the gunicorn master would give every forked
        # web process the same jitter, and their retries would land together.
        self._random = random.SystemRandom()
        self._origins = _Origins(pool_size)
        # The environment's proxy for each origin the client calls, read now, not per call.
        self._origins.opener(self.api_base)
        if batch_route is not None:
            self._origins.opener(batch_route.base)

    def __repr__(self) -> str:
        # The token must never reach a log line, traceback or debugger print.
        return f"<CloudflareImages {self.api_base} account={self.account_id}>"

    def close(self) -> None:
        """Release the pooled connections."""
        self._origins.close()

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def images_base(self) -> str:
        """Base URL of the account's Images endpoints."""
        return f"{self.api_base}/accounts/{quote(self.account_id, safe='')}/images"

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_cap, self.backoff_base * (2**attempt))
        delay = self._random.uniform(0, delay)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def request(
        self,
        method: str,
        path: str,
        *,
        priority: Priority = Priority.INTERACTIVE,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        files: Any = None,
        raw: bool = False,
        stream: bool = False,
        prepaid: bool = False,
        batch: str | None = None,
    ) -> Any:
        """Call `path` (relative to the account's images base) and return the envelope's result.

        With `raw=True` return the unread `urllib3` response of a successful call instead. With
        `prepaid=True` the caller already spent `budget_for(batch)` for the first attempt (see
        `UpstreamBudget.acquire_in`); retries spend their own. `batch` names the endpoint when
        the batch host serves it: the call then goes there while the batch route allows.
        """

        def send(url: str, token: str, budget: Budget | None, paid: bool, on_batch: bool) -> Any:
            return self._send(
                method,
                url,
                token,
                budget,
                priority=priority,
                params=params,
                json_body=json_body,
                files=files,
                raw=raw,
                stream=stream,
                prepaid=paid,
                on_batch=on_batch,
            )

        route = self.batch_route
        if batch is not None and route is not None and route.uses_batch(batch):
            call = route.token(self, priority)
            if call is not None:
                try:
                    # Never the caller's prepayment (that was the global budget): token() counted
                    # the first attempt on the token's rate, spend() counts each retry.
                    result = send(
                        f"{route.base}/images{path}",
                        call.value,
                        _BatchSpend(route, call),
                        False,
                        True,
                    )
                except CloudflareError as err:
                    if not route.failed(batch, err, call):
                        raise
                    # Refused or never received (103, token refused, no connection): the
                    # global API may take it.
                    log.info(
                        "cloudflare %s %s: batch host refused or unreachable, using the global API",
                        method,
                        path,
                    )
                else:
                    route.succeeded(batch)
                    return result
            # The batch host spent none of the global budget: a prepayment still covers this.
        return send(f"{self.images_base}{path}", self._token, self.budget, prepaid, False)

    def budget_for(self, batch: str | None) -> Budget | None:
        """The budget a call to endpoint `batch` spends now (to prepay it, see `request`)."""
        route = self.batch_route
        if batch is not None and route is not None and route.uses_batch(batch):
            return route.rate
        return self.budget

    def fetch_batch_token(self, priority: Priority) -> tuple[str, datetime]:
        """Ask the global API for a batch token (`GET /v1/batch_token`) and its expiry."""
        result = self._send(
            "GET",
            f"{self.images_base}/v1/batch_token",
            self._token,
            self.budget,
            priority=priority,
            on_batch=False,
        )
        token = (result or {}).get("token")
        expires = _parse_time((result or {}).get("expiresAt"))
        if not isinstance(token, str) or not token or expires is None:
            raise CloudflareBadRequest(502, None, "batch_token answer without token or expiresAt")
        return token, expires

    def _send(
        self,
        method: str,
        url: str,
        token: str,
        budget: Budget | None,
        *,
        priority: Priority,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        files: Any = None,
        raw: bool = False,
        stream: bool = False,
        prepaid: bool = False,
        on_batch: bool,
    ) -> Any:
        """Send one call to `url` with `token`, retrying what is safe (see the module doc)."""
        method = method.upper()
        path = url.removeprefix(self.images_base)
        idempotent = method in _IDEMPOTENT
        headers = {**_HEADERS, "Authorization": f"Bearer {token}"}
        body: bytes | None = None
        if files is not None:
            body, headers["Content-Type"] = _multipart(files)
        elif json_body is not None:
            body = json.dumps(json_body, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        if query:
            url = f"{url}?{query}"
        urlopen, target, pool = self._origins.opener(url)
        # A buffered call to an origin of our own pool goes over the wire directly (see
        # broker.upstream.wire); a stream, or a call through a proxy, through urllib3.
        if raw or stream:
            pool = None
        attempt = 0
        while True:
            if budget is not None and not (prepaid and attempt == 0):
                budget.acquire(priority)
            started = time.monotonic()
            outages.note_upstream_call()  # a dropped database connection: not run again
            try:
                if pool is not None:
                    response: Any = wire.exchange(pool, method, target, body, headers, self.timeout)
                else:
                    response = urlopen(
                        method,
                        target,
                        body=body,
                        headers=headers,
                        timeout=self.timeout,
                        preload_content=not stream,
                        redirect=False,
                        retries=_NO_RETRIES,  # the retries are ours (above): the errors come raw
                    )
            except ReadTimeoutError:
                # A read timeout: the request was sent and may have been processed.
                log.warning("cloudflare %s %s timed out after %.1fs", method, path, self.timeout)
                raise _no_answer(self.timeout) from None
            except TransportError as exc:
                never_sent = _never_sent(exc)
                if never_sent and on_batch:
                    # Nothing reached the batch host: the global API takes the call now.
                    raise CloudflareUnreachable(
                        0, None, f"batch host unreachable ({type(exc).__name__})"
                    ) from None
                retryable = idempotent or never_sent
                timed_out = never_sent and not isinstance(exc, NewConnectionError)
                log.warning(
                    "cloudflare %s %s connection failed attempt=%d retryable=%s: %s",
                    method,
                    path,
                    attempt + 1,
                    retryable,
                    type(exc).__name__,
                )
                if retryable and attempt < self.max_retries:
                    self._sleep(self._backoff(attempt, None))
                    attempt += 1
                    continue
                cls = CloudflareTimeout if timed_out else CloudflareUnavailable
                raise _connection_failed(exc, cls) from None
            elapsed_ms = (time.monotonic() - started) * 1000
            log.debug("cloudflare %s %s -> %d in %.0fms", method, path, response.status, elapsed_ms)
            if response.status < 400 and raw:
                return response
            try:
                return self._result(response)
            except (CloudflareRateLimited, CloudflareUnavailable) as err:
                limited = isinstance(err, CloudflareRateLimited)
                if limited and not on_batch and budget is not None:
                    # The global limit blocks every call for minutes: stop every process.
                    budget.pause(err.retry_after if err.retry_after is not None else 300)
                    raise
                retryable = idempotent or limited
                wait = self._backoff(attempt, err.retry_after)
                if not retryable or attempt >= self.max_retries or wait > self.backoff_cap * 2:
                    raise
                log.warning(
                    "cloudflare %s %s -> %d, retrying in %.2fs", method, path, err.status, wait
                )
                self._sleep(wait)
                attempt += 1

    def _result(self, response: urllib3.BaseHTTPResponse | wire.Answer) -> Any:
        """Unwrap the v4 envelope or raise the typed error it carries."""
        status = response.status
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        try:
            body = json.loads(response.data)
        except ValueError:  # not JSON, or not text
            body = None
        except TransportError:  # the connection broke while the answer was read
            body = None
        if status < 400 and isinstance(body, dict) and body.get("success", True):
            return body.get("result")
        errors: list[dict[str, Any]] = []
        if isinstance(body, dict) and isinstance(body.get("errors"), list):
            errors = [e for e in body["errors"] if isinstance(e, dict)]
        code = errors[0].get("code") if errors else None
        code = code if isinstance(code, int) else None
        message = str(errors[0].get("message")) if errors else (response.reason or "error")
        if status < 400:
            status = 502  # success: false on a 2xx; treat as an upstream failure
        raise _error_class(status, code)(
            status, code, message, errors=errors, retry_after=retry_after
        )

    # -- images --------------------------------------------------------------------------------

    def direct_upload(
        self,
        *,
        creator: str | None,
        expiry: datetime,
        metadata: dict[str, Any] | None = None,
        require_signed_urls: bool = True,
        custom_id: str | None = None,
        priority: Priority = Priority.INTERACTIVE,
        prepaid: bool = False,
    ) -> DirectUpload:
        """Create a draft image and its one-time upload URL (`POST /v2/direct_upload`)."""
        fields = [
            ("expiry", (None, rfc3339(expiry))),
            *_image_fields(creator, metadata, custom_id, require_signed_urls),
        ]
        result = self.request(
            "POST",
            "/v2/direct_upload",
            files=fields,
            priority=priority,
            prepaid=prepaid,
            batch="direct_upload",
        )
        return DirectUpload(id=str(result["id"]), upload_url=str(result["uploadURL"]))

    def upload_image(
        self,
        *,
        file: bytes | None = None,
        filename: str = "image",
        url: str | None = None,
        creator: str | None = None,
        metadata: dict[str, Any] | None = None,
        require_signed_urls: bool = False,
        custom_id: str | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> Image:
        """Upload an image from bytes or a URL in one call (`POST /v1`)."""
        if (file is None) == (url is None):
            raise ValueError("give exactly one of file or url")
        fields: list[tuple[str, Any]] = [
            ("file", (filename, file)) if file is not None else ("url", (None, url)),
            *_image_fields(creator, metadata, custom_id, require_signed_urls),
        ]
        return Image.from_api(
            self.request("POST", "/v1", files=fields, priority=priority, batch="upload_v1")
        )

    def get_image(self, image_id: str, *, priority: Priority = Priority.INTERACTIVE) -> Image:
        """Fetch an image's details (`GET /v1/{id}`); `draft` tells whether the file arrived."""
        return Image.from_api(
            self.request("GET", f"/v1/{_path(image_id)}", priority=priority, batch="image_details")
        )

    def list_images_v2(
        self,
        *,
        continuation_token: str | None = None,
        per_page: int = 1000,
        sort_order: str = "desc",
        creator: str | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> ImagePage:
        """List one page of uploaded images (`GET /v2`; drafts are not listed)."""
        params: dict[str, Any] = {"per_page": per_page, "sort_order": sort_order}
        if continuation_token:
            params["continuation_token"] = continuation_token
        if creator is not None:
            params["creator"] = creator
        result = self.request("GET", "/v2", params=params, priority=priority, batch="list_v2") or {}
        return ImagePage(
            images=[Image.from_api(i) for i in result.get("images") or []],
            continuation_token=result.get("continuation_token") or None,
        )

    def iter_images_v2(self, **kwargs: Any) -> Iterator[Image]:
        """Yield every listed image, following continuation tokens."""
        token: str | None = None
        while True:
            page = self.list_images_v2(continuation_token=token, **kwargs)
            yield from page.images
            token = page.continuation_token
            if not token:
                return

    def update_image(
        self,
        image_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        require_signed_urls: bool | None = None,
        creator: str | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> Image:
        """Change an image (`PATCH /v1/{id}`; `metadata` replaces the old one, not merges)."""
        body: dict[str, Any] = {}
        if metadata is not None:
            body["metadata"] = metadata
        if require_signed_urls is not None:
            body["requireSignedURLs"] = require_signed_urls
        if creator is not None:
            body["creator"] = creator
        result = self.request(
            "PATCH",
            f"/v1/{_path(image_id)}",
            json_body=body,
            priority=priority,
            batch="image_edit",
        )
        return Image.from_api(result)

    def delete_image(self, image_id: str, *, priority: Priority = Priority.INTERACTIVE) -> None:
        """Delete an image (`DELETE /v1/{id}`); raises CloudflareNotFound when it is gone."""
        self.request("DELETE", f"/v1/{_path(image_id)}", priority=priority, batch="image_delete")

    def get_blob(
        self,
        image_id: str,
        *,
        priority: Priority = Priority.INTERACTIVE,
        max_bytes: int = MAX_BLOB_BYTES,
    ) -> bytes:
        """Download the original image bytes (`GET /v1/{id}/blob`), refusing oversized bodies."""
        response = self.open_blob(image_id, priority=priority)
        try:
            chunks: list[bytes] = []
            size = 0
            for chunk in response.stream(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise CloudflareBadRequest(502, None, f"blob larger than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        except ReadTimeoutError:
            raise _no_answer(self.timeout) from None
        except TransportError as exc:
            raise _connection_failed(exc, CloudflareUnavailable) from None
        finally:
            # Unread bytes close the connection; a finished answer has given it back already.
            response.close()
            response.release_conn()

    def open_blob(
        self, image_id: str, *, priority: Priority = Priority.INTERACTIVE
    ) -> urllib3.BaseHTTPResponse:
        """Open a streaming response of the original bytes; the caller must close it."""
        response = self.request(
            "GET", f"/v1/{_path(image_id)}/blob", priority=priority, raw=True, stream=True
        )
        return cast(urllib3.BaseHTTPResponse, response)

    def stats(self, *, priority: Priority = Priority.INTERACTIVE) -> Stats:
        """Return the account's image count and allowance (`GET /v1/stats`)."""
        count = (self.request("GET", "/v1/stats", priority=priority) or {}).get("count") or {}
        return Stats(current=int(count.get("current") or 0), allowed=int(count.get("allowed") or 0))

    # -- signing keys --------------------------------------------------------------------------

    @staticmethod
    def _keys(result: Any) -> list[SigningKeyValue]:
        keys = (result or {}).get("keys") or []
        return [SigningKeyValue(name=str(k["name"]), value=str(k["value"])) for k in keys]

    def list_signing_keys(
        self, *, priority: Priority = Priority.INTERACTIVE
    ) -> list[SigningKeyValue]:
        """Return every delivery signing key with its value (`GET /v1/keys`)."""
        return self._keys(self.request("GET", "/v1/keys", priority=priority))

    def create_signing_key(
        self, name: str, *, priority: Priority = Priority.INTERACTIVE
    ) -> list[SigningKeyValue]:
        """Create (or regenerate) the key `name` and return all keys (`PUT /v1/keys/{name}`)."""
        return self._keys(self.request("PUT", f"/v1/keys/{_path(name)}", priority=priority))

    def delete_signing_key(
        self, name: str, *, priority: Priority = Priority.INTERACTIVE
    ) -> list[SigningKeyValue]:
        """Delete the key `name` and return the remaining keys (`DELETE /v1/keys/{name}`)."""
        return self._keys(self.request("DELETE", f"/v1/keys/{_path(name)}", priority=priority))

    # -- variants ------------------------------------------------------------------------------

    def list_variants(self, *, priority: Priority = Priority.INTERACTIVE) -> list[Variant]:
        """Return every variant (`GET /v1/variants`)."""
        result = self.request("GET", "/v1/variants", priority=priority) or {}
        variants = result.get("variants") or {}
        if isinstance(variants, dict):
            return [Variant.from_api({"id": name, **(v or {})}) for name, v in variants.items()]
        return [Variant.from_api(v) for v in variants]

    def get_variant(self, variant_id: str, *, priority: Priority = Priority.INTERACTIVE) -> Variant:
        """Return one variant (`GET /v1/variants/{id}`)."""
        result = self.request("GET", f"/v1/variants/{_path(variant_id)}", priority=priority)
        return Variant.from_api((result or {}).get("variant") or {})

    def create_variant(
        self,
        id: str,
        fit: str,
        width: int,
        height: int,
        metadata: str = "none",
        never_require_signed_urls: bool = False,
        *,
        priority: Priority = Priority.INTERACTIVE,
    ) -> Variant:
        """Create a variant (`POST /v1/variants`)."""
        body = {
            "id": id,
            "options": {"fit": fit, "width": width, "height": height, "metadata": metadata},
            "neverRequireSignedURLs": never_require_signed_urls,
        }
        result = self.request("POST", "/v1/variants", json_body=body, priority=priority)
        return Variant.from_api((result or {}).get("variant") or {})

    def update_variant(
        self,
        id: str,
        fit: str,
        width: int,
        height: int,
        metadata: str = "none",
        never_require_signed_urls: bool | None = None,
        *,
        priority: Priority = Priority.INTERACTIVE,
    ) -> Variant:
        """Change a variant's options (`PATCH /v1/variants/{id}`)."""
        body: dict[str, Any] = {
            "options": {"fit": fit, "width": width, "height": height, "metadata": metadata}
        }
        if never_require_signed_urls is not None:
            body["neverRequireSignedURLs"] = never_require_signed_urls
        result = self.request(
            "PATCH", f"/v1/variants/{_path(id)}", json_body=body, priority=priority
        )
        return Variant.from_api((result or {}).get("variant") or {})

    def delete_variant(self, variant_id: str, *, priority: Priority = Priority.INTERACTIVE) -> None:
        """Delete a variant (`DELETE /v1/variants/{id}`; `public` cannot be deleted)."""
        self.request("DELETE", f"/v1/variants/{_path(variant_id)}", priority=priority)

    # -- delivery ------------------------------------------------------------------------------

    def delivery_url(self, image_id: str, variant: str) -> str:
        """Return the unsigned delivery URL of an image's variant."""
        if not self.account_hash:
            raise RuntimeError("BROKER_CLOUDFLARE_ACCOUNT_HASH is not set")
        return (
            f"{self.delivery_base}/{self.account_hash}/{_path(image_id)}/{quote(variant, safe='')}"
        )


def _path(segment: str) -> str:
    """Quote an id for a URL path; custom ids may hold `/` subpaths, which stay as they are."""
    return quote(segment, safe="/")


# ---------------------------------------------------------------------------------------------
# Flask wiring (no module globals: the client lives in app.extensions)


def client_from_settings(
    settings: Settings, budget: Budget | None = None, batch_route: BatchRouting[Any] | None = None
) -> CloudflareImages:
    """Build a client from the app's BROKER_CLOUDFLARE_* settings."""
    return CloudflareImages(
        settings.cloudflare_api_base,
        settings.cloudflare_account_id or "",
        settings.cloudflare_api_token or "",
        timeout=settings.cloudflare_timeout or 10.0,
        budget=budget,
        account_hash=settings.cloudflare_account_hash,
        delivery_base=settings.cloudflare_delivery_base or "https://imagedelivery.net",
        batch_route=batch_route,
    )


def init_app(app: Flask) -> None:
    """Create the app's shared client (with the budget and batch route in `app.extensions`)."""
    app.extensions[EXTENSION_KEY] = client_from_settings(
        settings_of(app), app.extensions.get("budget"), app.extensions.get("batch_route")
    )


def get_client() -> CloudflareImages:
    """Return the current app's shared Cloudflare client."""
    from flask import current_app

    return cast(CloudflareImages, current_app.extensions[EXTENSION_KEY])
