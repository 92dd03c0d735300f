"""Rate limits on credential checks (login form and token creation), per IP and per username.

The per-username limit stops password guessing from many addresses, but would also let anyone
who knows a username lock its owner out. So, as OWASP's "device cookies" suggest, a browser
that has logged in as that user before carries a signed device cookie, and its attempts are
counted against that device instead of the username: the owner still gets in while the
username is under attack, and a stolen device cookie buys only the same few guesses. API
clients have no cookie jar: the token endpoint hands them the same signed value in the
`Broker-Device` response header, and they prove the device by sending it back as a request
header on later token requests.
"""

from __future__ import annotations

import functools
import hmac
import logging
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

from flask import after_this_request, current_app, g, request
from flask_limiter.util import get_remote_address
from itsdangerous import BadSignature, URLSafeTimedSerializer
from limits.strategies import FixedWindowRateLimiter
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response

from broker.platform.config import current_settings
from broker.platform.extensions import limiter

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("broker.auth")

DEVICE_COOKIE = "broker_device"
DEVICE_HEADER = "Broker-Device"  # the same value, for API clients
DEVICE_MAX_AGE = timedelta(days=365)


def auth_limit() -> str:
    """Return the configured limit, e.g. "10 per minute"."""
    return current_settings().auth_rate_limit


def _requested_username() -> str | None:
    """Return the casefolded username the request names (form or JSON body), else None."""
    from broker.auth.users import username_key

    try:
        name: Any = request.form.get("username")
        if name is None:
            data = request.get_json(silent=True)
            name = data.get("username") if isinstance(data, dict) else None
    except RequestEntityTooLarge:
        # The view answers it (413); raised here, inside the limiter, it would be taken for
        # the rate-limit storage failing.
        return None
    if not isinstance(name, str) or not name.strip():
        return None
    return username_key(name.strip()[:64])


def _username_key() -> str:
    """Key the per-username limit by the casefolded username the request names."""
    name = _requested_username()
    return "user:" + name if name else "ip:" + (get_remote_address() or "-")


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_settings().secret_key, salt="broker.auth.device-cookie")


def _device() -> str | None:
    """Return the id of this browser's device cookie when it was issued at a login as the
    username this request names, else None (memoised for the request)."""
    if "auth_device" not in g:
        g.auth_device = None
        raw = request.cookies.get(DEVICE_COOKIE) or request.headers.get(DEVICE_HEADER)
        name = _requested_username()
        if raw and name and len(raw) < 512:
            try:
                data = _serializer().loads(raw, max_age=int(DEVICE_MAX_AGE.total_seconds()))
            except BadSignature:
                data = None
            if (
                isinstance(data, dict)
                and isinstance(data.get("u"), str)
                and isinstance(data.get("d"), str)
                and hmac.compare_digest(data["u"].encode(), name.encode())
            ):
                g.auth_device = data["d"]
    device: str | None = g.auth_device
    return device


def _device_key() -> str:
    return "device:" + (_device() or "-")


def device_credential(username_key: str) -> str:
    """Return a new signed device value for `username_key` (after a correct password)."""
    return _serializer().dumps({"u": username_key, "d": secrets.token_urlsafe(12)})


def set_device_cookie(response: Response, username_key: str) -> None:
    """Mark this browser as one that logged in as `username_key` (after a correct password)."""
    response.set_cookie(
        DEVICE_COOKIE,
        device_credential(username_key),
        max_age=int(DEVICE_MAX_AGE.total_seconds()),
        httponly=True,
        secure=bool(current_app.config["SESSION_COOKIE_SECURE"]),
        samesite="Lax",
    )


# Shared scopes: the login form and the token endpoint draw on the same budgets, so an attacker
# cannot double the guesses by alternating between them. Every attempt is counted before its
# password is checked, in one atomic step that also tells whether it is within the limit (a
# count added after the view let concurrent guesses all pass the check first: 17 checked
# against a limit of 10); so a successful login counts too.
per_ip = limiter.shared_limit(auth_limit, scope="auth-ip", methods=["POST"])
# A known device is counted on its own budget (below) instead of the username's.
per_username = limiter.shared_limit(
    auth_limit,
    scope="auth-username",
    key_func=_username_key,
    methods=["POST"],
    exempt_when=lambda: _device() is not None,
)
per_device = limiter.shared_limit(
    auth_limit,
    scope="auth-device",
    key_func=_device_key,
    methods=["POST"],
    exempt_when=lambda: _device() is None,
)


# The budgets a successful login gives its attempt back to: the owner logging in is no guess.
REFUNDED_SCOPES = ("auth-username", "auth-device")
ADMITTED = (201, 302)


def _refund_if_admitted(response: Response) -> Response:
    """Give back the attempt a successful login counted on the username's (or device's)
    budget; a refused one keeps it."""
    if response.status_code not in ADMITTED:
        return response
    strategy = limiter.limiter
    if not isinstance(strategy, FixedWindowRateLimiter):
        return response  # only a fixed window's count can be given back
    try:
        for checked in limiter.current_limits:
            if checked.request_args[-1] not in REFUNDED_SCOPES:
                continue
            key = checked.limit.key_for(*checked.request_args)
            if strategy.storage.get(key) > 0:  # not when its window ended meanwhile
                strategy.storage.incr(key, checked.limit.get_expiry(), amount=-1)
    except Exception as exc:  # a storage gone mid-request: the attempt stays counted
        log.warning("login attempt not given back to its budget: %s", type(exc).__name__)
    return response


def credential_checks(view: F) -> F:
    """Guard a view that checks a password with all three limits, the per-IP one first.

    Flask-Limiter evaluates a view's limits in the order they were applied and stops at the
    first breach; the per-username and per-device ones read the body for the username. Applied
    first, the per-IP limit refuses a client over its budget before anything reads its body.
    Each attempt is counted before the view checks its password; a successful one is given
    back afterwards.
    """

    @functools.wraps(view)
    def counted(*args: Any, **kwargs: Any) -> Any:
        after_this_request(_refund_if_admitted)
        return view(*args, **kwargs)

    return cast(F, per_device(per_username(per_ip(counted))))
