"""A real OpenID Connect issuer for tests: RSA keys made here, discovery and JWKS over loopback.

`with serve_issuer() as idp:` serves `/.well-known/openid-configuration` and `/jwks.json` from a
threaded werkzeug server on 127.0.0.1:0, signs tokens with `idp.token(sub=…)`, publishes new
keys (`idp.publish(kid)`: a rotation), can answer the JWKS with a chosen status or an oversized
body, hang until released (`idp.hold`, with `idp.entered` set once a fetch is waiting) or trickle
it a byte per `idp.trickle()` call (the test paces the bytes, and advances its clock with them),
and counts JWKS fetches. It can also serve static files (`idp.files[path] = (type, bytes)`),
so one server stands for "the app": its identity provider and its pages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from werkzeug.wrappers import Request, Response

from tests.factories import live_server

AUDIENCE = "shop-app"


def b64url(data: bytes) -> str:
    """Base64url without padding, as JOSE writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Issuer:
    """The identity provider's keys, its server and its counters."""

    url: str = ""
    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    jwks_fetches: int = 0
    jwks_status: int = 200
    jwks_padding: int = 0  # bytes of filler added to the JWKS answer (size-cap tests)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    hold: threading.Event | None = None  # set: the JWKS answer waits until it is set
    entered: threading.Event = field(default_factory=threading.Event)
    trickle: Callable[[], bool] | None = None  # called before each byte; False stops the answer
    trickled: int = 0  # bytes of the JWKS sent one at a time

    def new_key(self, kid: str, *, publish: bool = True) -> rsa.RSAPrivateKey:
        """Make an RSA key pair named `kid`, published in the JWKS unless told otherwise."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.keys[kid] = key
        if publish:
            self.publish(kid)
        return key

    def publish(self, kid: str) -> None:
        """Add key `kid` to the JWKS (a rotation)."""
        if kid not in self.published:
            self.published.append(kid)

    def public_pem(self, kid: str) -> bytes:
        """Return the PEM of key `kid`'s public half."""
        return (
            self.keys[kid]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Claims of a valid token for `sub` alice-42, valid for five minutes from now."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "alice-42",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, kid: str = "k1", **overrides: Any) -> str:
        """Sign a token with key `kid` (RS256); `overrides` replace claims (None drops one)."""
        return jwt.encode(self.claims(**overrides), self.keys[kid], "RS256", headers={"kid": kid})

    def forged(self, alg: str, kid: str = "k1", **overrides: Any) -> str:
        """A token PyJWT would refuse to make: `alg: none`, or HS256 keyed with the public PEM."""
        header = b64url(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
        payload = b64url(json.dumps(self.claims(**overrides)).encode())
        signing_input = f"{header}.{payload}".encode()
        if alg == "none":
            return f"{header}.{payload}."
        mac = hmac.new(self.public_pem(kid), signing_input, hashlib.sha256).digest()
        return f"{header}.{payload}.{b64url(mac)}"

    def _jwks(self) -> dict[str, Any]:
        entries = []
        for kid in self.published:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
            entries.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        document: dict[str, Any] = {"keys": entries}
        if self.jwks_padding:
            document["padding"] = "x" * self.jwks_padding
        return document

    def _trickled(self, body: bytes) -> Iterator[bytes]:
        """Yield `body` a byte at a time, each when `trickle()` allows it."""
        for index in range(len(body)):
            if self.trickle is None or not self.trickle():
                return
            self.trickled += 1
            yield body[index : index + 1]

    def wsgi(self, environ: Any, start_response: Any) -> Any:
        """Serve discovery, the JWKS and the app's files."""
        request = Request(environ)
        if request.path == "/.well-known/openid-configuration":
            body = {"issuer": self.url, "jwks_uri": f"{self.url}/jwks.json"}
            response = Response(json.dumps(body), mimetype="application/json")
        elif request.path == "/jwks.json":
            self.jwks_fetches += 1
            self.entered.set()
            if self.hold is not None:
                self.hold.wait(30)
            body = json.dumps(self._jwks()).encode()
            content: Any = self._trickled(body) if self.trickle else body
            response = Response(content, status=self.jwks_status, mimetype="application/json")
        elif request.path in self.files:
            mimetype, content = self.files[request.path]
            response = Response(content, mimetype=mimetype)
        else:
            response = Response("not found", status=404)
        return response(environ, start_response)


@contextmanager
def serve_issuer() -> Iterator[Issuer]:
    """Serve a new issuer over real HTTP on a free loopback port; yield it."""
    issuer = Issuer()
    with live_server(issuer.wsgi) as url:
        issuer.url = url
        yield issuer
