"""Bearer JWTs from the app's OpenID Connect issuer, verified with PyJWT against its JWKS.

Only asymmetric algorithms can be configured (`BROKER_OIDC_ALGORITHMS`, checked at start-up), and
a token's `alg` must be one of them before any key is chosen: `alg: none` and an HS256 token
"signed" with the issuer's public key are refused without being looked at further. The issuer's
keys come from its JWKS (found through OpenID discovery, or `BROKER_OIDC_JWKS_URL`), fetched with
a timeout and a size cap, kept for `JWKS_TTL`, and fetched again when a token names a key id we
do not hold (a rotation) — at most once per `REFRESH_COOLDOWN`, so tokens with made-up key ids
cannot make the broker hammer the issuer. `iss`, `aud`, `exp` (required) and `nbf` are checked
with `BROKER_OIDC_LEEWAY` seconds of leeway.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import requests
from flask import Flask

from broker.auth.external import valid_subject
from broker.platform.config import ConfigError, settings_of

log = logging.getLogger("broker.auth.oidc")

# RSA, RSA-PSS, ECDSA and EdDSA: algorithms whose verification key cannot sign.
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# The algorithms each key type (a JWK's `kty`) verifies.
_FAMILIES = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES384", "ES512"}),
    "OKP": frozenset({"EdDSA"}),
}
# Discovery documents and key sets are a few KiB; anything far bigger is not one.
MAX_DOCUMENT_BYTES = 256 * 1024
FETCH_TIMEOUT = 5.0
JWKS_TTL = 3600.0
REFRESH_COOLDOWN = 30.0


class IssuerUnavailable(Exception):
    """The issuer's keys could not be fetched and none are cached: no token can be checked."""


@dataclass(frozen=True)
class Identity:
    """Who a valid token speaks for: the issuer and the subject there."""

    issuer: str
    subject: str


def _fetch_json(url: str, timeout: float) -> dict[str, Any]:
    """GET a JSON object with a timeout, refusing redirects and bodies over the size cap."""
    try:
        with requests.get(url, timeout=timeout, stream=True, allow_redirects=False) as response:
            if response.status_code != 200:
                raise IssuerUnavailable(f"{url} answered {response.status_code}")
            body = b""
            for chunk in response.iter_content(16384):
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise IssuerUnavailable(f"{url} sent more than {MAX_DOCUMENT_BYTES} bytes")
    except requests.RequestException as exc:
        raise IssuerUnavailable(f"{url}: {type(exc).__name__}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise IssuerUnavailable(f"{url} did not send JSON") from None
    if not isinstance(data, dict):
        raise IssuerUnavailable(f"{url} did not send a JSON object")
    return data


class Verifier:
    """Check bearer JWTs of one issuer; holds that issuer's keys (thread-safe)."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        algorithms: frozenset[str],
        *,
        jwks_url: str | None = None,
        leeway: float = 30.0,
        timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.leeway = leeway
        self.timeout = timeout
        self._clock = clock
        self._jwks_url = jwks_url
        # kid → (key, the `alg` the key set declares for it, if any)
        self._keys: dict[str | None, tuple[jwt.PyJWK, str | None]] = {}
        self._fetched_at: float | None = None
        self._lock = threading.Lock()

    def verify(self, token: str) -> Identity | None:
        """Return the identity of a valid token, else None (raises IssuerUnavailable)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return None
        alg = header.get("alg")
        if alg not in self.algorithms:
            log.info("oidc token refused: algorithm %r is not allowed", alg)
            return None
        kid = header.get("kid")
        found = self._key(kid if isinstance(kid, str) else None)
        if found is None:
            log.info("oidc token refused: no key %r in the issuer's key set", kid)
            return None
        key, declared = found
        # A key is used only with the algorithm its set declares, else one of its own type's.
        if alg != (declared or alg) or alg not in _FAMILIES.get(key.key_type or "", ()):
            log.info("oidc token refused: %s does not fit key %r", alg, kid)
            return None
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            log.info("oidc token refused: %s", exc)
            return None
        subject = claims["sub"]
        if not isinstance(subject, str) or not valid_subject(subject):
            log.info("oidc token refused: unusable sub")
            return None
        return Identity(self.issuer, subject)

    def _key(self, kid: str | None) -> tuple[jwt.PyJWK, str | None] | None:
        """Return the signing key `kid` names, fetching the key set when stale or rotated."""
        now = self._clock()
        with self._lock:
            stale = self._fetched_at is None or now - self._fetched_at >= JWKS_TTL
            unknown = self._lookup(kid) is None
            cooled = self._fetched_at is None or now - self._fetched_at >= REFRESH_COOLDOWN
            if stale or (unknown and cooled):
                try:
                    self._refresh(now)
                except IssuerUnavailable:
                    if not self._keys:
                        raise
                    # Keep verifying with the keys we have; the issuer is asked again later.
                    log.warning("oidc key set refresh failed; keeping the cached keys")
                    self._fetched_at = now
            return self._lookup(kid)

    def _lookup(self, kid: str | None) -> tuple[jwt.PyJWK, str | None] | None:
        if kid is not None:
            return self._keys.get(kid)
        # A token without `kid` is only usable when the issuer publishes exactly one key.
        keys = list(self._keys.values())
        return keys[0] if len(keys) == 1 else None

    def _refresh(self, now: float) -> None:
        url = self._jwks_url or self._discover()
        document = _fetch_json(url, self.timeout)
        keys: dict[str | None, tuple[jwt.PyJWK, str | None]] = {}
        for entry in document.get("keys") or []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue  # a key type or curve we cannot use; the others still count
            declared = entry.get("alg")
            usable = {declared} if declared else _FAMILIES.get(key.key_type or "", frozenset())
            if usable & self.algorithms:
                keys[entry.get("kid")] = (key, declared)
        if not keys:
            raise IssuerUnavailable(f"{url} holds no usable signing key")
        self._keys = keys
        self._fetched_at = now

    def _discover(self) -> str:
        """Find the JWKS URL in the issuer's OpenID configuration (and remember it)."""
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = _fetch_json(url, self.timeout)
        if document.get("issuer") != self.issuer:
            raise IssuerUnavailable(f"{url} names another issuer")
        jwks_url = document.get("jwks_uri")
        if not isinstance(jwks_url, str) or not jwks_url.startswith(("https://", "http://")):
            raise IssuerUnavailable(f"{url} has no jwks_uri")
        if self.issuer.startswith("https://") and not jwks_url.startswith("https://"):
            raise IssuerUnavailable(f"{url} points at a plain-http jwks_uri")
        self._jwks_url = jwks_url
        return jwks_url


def parse_algorithms(value: Any) -> frozenset[str]:
    """Read BROKER_OIDC_ALGORITHMS (a list or comma-separated); refuse symmetric ones and none."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    algorithms = frozenset(str(n).strip() for n in names if str(n).strip())
    refused = sorted(algorithms - ASYMMETRIC)
    if refused or not algorithms:
        raise ConfigError(
            "BROKER_OIDC_ALGORITHMS may only name asymmetric algorithms "
            f"({', '.join(sorted(ASYMMETRIC))}); refused: {', '.join(refused) or 'none given'}"
        )
    return algorithms


def init_app(app: Flask) -> None:
    """Build the app's verifier when BROKER_OIDC_ISSUER is set; refuse an incomplete setup."""
    settings = settings_of(app)
    issuer = settings.oidc_issuer
    if not issuer:
        return
    audience = settings.oidc_audience
    if not audience:
        raise ConfigError("BROKER_OIDC_AUDIENCE is needed with BROKER_OIDC_ISSUER")
    if settings.env == "production":
        urls = {"OIDC_ISSUER": issuer, "OIDC_JWKS_URL": settings.oidc_jwks_url}
        plain = [name for name, url in urls.items() if url and not url.startswith("https://")]
        if plain:
            raise ConfigError(f"{', '.join('BROKER_' + p for p in plain)} must be https:// URLs")
    app.extensions["oidc"] = Verifier(
        issuer,
        audience,
        parse_algorithms(settings.oidc_algorithms),
        jwks_url=settings.oidc_jwks_url,
        leeway=settings.oidc_leeway,
    )
