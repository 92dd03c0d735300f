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
  `SSLError`), `ReadTimeoutError` for a timeout once the request is sent, `SSLError` for TLS
  failing later, `ProtocolError` for a connection that broke (a timeout while sending
  included) or an answer that is not HTTP, `DecodeError` for a body its encoding does not
  decode, so the caller's retry rules see the same;
- a request line or header value holding a control character is refused before anything is
  sent (no header injection through an id or a token);
- a server that answers early and stops reading (a 413 to a large upload) has its answer read;
- interim answers (1xx) are skipped to the final one; 101 is refused (no upgrade is asked);
- the answer is framed by `Transfer-Encoding: chunked`, else `Content-Length` (ASCII digits,
  repeats equal), else the end of the connection; a body shorter than announced is an error;
  `gzip` (every member) and `deflate` bodies are decoded (the client asks for them);
- where readers could disagree on the answer, it is refused: a folded header line,
  whitespace before a header's colon, any transfer coding but `chunked` alone, bytes after a
  compressed body; a body over 16 MiB, as sent or decoded, too (before it is allocated);
- a connection goes back to the pool only when the answer left it clean for the next call:
  the request sent whole, keep-alive (an HTTP/1.0 answer must say so), fully read, not framed
  by both `Transfer-Encoding` and `Content-Length`; otherwise it is closed first.
"""

from __future__ import annotations

import errno
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
# Interim (1xx) answers skipped before the final one: each read has a timeout, the call none.
MAX_INTERIM = 10
# Optional whitespace around a header value or list item (RFC 9110 §5.6.3): spaces and tabs only.
_OWS = " \t"
# What may not appear in the request line's target, or in a header name or value (CR, LF and
# the other control characters http.client refuses).
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]")
_UNSAFE_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NO_BODY = frozenset({204, 304})
# An answer's body, as sent and decoded (Cloudflare's are a few KiB): a larger one is refused
# before anything is allocated for it.
MAX_BODY = 16 * 1024 * 1024
# The grammar's own characters, ASCII only (str.isdigit takes '²', int() takes '-1' and '1_0').
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: ([^\r\n]*))?\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS = re.compile(r"[0-9]{1,18}")  # int() refuses over 4300 digits: a bare ValueError
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;[^\r\n]*)?\r?\n")


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
    sock.settimeout(timeout)
    sent = _send(sock, request)
    try:
        with sock.makefile("rb") as reader:
            answer, keep = _read_answer(reader, method)
        return answer, keep and sent
    except TimeoutError:
        raise ReadTimeoutError(pool, target, f"Read timed out. (read timeout={timeout})") from None
    except ssl.SSLError as exc:
        raise SSLError(exc) from exc
    except zlib.error as exc:
        raise DecodeError("the answer's body could not be decoded", exc) from exc
    except (_Broken, OSError) as exc:
        raise ProtocolError("Connection aborted.", exc) from exc


def _send(sock: socket.socket, request: bytes) -> bool:
    """Send `request`; False when the server stopped taking it, having answered early and
    closed (a 413 to a large upload): its answer is read all the same, as urllib3 did."""
    try:
        sock.sendall(request)
    except (BrokenPipeError, ConnectionResetError):
        return False
    except ssl.SSLError as exc:
        raise SSLError(exc) from exc
    except OSError as exc:  # a timeout too: urllib3 left it unnamed while sending
        if exc.errno == errno.EPROTOTYPE:  # macOS's word for the early close
            return False
        raise ProtocolError("Connection aborted.", exc) from exc
    return True


def _read_answer(reader: Any, method: str) -> tuple[Answer, bool]:
    """Read the final answer (after any 1xx interim ones) from `reader`; return it and
    whether it left the connection clean."""
    for _ in range(MAX_INTERIM + 1):
        status, reason, http11 = _status_line(reader)
        headers = _header_block(reader)
        if status == 101:
            raise _Broken("101 Switching Protocols, and no upgrade was asked")
        if status >= 200:
            break
    else:
        raise _Broken(f"more than {MAX_INTERIM} interim answers")
    tokens = {token.strip(_OWS).lower() for token in headers.get("connection", "").split(",")}
    keep = "close" not in tokens if http11 else "keep-alive" in tokens
    chunked = "transfer-encoding" in headers
    if chunked:
        if headers["transfer-encoding"].strip(_OWS).lower() != "chunked":
            raise _Broken(f"Transfer-Encoding {headers['transfer-encoding']!r}")
        # Both framings announced: whichever the server meant, the next call cannot trust it.
        keep = keep and "content-length" not in headers
    if method == "HEAD" or status in _NO_BODY:
        data = b""
    elif chunked:
        data = _chunked(reader)
    elif "content-length" in headers:
        data = _exactly(reader, _content_length(headers["content-length"]))
    else:
        data, keep = reader.read(MAX_BODY + 1), False  # framed by the end of the connection
        if len(data) > MAX_BODY:
            raise _Broken(f"an answer over {MAX_BODY} bytes")
    encoding = headers.get("content-encoding", "").strip(_OWS).lower()
    if data and encoding == "gzip":
        data = _inflate(data, 16 + zlib.MAX_WBITS, members=True)
    elif data and encoding == "deflate":
        try:
            data = _inflate(data, zlib.MAX_WBITS, members=False)
        except zlib.error:  # raw deflate, as some servers send it
            data = _inflate(data, -zlib.MAX_WBITS, members=False)
    return Answer(status, reason, headers, data), keep


def _line(reader: Any, what: str) -> bytes:
    line = reader.readline(MAX_LINE + 1)
    if not line:
        raise _Broken(f"the connection closed before the {what}")
    if len(line) > MAX_LINE:
        raise _Broken(f"{what} too long")
    return cast(bytes, line)


def _status_line(reader: Any) -> tuple[int, str, bool]:
    """The status, reason and whether the answer is HTTP/1.1."""
    line = _line(reader, "status line")
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise _Broken(f"not an HTTP status line: {line[:40]!r}")
    return int(match[2]), (match[3] or b"").decode("latin-1").strip(), match[1] == b"1"


def _header_block(reader: Any) -> dict[str, str]:
    """Read header lines up to the blank one; a repeated header's values joined by `, `."""
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = _line(reader, "end of the header block")
        if line in (b"\r\n", b"\n"):
            return headers
        name, colon, value = line.partition(b":")
        # A line opening with whitespace (an obsolete fold) or a name followed by whitespace:
        # read one way here and another by a proxy on the way, refused.
        if not colon or not _TOKEN.fullmatch(name):
            raise _Broken(f"not a header line: {line[:40]!r}")
        key, text = name.decode("ascii").lower(), value.strip(b" \t\r\n").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    raise _Broken(f"more than {MAX_HEADERS} headers")


def _content_length(value: str) -> int:
    """The length a Content-Length announces; repeats must agree."""
    lengths = {part.strip(_OWS) for part in value.split(",")}
    if len(lengths) != 1 or not _DIGITS.fullmatch(digits := lengths.pop()):
        raise _Broken(f"Content-Length {value[:40]!r}")
    return int(digits)


def _exactly(reader: Any, size: int) -> bytes:
    """Read `size` bytes, refusing a size over the cap before reading any."""
    if size > MAX_BODY:
        raise _Broken(f"an answer of {size} bytes, over {MAX_BODY}")
    data = reader.read(size) if size else b""
    if len(data) < size:
        raise _Broken(f"answer ended after {len(data)} of {size} bytes")
    return cast(bytes, data)


def _chunked(reader: Any) -> bytes:
    """Read a chunked body and its trailer."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = _line(reader, "chunk size")
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None:
            raise _Broken(f"chunk size {line[:20]!r}")
        size = int(match[1], 16)
        if size == 0:
            _header_block(reader)  # the trailer, up to its blank line
            return b"".join(parts)
        total += size
        if total > MAX_BODY:
            raise _Broken(f"a chunked answer over {MAX_BODY} bytes")
        parts.append(_exactly(reader, size))
        if reader.readline(3) not in (b"\r\n", b"\n"):
            raise _Broken("a chunk ended early")


def _inflate(data: bytes, wbits: int, *, members: bool) -> bytes:
    """Decompress `data` whole (gzip's `members` one after another), at most MAX_BODY bytes;
    zlib.error for a stream cut short or bytes after it."""
    out = bytearray()
    while data:
        stream = zlib.decompressobj(wbits)
        out += stream.decompress(data, MAX_BODY + 1 - len(out))  # never 0: that is no limit
        if len(out) > MAX_BODY:
            raise _Broken(f"an answer decoding to over {MAX_BODY} bytes")
        if not stream.eof:
            raise zlib.error("the compressed stream ends early")
        data = stream.unused_data
        if data and not members:
            raise zlib.error("bytes after the compressed stream")
    return bytes(out)
