"""The SSRF guard: address classification, odd encodings, resolve-and-pin."""

from __future__ import annotations

import pytest

from broker.webhooks import ssrf
from tests.webhook_receiver import receiver_fixture

_receiver = receiver_fixture  # the `receiver` fixture, for this module

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
