"""The SSRF guard: address classification, odd encodings, names IDNA cannot encode,
resolve-and-pin, TLS checked against the original host name, deadlines."""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.webhooks import ssrf

MUST_REFUSE = [
    "10.254.0.0",
    "192.168.10.65",
    "172.16.10.65",
    "0.1.2.3",
    "0.0.0.0",  # noqa: S104
    "127.0.0.1",
    "169.254.45.1",
    "255.255.255.255",
    "192.0.2.255",
    "198.51.100.65",
    "203.0.113.6",
    "100.100.0.0",
    "198.18.0.0",
    "::1",
    "::ffff:127.0.0.1",
    # beyond the table
    "169.254.169.254",
    "100.100.100.200",
    "fd00:ec2::254",
    "fe80::1",
    "224.0.0.1",
    "::ffff:10.0.0.1",
    "64:ff9b::7f00:1",
    "2002:7f00:1::",
    "::127.0.0.1",
    "::",
]


MUST_ALLOW = ["1.1.1.1", "2001:4860:4860::8888", "8.8.8.8", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", MUST_REFUSE)
def test_refuses_non_public(address):
    assert not ssrf.is_public_address(address)
    with pytest.raises(ssrf.BlockedAddress):
        host = f"[{address}]" if ":" in address else address
        ssrf.check_url(f"https://{host}/hook")


@pytest.mark.parametrize("address", MUST_ALLOW)
def test_allows_public(address):
    assert ssrf.is_public_address(address)
    host = f"[{address}]" if ":" in address else address
    target = ssrf.check_url(f"https://{host}/hook?x=1")
    assert target.address == address
    assert target.path == "/hook?x=1"


@pytest.mark.parametrize(
    "host",
    ["0177.0.0.1", "2130706433", "0x7f000001", "0x7f.1", "127.1", "017700000001", "0300.0250.1.1"],
)
def test_odd_ipv4_encodings_are_read_as_what_resolvers_make_of_them(host):
    literal = ssrf.parse_ip_literal(host)
    assert literal is not None and not ssrf.is_public_address(literal)
    with pytest.raises(ssrf.BlockedAddress):
        ssrf.check_url(f"https://{host}/")


def test_a_name_is_refused_if_any_address_is_private():
    def resolver(host, port):
        return ["1.1.1.1", "10.0.0.5"]

    with pytest.raises(ssrf.BlockedAddress, match="non-public"):
        ssrf.check_url("https://hooks.example.com/x", resolver=resolver)


def test_a_public_name_is_pinned_to_the_checked_address():
    calls = []

    def resolver(host, port):
        calls.append((host, port))
        return ["93.184.215.14"]

    target = ssrf.check_url("https://Hooks.Example.com:8443/in", resolver=resolver)
    assert calls == [("hooks.example.com", 8443)]
    assert target.address == "93.184.215.14"
    assert target.host_header == "hooks.example.com:8443"


@pytest.mark.parametrize(
    "url",
    [
        "http://1.1.1.1/x",  # https only
        "ftp://1.1.1.1/x",
        "https://user:pw@1.1.1.1/x",
        "https:///nohost",
        "https://1.1.1.1:99999/x",
        "https://nonexistent.invalid/x",
    ],
)
def test_bad_urls_are_refused(url):
    with pytest.raises(ssrf.BlockedAddress):
        ssrf.check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://ä..example.com/hook",  # an empty IDNA label
        "https://" + "ä" * 70 + ".example.com/hook",  # an IDNA label over 63 characters
        "https://\udcff.example.com/hook",  # a lone surrogate
    ],
)
def test_urls_the_idna_codec_cannot_encode_are_refused_not_crashed(url: str) -> None:
    """check_url answers BlockedAddress (a clean 422 upstream), never a raw UnicodeError."""
    with pytest.raises(ssrf.BlockedAddress):
        ssrf.check_url(url)


def test_allow_private_lets_loopback_through_for_tests():
    target = ssrf.check_url("http://127.0.0.1:8000/h", allow_private=True, require_https=False)
    assert (target.address, target.port, target.host_header) == (
        "127.0.0.1",
        8000,
        "127.0.0.1:8000",
    )


def test_dns_rebinding_cannot_swap_the_address(receiver):
    """The connection goes to the address that was checked, whatever DNS says afterwards."""
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])

    def resolver(host, port):
        return next(answers)

    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])
    target = ssrf.check_url(
        f"http://rebind.test:{port}/hook",
        allow_private=True,
        require_https=False,
        resolver=resolver,
    )
    resp = ssrf.post_pinned(target, b"{}", {"Content-Type": "application/json"}, timeout=5)
    assert resp.status == 204
    assert receiver.requests[0].headers["host"] == f"rebind.test:{port}"


def test_redirects_are_not_followed(receiver):
    receiver.respond((302, {"Location": "http://169.254.169.254/latest/meta-data"}))
    target = ssrf.check_url(receiver.url, allow_private=True, require_https=False)
    resp = ssrf.post_pinned(target, b"{}", {}, timeout=5)
    assert resp.status == 302
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("host", ["10.0.0.1", "169.254.169.254", "192.168.1.1", "[fd00::1]"])
def test_allow_private_still_refuses_everything_but_loopback(host):
    with pytest.raises(ssrf.BlockedAddress):
        ssrf.check_url(f"http://{host}/h", allow_private=True, require_https=False)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[int, Path, list[str]]]:
    """An HTTPS server on 127.0.0.1 with a certificate for `hook.test` from a private CA.

    Yields (port, CA file, server names the clients sent via SNI)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test CA")
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "k", "csr", "crt"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(ca), "-days", "2", "-subj", "/CN=review test CA")  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=hook.test")  # fmt: skip
    ext = tmp_path / "ext"
    ext.write_text("subjectAltName=DNS:hook.test\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    names: list[str] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    context.sni_callback = lambda sock, name, ctx: names.append(name or "")  # type: ignore[assignment,misc,return-value]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], ca, names
    finally:
        server.shutdown()
        server.server_close()


def test_pinned_https_checks_the_certificate_against_the_original_host_name(
    tls_receiver: tuple[int, Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Connecting to the checked IP still sends SNI and verifies the certificate for the name."""
    port, ca, names = tls_receiver
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))

    def pinned(host: str) -> ssrf.Target:
        return ssrf.Target(scheme="https", host=host, port=port, address="127.0.0.1", path="/h")

    ok = ssrf.post_pinned(pinned("hook.test"), b"{}", {}, timeout=5)
    assert (ok.status, ok.body) == (200, b"ok")
    assert names == ["hook.test"]
    with pytest.raises(Exception, match=r"(?i)hostname|match"):
        ssrf.post_pinned(pinned("other.test"), b"{}", {}, timeout=5)
    assert names[-1] == "other.test"
    untrusted = tmp_path / "empty.pem"
    untrusted.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(untrusted))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
        ssrf.post_pinned(pinned("hook.test"), b"{}", {}, timeout=5)


def test_a_receiver_trickling_its_answer_is_cut_at_the_deadline():
    """Per-read timeouts alone would let a byte every 0.3 s hold the worker for ~12 s."""
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Slow: yes\r\n\r\nok"

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in answer:  # bounded: ~12 s at most, ends early once the client hangs up
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.3)  # the slow peer's pace, not the test waiting

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    target = ssrf.check_url(
        f"http://127.0.0.1:{port}/hook", allow_private=True, require_https=False
    )
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 (urllib3 names the cut connection variously)
        ssrf.post_pinned(target, b"{}", {}, timeout=0.5)
    assert time.monotonic() - started < 3
    server.join(timeout=15)
    listener.close()
