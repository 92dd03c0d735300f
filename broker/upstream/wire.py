"""One HTTP/1.1 exchange on a connection of a urllib3 pool, read without `http.client`.

Offers `exchange` (what `broker.upstream.cloudflare` sends its buffered calls through) and the
`Answer` it returns. urllib3 still owns the connections: it opens them (TLS with the client's
context included), keeps them in its pool and notices a dropped one before reuse. What is left
out is the way one call goes over a connection there: `http.client`'s state machine, its
header lines sent in one write and the body in another, the email package parsing the answer's
header block, and urllib3's response object around it — 280 µs of CPU per call, against 60 for
the exchange itself, on every create.

Rules it keeps, as urllib3 and `http.client` did:
- failures are urllib3's exceptions, as its `urlopen` with `Retry(False)` raised them: the
  connection's own errors from connecting (`NewConnectionError`, `ConnectTimeoutError`,
  `SSLError`), `ReadTimeoutError` for a timeout once connected, `SSLError` for TLS failing
  later, `ProtocolError` for a connection that broke or an answer that is not HTTP,
  `DecodeError` for a body its encoding does not decode, so the caller's retry rules see the
  same;
- a request line or header value holding a control character is refused before anything is
  sent (no header injection through an id or a token);
- the answer is framed by `Transfer-Encoding: chunked`, else `Content-Length`, else the end of
  the connection; a body shorter than announced is an error; `gzip`/`deflate` bodies are
  decoded (the client asks for them);
- a connection goes back to the pool only when the answer left it clean for the next call
  (keep-alive, fully read); otherwise it is closed first.
"""

from __future__ import annotations

import re
import socket
import ssl
import zlib
from dataclasses import dataclass
from typing import Any, cast

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError
from urllib3.exceptions import HTTPError as TransportError

# http.client's limits on an answer's header block.
MAX_LINE = 65536
MAX_HEADERS = 100
# What may not appear in the request line's target, or in a header name or value (CR, LF and
# the other control characters http.client refuses).
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]")
_UNSAFE_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NO_BODY = frozenset({204, 304})


@dataclass(frozen=True)
class Answer:
    """An answer read whole: status, reason, headers (names in lower case), decoded body."""

    status: int
    reason: str
    headers: dict[str, str]
    data: bytes


class _Broken(Exception):
    """The answer is not HTTP, or the connection ended inside it."""


def exchange(
    pool: urllib3.HTTPConnectionPool,
    method: str,
    target: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
) -> Answer:
    """Send `method target` with `headers` and `body` on a connection of `pool`; read the
    answer whole."""
    head = _request_head(pool, method, target, body, headers)
    conn = cast(HTTPConnection, pool._get_conn())  # the pool's ConnectionCls
    reusable = False
    try:
        conn.timeout = timeout
        if conn.sock is None:
            _connect(conn, pool, target)
        sock = conn.sock
        assert sock is not None  # connected just above
        answer, reusable = _talk(sock, head + body if body else head, method, timeout, pool, target)
        return answer
    finally:
        if not reusable:
            conn.close()
        pool._put_conn(conn)


def _request_head(
    pool: urllib3.HTTPConnectionPool,
    method: str,
    target: str,
    body: bytes | None,
    headers: dict[str, str],
) -> bytes:
    """The request line and header block, refused (ValueError) when a part could inject."""
    if _UNSAFE_TARGET.search(method) or _UNSAFE_TARGET.search(target):
        raise ValueError(f"control characters in the request line of {method} {target!r}")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {_host_header(pool)}"]
    for name, value in headers.items():
        if _UNSAFE_HEADER.search(name) or _UNSAFE_HEADER.search(value) or ":" in name:
            raise ValueError(f"header {name!r} cannot be sent as it is")  # its value unsaid
        lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def _host_header(pool: urllib3.HTTPConnectionPool) -> str:
    """The Host header http.client sends: the port only when it is not the scheme's own."""
    host = pool.host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    default = 443 if pool.scheme == "https" else 80
    return host if pool.port in (None, default) else f"{host}:{pool.port}"


def _connect(conn: HTTPConnection, pool: urllib3.HTTPConnectionPool, target: str) -> None:
    """Open `conn` (urllib3's errors for a refused, timed-out or TLS-failed connect; a TLS
    handshake that times out is a read timeout there, as in urllib3's `urlopen`)."""
    try:
        conn.connect()
    except TransportError:
        raise
    except TimeoutError:
        raise ReadTimeoutError(
            pool, target, f"Read timed out. (read timeout={conn.timeout})"
        ) from None
    except ssl.SSLError as exc:
        raise SSLError(exc) from exc
    except OSError as exc:
        raise ProtocolError("Connection aborted.", exc) from exc


def _talk(
    sock: socket.socket,
    request: bytes,
    method: str,
    timeout: float,
    pool: urllib3.HTTPConnectionPool,
    target: str,
) -> tuple[Answer, bool]:
    """Send `request` in one write and read its answer; return it and whether the connection
    may carry the next call."""
    try:
        sock.settimeout(timeout)
        sock.sendall(request)
        with sock.makefile("rb") as reader:
            return _read_answer(reader, method)
    except TimeoutError:
        raise ReadTimeoutError(pool, target, f"Read timed out. (read timeout={timeout})") from None
    except ssl.SSLError as exc:
        raise SSLError(exc) from exc
    except zlib.error as exc:
        raise DecodeError("the answer's body could not be decoded", exc) from exc
    except (_Broken, OSError) as exc:
        raise ProtocolError("Connection aborted.", exc) from exc


def _read_answer(reader: Any, method: str) -> tuple[Answer, bool]:
    """Read one answer (after any 100 Continue) from `reader`."""
    while True:
        version, status, reason = _status_line(reader)
        headers = _header_block(reader)
        if status != 100:
            break
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    if method == "HEAD" or status in _NO_BODY or 100 <= status < 200:
        data = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        data = _chunked(reader)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise _Broken(f"Content-Length {headers['content-length']!r}") from None
        data = reader.read(length) if length > 0 else b""
        if len(data) < length:
            raise _Broken(f"answer ended after {len(data)} of {length} bytes")
    else:
        data, keep = reader.read(), False  # framed by the end of the connection
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding == "gzip":
        data = zlib.decompress(data, 16 + zlib.MAX_WBITS) if data else data
    elif encoding == "deflate" and data:
        try:
            data = zlib.decompress(data)
        except zlib.error:  # raw deflate, as some servers send it
            data = zlib.decompress(data, -zlib.MAX_WBITS)
    return Answer(status, reason, headers, data), keep


def _status_line(reader: Any) -> tuple[str, int, str]:
    line = reader.readline(MAX_LINE + 1)
    if not line:
        raise _Broken("the connection closed before an answer")
    if len(line) > MAX_LINE:
        raise _Broken("status line too long")
    version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
        raise _Broken(f"not an HTTP status line: {line[:40]!r}")
    return version, int(code), reason.strip()


def _header_block(reader: Any) -> dict[str, str]:
    """Read header lines up to the blank one; a repeated header's values joined by `, `."""
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = reader.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise _Broken("header line too long")
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise _Broken("the connection closed inside the header block")
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            continue  # not a header line (a folded continuation is obsolete): skipped
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raise _Broken(f"more than {MAX_HEADERS} headers")


def _chunked(reader: Any) -> bytes:
    """Read a chunked body and its trailer."""
    parts: list[bytes] = []
    while True:
        size_line = reader.readline(MAX_LINE + 1)
        if not size_line:
            raise _Broken("the connection closed inside a chunked body")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _Broken(f"chunk size {size_line[:20]!r}") from None
        if size == 0:
            _header_block(reader)  # the trailer, up to its blank line
            return b"".join(parts)
        chunk = reader.read(size)
        if len(chunk) < size or reader.readline(MAX_LINE + 1) not in (b"\r\n", b"\n"):
            raise _Broken("a chunk ended early")
        parts.append(chunk)
