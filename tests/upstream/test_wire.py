"""The Cloudflare client's own HTTP/1.1 exchange (broker.upstream.wire), against a real socket
server answering in the ways Cloudflare or a proxy in front of it may: chunked, gzip, framed by
the connection's end, cut short, silent."""

from __future__ import annotations

import gzip
import socket
import threading
import zlib
from collections.abc import Callable, Iterator

import pytest
import urllib3
from urllib3.exceptions import DecodeError, NewConnectionError, ProtocolError, ReadTimeoutError

from broker.upstream.wire import exchange

Reply = Callable[[bytes], bytes | None]


class Server:
    """A loopback server answering each request with `reply(request)` (None: say nothing and
    wait for the client to go; empty: close at once), keeping the connection unless the reply
    closes it."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
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
                request = head + reader.read(length)
                self.requests.append(request)
                answer = self.reply(request)
                if answer is None:
                    reader.read()  # silent until the client gives up
                    return
                if not answer:
                    return
                conn.sendall(answer)
                if b"connection: close" in answer.lower():
                    return

    def close(self) -> None:
        self.done.set()
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Reply], tuple[Server, urllib3.HTTPConnectionPool]]]:
    """Start a server with a reply; return it and a pool of connections to it."""
    started: list[tuple[Server, urllib3.HTTPConnectionPool]] = []

    def start(reply: Reply) -> tuple[Server, urllib3.HTTPConnectionPool]:
        server = Server(reply)
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
    _, pool = serve(lambda _: None)
    with pytest.raises(ReadTimeoutError):
        exchange(pool, "GET", "/", None, {}, timeout=0.2)
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
