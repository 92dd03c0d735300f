"""Refuse outgoing webhook requests to internal addresses (SSRF guard), and pin what was checked.

Pure module (no Flask): classify addresses, resolve a URL's host once, refuse it unless every
address is globally routable, and open the connection to the checked address itself, so a DNS
answer that changes between the check and the connection (DNS rebinding) cannot redirect it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges refused even where `is_global` says otherwise (or to be explicit about intent).
_BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT (and cloud metadata such as 100.100.100.200)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. 255.255.255.255
        "::/128",
        "::1/128",
        "fc00::/7",  # unique local, incl. fd00:ec2::254 (AWS metadata)
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
        "100::/64",  # discard-only
        "2001:db8::/32",
    )
)

Resolver = Callable[[str, int], list[str]]


class BlockedAddress(ValueError):
    """The URL is not allowed as a webhook target; the message says why (safe to show admins)."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address an IPv6 form carries (mapped, compatible, 6to4, NAT64, Teredo)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    packed = ip.packed
    if ip in ipaddress.ip_network("64:ff9b::/96") or ip in ipaddress.ip_network("64:ff9b:1::/48"):
        return ipaddress.IPv4Address(packed[-4:])
    if packed[:12] == bytes(12) and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(packed[-4:])
    return None


def is_public_address(address: str | IPAddress) -> bool:
    """Tell whether `address` is globally routable (and not an IPv6 disguise of a private one)."""
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public_address(inner):
            return False
    if any(ip in net for net in _BLOCKED_NETWORKS if net.version == ip.version):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def parse_ip_literal(host: str) -> IPAddress | None:
    """Read `host` as an IP literal, including the odd IPv4 spellings C resolvers accept
    (`0177.0.0.1`, `0x7f.1`, `2130706433`); None when it is a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefABCDEFxX." for c in host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve `host` with the system resolver; return every address it answers."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`address`), and the name to send as Host and SNI."""

    scheme: str
    host: str
    port: int
    address: str
    path: str  # path + query, ready for the request line

    @property
    def host_header(self) -> str:
        """Return the Host header value (port only when not the scheme's default)."""
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def check_url(
    url: str,
    *,
    allow_private: bool = False,
    require_https: bool = True,
    resolver: Resolver = system_resolver,
) -> Target:
    """Validate a webhook URL and resolve it; raise BlockedAddress unless it is safe to call.

    `allow_private` (development and tests only) lets loopback receivers through, nothing else
    (a metadata or LAN address stays refused even then).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BlockedAddress(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise BlockedAddress("the URL must use https")
    if scheme != "https" and require_https:
        raise BlockedAddress("the URL must use https")
    if parts.username is not None or parts.password is not None:
        raise BlockedAddress("credentials in the URL are not allowed")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise BlockedAddress("the URL has no host")
    port = port or (443 if scheme == "https" else 80)
    literal = parse_ip_literal(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            host.encode("ascii")
        except UnicodeEncodeError:
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:  # empty or overlong label, lone surrogate: not a host name
                raise BlockedAddress("the URL's host is not a valid domain name") from None
        try:
            addresses = resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise BlockedAddress(f"cannot resolve {host}: {exc}") from None
        if not addresses:
            raise BlockedAddress(f"cannot resolve {host}")
    bad = [a for a in addresses if not (is_public_address(a) or (allow_private and _loopback(a)))]
    if bad:
        raise BlockedAddress(f"{host} resolves to a non-public address ({bad[0]})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme=scheme, host=host, port=port, address=addresses[0], path=path)


@dataclass(frozen=True)
class PinnedResponse:
    """What a pinned request answered (the body is truncated)."""

    status: int
    headers: dict[str, str]
    body: bytes


def post_pinned(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    max_body: int = 4096,
) -> PinnedResponse:
    """POST `body` to the checked address of `target`, never following redirects.

    The TCP connection goes to `target.address`; the Host header, TLS SNI and certificate check
    use the original host name, so no second DNS lookup happens.
    """
    all_headers = {**headers, "Host": target.host_header}
    deadline = urllib3.Timeout(connect=timeout, read=timeout, total=timeout)
    if target.scheme == "https":
        pool: urllib3.HTTPConnectionPool = _WatchedHTTPSPool(
            target.address,
            target.port,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
            timeout=deadline,
            retries=False,
            maxsize=1,
        )
    else:
        pool = _WatchedHTTPPool(
            target.address, target.port, timeout=deadline, retries=False, maxsize=1
        )
    # Socket timeouts bound each read, not the whole answer: a receiver trickling a byte at a
    # time could hold a worker for hours. The watchdog cuts the connection at the deadline.
    watchdog = threading.Timer(timeout, _cut, args=(pool,))
    watchdog.daemon = True
    watchdog.start()
    try:
        resp = pool.urlopen(
            "POST",
            target.path,
            body=body,
            headers=all_headers,
            redirect=False,
            retries=False,
            preload_content=False,
            assert_same_host=False,
        )
        try:
            data = resp.read(max_body, decode_content=False) or b""
        finally:
            resp.release_conn()
            resp.close()
        return PinnedResponse(status=resp.status, headers=dict(resp.headers.items()), body=data)
    finally:
        watchdog.cancel()
        pool.close()


class _Watched:
    """Remembers the connections a pool opens, so a watchdog can cut them."""

    opened: list[Any]

    def _new_conn(self) -> Any:
        # A mixin: the pool class it is mixed into has `_new_conn`.
        conn = super()._new_conn()  # type: ignore[misc]
        self.__dict__.setdefault("opened", []).append(conn)
        return conn


class _WatchedHTTPPool(_Watched, urllib3.HTTPConnectionPool):
    pass


class _WatchedHTTPSPool(_Watched, urllib3.HTTPSConnectionPool):
    pass


def _cut(pool: urllib3.HTTPConnectionPool) -> None:
    """Shut down every socket `pool` opened (the attempt then fails with a connection error)."""
    for conn in getattr(pool, "opened", []):
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
