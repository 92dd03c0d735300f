"""The Cloudflare client's own HTTP/1.1 exchange (broker.upstream.wire), against a real socket
server answering in the ways Cloudflare or a proxy in front of it may: chunked, gzip, framed by
the connection's end, cut short, silent."""

from __future__ import annotations

import gzip
import socket
import ssl
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from urllib3.exceptions import (
    DecodeError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from broker.upstream import wire
from broker.upstream.cloudflare import CloudflareImages
from broker.upstream.wire import MAX_BODY, exchange
from tests.support.tls import self_signed

Reply = Callable[[bytes], bytes | None]


class Server:
    """A loopback server answering each request with `reply(request)` (None: say nothing and
    wait for the client to go; empty: close at once), keeping the connection unless the reply
    closes it. With `head_only` it answers on the request's head and reads no body (through a
    small receive buffer: a large body then fills it); with `tls`, over TLS."""

    def __init__(
        self, reply: Reply, head_only: bool = False, tls: ssl.SSLContext | None = None
    ) -> None:
        self.reply = reply
        self.head_only = head_only
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.socket()
        if head_only:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:  # the client refused the certificate
                conn.close()
                return
        with conn, conn.makefile("rb") as reader:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head if self.head_only else head + reader.read(length)
                self.requests.append(request)
                answer = self.reply(request)
                if answer is None:
                    reader.read()  # silent until the client gives up
                    return
                if not answer:
                    return
                conn.sendall(answer)
                if self.head_only and length:
                    return  # the body unread: the close resets the connection
                if b"connection: close" in answer.lower():
                    return

    def close(self) -> None:
        self.done.set()
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Reply], tuple[Server, urllib3.HTTPConnectionPool]]]:
    """Start a server with a reply; return it and a pool of connections to it."""
    started: list[tuple[Server, urllib3.HTTPConnectionPool]] = []

    def start(reply: Reply, head_only: bool = False) -> tuple[Server, urllib3.HTTPConnectionPool]:
        server = Server(reply, head_only)
        pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=2)
        started.append((server, pool))
        return server, pool

    yield start
    for server, pool in started:
        pool.close()
        server.close()


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, ""]
    return ("\r\n".join(lines) + "\r\n").encode() + body


def test_one_write_carries_the_request_and_the_connection_is_kept(serve) -> None:
    server, pool = serve(lambda _: answer(b'{"ok":1}', "Content-Length: 8"))
    for n in range(3):
        got = exchange(pool, "POST", f"/v2/x?n={n}", b"body", {"X-Key": "v"}, timeout=5)
        assert (got.status, got.reason, got.data) == (200, "OK", b'{"ok":1}')
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v2/x?n=0 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nX-Key: v\r\n" in first and b"\r\nContent-Length: 4\r\n" in first
    assert first.endswith(b"\r\n\r\nbody")


def test_headers_are_read_in_lower_case_and_repeats_joined(serve) -> None:
    _, pool = serve(
        lambda _: answer(b"", "Retry-After: 7", "X-A: 1", "x-a: 2", "Content-Length: 0")
    )
    got = exchange(pool, "GET", "/", None, {}, timeout=5)
    assert got.headers["retry-after"] == "7"
    assert got.headers["x-a"] == "1, 2"


def test_a_chunked_and_gzipped_answer_is_decoded(serve) -> None:
    packed = gzip.compress(b'{"result":"chunked"}')
    body = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (packed[:5], packed[5:])
    )
    _, pool = serve(
        lambda _: answer(
            body + b"0\r\nX-Trailer: t\r\n\r\n",
            "Transfer-Encoding: chunked",
            "Content-Encoding: gzip",
        )
    )
    assert exchange(pool, "GET", "/", None, {}, timeout=5).data == b'{"result":"chunked"}'
    assert exchange(pool, "GET", "/", None, {}, timeout=5).data == b'{"result":"chunked"}'


def test_a_deflated_answer_is_decoded(serve) -> None:
    packed = zlib.compress(b"deflated")
    _, pool = serve(
        lambda _: answer(packed, f"Content-Length: {len(packed)}", "Content-Encoding: deflate")
    )
    assert exchange(pool, "GET", "/", None, {}, timeout=5).data == b"deflated"


def test_an_answer_framed_by_the_end_of_the_connection_closes_it(serve) -> None:
    server, pool = serve(lambda _: answer(b"to the end", "Connection: close"))
    assert exchange(pool, "GET", "/", None, {}, timeout=5).data == b"to the end"
    assert exchange(pool, "GET", "/", None, {}, timeout=5).data == b"to the end"
    assert server.connections == 2  # never reused


def test_a_body_shorter_than_announced_is_a_broken_connection(serve) -> None:
    server, pool = serve(lambda _: answer(b"short", "Content-Length: 50", "Connection: close"))
    with pytest.raises(ProtocolError):
        exchange(pool, "POST", "/", b"", {}, timeout=5)
    assert len(server.requests) == 1


@pytest.mark.parametrize("garbage", [b"", b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 20 OK\r\n\r\n"])
def test_what_is_not_an_http_answer_is_a_broken_connection(serve, garbage: bytes) -> None:
    _, pool = serve(lambda _: garbage + b"Connection: close\r\n\r\n" if garbage else b"")
    with pytest.raises(ProtocolError):
        exchange(pool, "GET", "/", None, {}, timeout=5)


def test_a_silent_server_is_a_read_timeout_and_the_connection_is_dropped(serve) -> None:
    server, pool = serve(
        lambda _: None if len(server.requests) > 1 else answer(b"", "Content-Length: 0")
    )
    exchange(pool, "GET", "/", None, {}, timeout=5)  # connected: the next call only reads
    with pytest.raises(ReadTimeoutError):
        exchange(pool, "GET", "/", None, {}, timeout=0.001)
    assert pool.pool is not None and all(c is None or c.sock is None for c in pool.pool.queue)


def test_a_refused_connection_is_urllib3s_own_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        pool = urllib3.HTTPConnectionPool("127.0.0.1", port)
        with pytest.raises(NewConnectionError):
            exchange(pool, "POST", "/", b"x", {}, timeout=5)


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/v1/a b", {}),
        ("/v1/a\r\nX-Injected: 1", {}),
        ("/v1/ok", {"Authorization": "Bearer t\r\nX-Injected: 1"}),
        ("/v1/ok", {"X-Bad\nName": "v"}),
    ],
)
def test_nothing_is_sent_that_could_inject_a_header(serve, target, headers) -> None:
    server, pool = serve(lambda _: answer(b"", "Content-Length: 0"))
    with pytest.raises(ValueError) as refused:
        exchange(pool, "GET", target, None, headers, timeout=5)
    assert "Bearer t" not in str(refused.value)  # a value (a token) is never repeated
    assert server.requests == []


def test_a_body_its_encoding_does_not_decode_is_urllib3s_decode_error(serve) -> None:
    _, pool = serve(lambda _: answer(b"not gzip", "Content-Length: 8", "Content-Encoding: gzip"))
    with pytest.raises(DecodeError):
        exchange(pool, "GET", "/", None, {}, timeout=5)


def test_interim_answers_are_skipped_and_each_call_reads_its_own_answer(serve) -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
    server, pool = serve(
        lambda request: interim + answer(request.split(b" ")[1], "Content-Length: 2")
    )
    for target in ("/a", "/b"):  # one connection: call /b must not read /a's answer
        got = exchange(pool, "POST", target, b"", {}, timeout=5)
        assert (got.status, got.data) == (200, target.encode())
    assert server.connections == 1


def test_endless_interim_answers_are_a_broken_connection(serve) -> None:
    _, pool = serve(
        lambda _: b"HTTP/1.1 103 Early Hints\r\n\r\n" * 11 + answer(b"", "Content-Length: 0")
    )
    with pytest.raises(ProtocolError):
        exchange(pool, "GET", "/", None, {}, timeout=5)


def test_an_upgrade_no_one_asked_for_is_a_broken_connection(serve) -> None:
    _, pool = serve(lambda _: answer(b"", "Upgrade: h2c", status="101 Switching Protocols"))
    with pytest.raises(ProtocolError):
        exchange(pool, "GET", "/", None, {}, timeout=5)


def test_an_early_answer_to_a_large_upload_is_read(serve) -> None:
    """The server refuses on the head alone and closes without reading 8 MB: its answer is
    what the caller sees (a connection error would hide Cloudflare's 413 and its message)."""
    refusal = b'{"success":false}'
    server, pool = serve(
        lambda _: answer(
            refusal, f"Content-Length: {len(refusal)}", "Connection: close", status="413 Too Large"
        ),
        head_only=True,
    )
    for _ in range(2):
        got = exchange(pool, "POST", "/v1", b"x" * (8 << 20), {}, timeout=5)
        assert (got.status, got.data) == (413, refusal)
    assert server.connections == 2


def test_a_timeout_while_sending_is_a_broken_connection_as_urllib3_said(serve) -> None:
    """urllib3 raised a timeout while sending as ProtocolError, not ReadTimeoutError: the
    caller's rules (a read timeout is never retried) see the same."""
    released = threading.Event()

    def reply(_: bytes) -> bytes | None:
        if len(server.requests) == 1:
            return answer(b"", "Content-Length: 0")
        released.wait(5)  # reads nothing until the client gave up
        return None

    server, pool = serve(reply, head_only=True)
    exchange(pool, "GET", "/", None, {}, timeout=5)  # connected: the next call only sends
    try:
        with pytest.raises(ProtocolError) as failed:
            exchange(pool, "POST", "/", b"x" * (32 << 20), {}, timeout=0.01)
    finally:
        released.set()
    assert isinstance(failed.value.args[1], TimeoutError)


@pytest.mark.parametrize(
    "status_line",
    [
        "HTTP/1.1 2\u00b20 OK",  # '²': str.isdigit says yes, int() refuses
        "HTTP/1.1 099 Low",
        "HTTP/2 200 OK",
        "HTTP/1.1 +20 OK",
        "HTTP/1.1  200 OK",
    ],
)
def test_a_status_line_outside_the_grammar_is_a_broken_connection(serve, status_line) -> None:
    raw = f"{status_line}\r\nContent-Length: 0\r\n\r\n".encode("latin-1")
    _, pool = serve(lambda _: raw)
    with pytest.raises(ProtocolError):
        exchange(pool, "GET", "/", None, {}, timeout=5)


@pytest.mark.parametrize(
    "length",
    ["-1", "+2", "0_2", "2, 3", "2 2", "", "0x2", str(MAX_BODY + 1), "1" * 5000, "\xa02"],
)
def test_a_content_length_outside_the_grammar_is_a_broken_connection(serve, length) -> None:
    raw = f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\nok".encode("latin-1")
    _, pool = serve(lambda _: raw)
    with pytest.raises(ProtocolError):
        exchange(pool, "GET", "/", None, {}, timeout=5)


def test_a_repeated_content_length_that_agrees_is_read(serve) -> None:
    _, pool = serve(lambda _: answer(b"ok", "Content-Length: 2", "Content-Length: 2"))
    assert exchange(pool, "GET", "/", None, {}, timeout=5).data == b"ok"


@pytest.mark.parametrize(
    "headers",
    [
        ("X-A: 1", " folded: 2", "Content-Length: 2"),  # an obsolete fold
        ("X-A: 1", "\tfolded", "Content-Length: 2"),
        ("Content-Length : 2",),  # whitespace before the colon
        ("no colon", "Content-Length: 2"),
        ("Transfer-Encoding: gzip, chunked",),  # a coding we do not undo
        ("Transfer-Encoding: chunked, gzip",),  # the last coding not chunked
        ("Transfer-Encoding: identity", "Content-Length: 2"),
    ],
)
def test_headers_readers_could_disagree_on_are_a_broken_connection(serve, headers) -> None:
    _, pool = serve(lambda _: answer(b"2\r\nok\r\n0\r\n\r\n", *headers))
    with pytest.raises(ProtocolError):
        exchange(pool, "GET", "/", None, {}, timeout=5)


@pytest.mark.parametrize(
    ("status", "headers", "reused"),
    [
        ("HTTP/1.1 200 OK", ("Content-Length: 2",), True),
        ("HTTP/1.1 200 OK", ("Transfer-Encoding: chunked", "Content-Length: 2"), False),
        ("HTTP/1.0 200 OK", ("Content-Length: 2",), False),
        ("HTTP/1.0 200 OK", ("Content-Length: 2", "Connection: Keep-Alive"), True),
        ("HTTP/1.1 200 OK", ("Content-Length: 2", "Connection: te, close"), False),
    ],
)
def test_a_connection_is_reused_only_when_the_answer_says_it_may(
    serve, status, headers, reused
) -> None:
    chunked = any(h.startswith("Transfer") for h in headers)
    body = b"2\r\nok\r\n0\r\n\r\n" if chunked else b"ok"
    raw = ("\r\n".join([status, *headers, "", ""])).encode() + body
    server, pool = serve(lambda _: raw)
    for _ in range(2):
        assert exchange(pool, "GET", "/", None, {}, timeout=5).data == b"ok"
    assert server.connections == (1 if reused else 2)


def test_sizes_over_the_cap_are_refused_before_they_are_read(serve) -> None:
    huge = [
        answer(b"", f"Content-Length: {10**15}"),
        answer(b"ffffffffffff\r\nok", "Transfer-Encoding: chunked"),
        answer(b"8000000\r\n", "Transfer-Encoding: chunked"),  # 128 MiB in one chunk
        answer(b"x" * (MAX_BODY + 1), "Connection: close"),  # to the end of the connection
    ]
    _, pool = serve(lambda request: huge[int(request.split(b" ")[1][1:])])
    for n in range(len(huge)):
        with pytest.raises(ProtocolError):
            exchange(pool, "GET", f"/{n}", None, {}, timeout=5)


@pytest.mark.parametrize(
    ("encoding", "body", "decoded"),
    [
        ("gzip", gzip.compress(b"one,") + gzip.compress(b"two"), b"one,two"),
        ("gzip", gzip.compress(b"one") + b"junk", DecodeError),
        ("gzip", gzip.compress(b"one")[:-4], DecodeError),
        ("deflate", zlib.compress(b"one") + b"junk", DecodeError),
        ("gzip", gzip.compress(bytes(MAX_BODY)), bytes(MAX_BODY)),
        ("gzip", gzip.compress(bytes(MAX_BODY + 1)), ProtocolError),
    ],
    ids=["two-members", "bytes-after", "cut-short", "deflate-bytes-after", "at-cap", "bomb"],
)
def test_compressed_bodies_are_decoded_whole_and_no_further(serve, encoding, body, decoded) -> None:
    _, pool = serve(
        lambda _: answer(body, f"Content-Length: {len(body)}", f"Content-Encoding: {encoding}")
    )
    if isinstance(decoded, bytes):
        assert exchange(pool, "GET", "/", None, {}, timeout=5).data == decoded
    else:
        with pytest.raises(decoded):
            exchange(pool, "GET", "/", None, {}, timeout=5)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway certificate for 127.0.0.1: the server's context and a client's trusting it."""
    cert, key = self_signed(tmp_path_factory.mktemp("tls"), "wire.test")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def test_an_https_answer_is_read_over_the_pools_verified_tls(tls_pair) -> None:
    server_tls, client_tls = tls_pair
    packed = gzip.compress(b'{"over":"tls"}')
    server = Server(
        lambda _: answer(packed, f"Content-Length: {len(packed)}", "Content-Encoding: gzip"),
        tls=server_tls,
    )
    pool = urllib3.HTTPSConnectionPool("127.0.0.1", server.port, ssl_context=client_tls)
    try:
        for n in range(2):
            got = exchange(pool, "POST", f"/v2/x?n={n}", b"body", {}, timeout=5)
            assert (got.status, got.data) == (200, b'{"over":"tls"}')
        assert server.connections == 1
        assert server.requests[0].startswith(b"POST /v2/x?n=0 HTTP/1.1\r\nHost: 127.0.0.1:")
    finally:
        pool.close()
        server.close()


def test_an_unknown_certificate_is_urllib3s_ssl_error(tls_pair) -> None:
    server = Server(lambda _: answer(b"", "Content-Length: 0"), tls=tls_pair[0])
    pool = urllib3.HTTPSConnectionPool(
        "127.0.0.1", server.port, ssl_context=ssl.create_default_context()
    )
    try:
        with pytest.raises(SSLError):
            exchange(pool, "GET", "/", None, {}, timeout=5)
        assert server.requests == []
    finally:
        pool.close()
        server.close()


def test_the_client_sends_buffered_calls_over_the_wire_and_streams_and_proxied_through_urllib3(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which path a call takes: the point of `wire` is lost if the client never uses it, and
    a stream or a proxy it cannot carry must not reach it."""
    envelope = b'{"success":true,"result":{"count":{"current":1,"allowed":9}}}'
    server, _ = serve(lambda _: answer(envelope, f"Content-Length: {len(envelope)}"))
    origin = f"http://127.0.0.1:{server.port}"
    through_wire: list[str] = []
    real_exchange = wire.exchange

    def counted(pool: urllib3.HTTPConnectionPool, method: str, target: str, *args: Any) -> Any:
        through_wire.append(target)
        return real_exchange(pool, method, target, *args)

    monkeypatch.setattr(wire, "exchange", counted)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)

    direct = CloudflareImages(f"{origin}/client/v4", "acct", "t", timeout=5)
    try:
        assert direct.stats().allowed == 9
        assert through_wire == ["/client/v4/accounts/acct/images/v1/stats"]
        blob = direct.open_blob("img")
        try:
            assert blob.read() == envelope
        finally:
            blob.close()
            blob.release_conn()
        assert len(through_wire) == 1  # the stream went through urllib3
    finally:
        direct.close()

    monkeypatch.setenv("HTTP_PROXY", origin)  # the same server, acting as the proxy
    proxied = CloudflareImages("http://api.example.test/client/v4", "acct", "t", timeout=5)
    try:
        assert proxied.stats().allowed == 9
    finally:
        proxied.close()
    assert len(through_wire) == 1
    assert server.requests[-1].startswith(
        b"GET http://api.example.test/client/v4/accounts/acct/images/v1/stats HTTP/1.1\r\n"
    )
