"""Bearer JWTs from the app's OpenID Connect issuer, verified with PyJWT against its JWKS.

Only asymmetric algorithms can be configured (`BROKER_OIDC_ALGORITHMS`, checked at start-up), and
a token's `alg` must be one of them before any key is chosen: `alg: none` and an HS256 token
"signed" with the issuer's public key are refused without being looked at further. The issuer's
keys come from its JWKS (found through OpenID discovery, or `BROKER_OIDC_JWKS_URL`), fetched with
a size cap and a total deadline (`FETCH_DEADLINE` for the whole fetch, however slowly the issuer
trickles its answer), kept for `JWKS_TTL`, and fetched again when a token names a key id we do
not hold (a rotation) — at most once per `REFRESH_COOLDOWN`, so tokens with made-up key ids
cannot make the broker hammer the issuer. `iss`, `aud`, `exp` (required) and `nbf` are checked
with `BROKER_OIDC_LEEWAY` seconds of leeway.

An issuer that is down or slow cannot stall the web tier: one request at a time fetches, outside
any lock the others wait on — they verify with the last good keys meanwhile. Only while no key
was ever fetched (the first requests after a start) do they wait for that fetch, at most its
deadline; after a failed one they are refused at once (IssuerUnavailable, with the seconds until
the next attempt). After a failed
fetch the next waits `MIN_FETCH_INTERVAL` seconds, doubling with each further failure up to
`MAX_BACKOFF`: whatever tokens arrive, the issuer sees at most one fetch per interval.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import requests
import urllib3
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
FETCH_DEADLINE = 5.0
JWKS_TTL = 3600.0
REFRESH_COOLDOWN = 30.0
MIN_FETCH_INTERVAL = 5.0
MAX_BACKOFF = 300.0
_CHUNK = 16384


def _numeric_date(value: object) -> bool:
    """Tell whether a time claim is a JSON number (not a string, nor a boolean)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class IssuerUnavailable(Exception):
    """The issuer's keys could not be fetched and none are cached: no token can be checked."""

    def __init__(self, message: str, retry_after: float = MIN_FETCH_INTERVAL) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenRefused(Exception):
    """A token the issuer's keys and claims do not vouch for, and why: `reason` is one of
    `invalid`, `expired`, `wrong_audience`, `wrong_issuer` (the holder may be told; it says
    nothing of anyone else's tokens)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# PyJWT's claim errors that have a reason of their own; any other refusal is `invalid`.
_CLAIM_REASONS: tuple[tuple[type[jwt.InvalidTokenError], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
)


@dataclass(frozen=True)
class Identity:
    """Who a valid token speaks for: the issuer and the subject there, and the token's claims
    (an upload profile may be limited to tokens carrying some claim)."""

    issuer: str
    subject: str
    claims: dict[str, Any] = field(default_factory=dict, compare=False)


def _fetch_json(url: str, deadline: float, clock: Callable[[], float]) -> dict[str, Any]:
    """GET a JSON object by `deadline` (on `clock`), refusing redirects and oversized bodies."""

    def remaining() -> float:
        left = deadline - clock()
        if left <= 0:
            raise IssuerUnavailable(f"{url} did not answer within {FETCH_DEADLINE:g} s")
        return left

    try:
        wait = remaining()
        with requests.get(url, timeout=wait, stream=True, allow_redirects=False) as response:
            if response.status_code != 200:
                raise IssuerUnavailable(f"{url} answered {response.status_code}")
            body = bytearray()
            # read1 returns what one read of the socket brings: a byte trickled every few
            # seconds (each read within the socket timeout) still meets the deadline here.
            # urllib3 keeps its connection private; without it, each read may wait the full
            # socket timeout set above (still bounded, just not by the remaining time).
            sock = getattr(getattr(response.raw, "_connection", None), "sock", None)
            while left := remaining():
                if sock is not None:
                    sock.settimeout(left)
                chunk = response.raw.read1(_CHUNK, decode_content=True)
                if not chunk:
                    break
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise IssuerUnavailable(f"{url} sent more than {MAX_DOCUMENT_BYTES} bytes")
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
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
        deadline: float = FETCH_DEADLINE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.leeway = leeway
        self.deadline = deadline
        self._clock = clock
        self._jwks_url = jwks_url
        # kid → (key, the `alg` the key set declares for it, if any)
        self._keys: dict[str | None, tuple[jwt.PyJWK, str | None]] = {}
        self._fetched_at: float | None = None  # the last good fetch
        self._failures = 0  # in a row, since the last good fetch
        self._next_fetch = 0.0  # no fetch starts before this moment
        self._fetch_done: threading.Event | None = None  # set when the fetch in flight ends
        # Guards the fields above for a few instructions; never held while the issuer is asked.
        self._state = threading.Lock()

    def verify(self, token: str) -> Identity | None:
        """Return the identity of a valid token, else None (raises IssuerUnavailable)."""
        try:
            return self.check(token)
        except TokenRefused:
            return None

    def check(self, token: str) -> Identity:
        """Return the identity of a valid token; TokenRefused says why not (raises
        IssuerUnavailable when no key can be had)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenRefused("invalid", "not a JWT") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            log.info("oidc token refused: algorithm %r is not allowed", alg)
            raise TokenRefused("invalid", "signing algorithm not accepted")
        kid = header.get("kid")
        found = self._key(kid if isinstance(kid, str) else None)
        if found is None:
            log.info("oidc token refused: no key %r in the issuer's key set", kid)
            raise TokenRefused("invalid", "signed with a key the issuer does not publish")
        key, declared = found
        # A key is used only with the algorithm its set declares, else one of its own type's.
        if alg != (declared or alg) or alg not in _FAMILIES.get(key.key_type or "", ()):
            log.info("oidc token refused: %s does not fit key %r", alg, kid)
            raise TokenRefused("invalid", "signing algorithm does not fit the key")
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
            reason = next((r for kind, r in _CLAIM_REASONS if isinstance(exc, kind)), "invalid")
            raise TokenRefused(reason, str(exc)) from None
        if not all(_numeric_date(claims[name]) for name in ("exp", "nbf", "iat") if name in claims):
            # PyJWT reads "1893456000" as a time too; RFC 7519 says a NumericDate is a number.
            raise TokenRefused("invalid", "a time claim is not a number")
        subject = claims["sub"]
        if not isinstance(subject, str) or not valid_subject(subject):
            log.info("oidc token refused: unusable sub")
            raise TokenRefused("invalid", "unusable sub claim")
        return Identity(self.issuer, subject, claims)

    def _key(self, kid: str | None) -> tuple[jwt.PyJWK, str | None] | None:
        """Return the signing key `kid` names, fetching the key set when stale or rotated."""
        now = self._clock()
        with self._state:
            found = self._lookup(kid)
            fetched = self._fetched_at
            stale = fetched is None or now - fetched >= JWKS_TTL
            rotated = found is None and (fetched is None or now - fetched >= REFRESH_COOLDOWN)
            in_flight = self._fetch_done
            ours = (stale or rotated) and in_flight is None and now >= self._next_fetch
            if not ours:
                if self._keys:
                    return found
                retry = max(self._next_fetch - now, 1.0)
            else:
                self._fetch_done = threading.Event()
        if not ours:
            return self._wait_for_first_keys(kid, in_flight, retry)
        try:
            keys = self._fetch_keys(now + self.deadline)
        except IssuerUnavailable as exc:
            return self._fetch_failed(kid, exc)
        except BaseException:
            with self._state:
                self._fetch_ended()
            raise
        with self._state:
            self._fetch_ended()
            self._keys, self._fetched_at, self._failures = keys, now, 0
            self._next_fetch = now + MIN_FETCH_INTERVAL
            return self._lookup(kid)

    def _wait_for_first_keys(
        self, kid: str | None, in_flight: threading.Event | None, retry: float
    ) -> tuple[jwt.PyJWK, str | None] | None:
        """Wait (at most a fetch's deadline) for the first key set, if it is being fetched."""
        if in_flight is not None and in_flight.wait(self.deadline):
            with self._state:
                if self._keys:
                    return self._lookup(kid)
                retry = max(self._next_fetch - self._clock(), 1.0)
        raise IssuerUnavailable("the issuer's keys are not fetched yet", retry)

    def _fetch_ended(self) -> None:
        """Mark the fetch in flight as over and wake whoever waits for it (holding _state)."""
        done, self._fetch_done = self._fetch_done, None
        if done is not None:
            done.set()

    def _fetch_failed(
        self, kid: str | None, exc: IssuerUnavailable
    ) -> tuple[jwt.PyJWK, str | None] | None:
        """Back off after a failed fetch; go on with the last good keys, or raise without any."""
        log.warning("oidc key set fetch failed: %s", exc)
        with self._state:
            self._fetch_ended()
            self._failures += 1
            backoff = min(MIN_FETCH_INTERVAL * 2 ** min(self._failures - 1, 16), MAX_BACKOFF)
            now = self._clock()
            self._next_fetch = now + backoff
            if not self._keys:
                exc.retry_after = backoff
                raise exc
            # Keep verifying with the keys we have; the issuer is asked again later.
            return self._lookup(kid)

    def _lookup(self, kid: str | None) -> tuple[jwt.PyJWK, str | None] | None:
        if kid is not None:
            return self._keys.get(kid)
        # A token without `kid` is only usable when the issuer publishes exactly one key.
        keys = list(self._keys.values())
        return keys[0] if len(keys) == 1 else None

    def _fetch_keys(self, deadline: float) -> dict[str | None, tuple[jwt.PyJWK, str | None]]:
        """Fetch the issuer's usable signing keys by `deadline` (raises IssuerUnavailable)."""
        url = self._jwks_url or self._discover(deadline)
        document = _fetch_json(url, deadline, self._clock)
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
        return keys

    def _discover(self, deadline: float) -> str:
        """Find the JWKS URL in the issuer's OpenID configuration (and remember it)."""
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = _fetch_json(url, deadline, self._clock)
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
