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

import hmac
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

from flask import current_app, g, request
from flask_limiter.util import get_remote_address
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.wrappers import Response

from broker.platform.config import current_settings
from broker.platform.extensions import limiter

F = TypeVar("F", bound=Callable[..., Any])

DEVICE_COOKIE = "broker_device"
DEVICE_HEADER = "Broker-Device"  # the same value, for API clients
DEVICE_MAX_AGE = timedelta(days=365)


def auth_limit() -> str:
    """Return the configured limit, e.g. "10 per minute"."""
    return current_settings().auth_rate_limit


def _requested_username() -> str | None:
    """Return the casefolded username the request names (form or JSON body), else None."""
    from broker.auth.users import username_key

    name: Any = request.form.get("username")
    if name is None:
        data = request.get_json(silent=True)
        name = data.get("username") if isinstance(data, dict) else None
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


def _failed(response: Response) -> bool:
    """Count an attempt against the username only when it did not succeed."""
    return response.status_code not in (201, 302)


# Shared scopes: the login form and the token endpoint draw on the same budgets, so an attacker
# cannot double the guesses by alternating between them.
per_ip = limiter.shared_limit(auth_limit, scope="auth-ip", methods=["POST"])
# A known device is counted on its own budget (below) instead of the username's.
per_username = limiter.shared_limit(
    auth_limit,
    scope="auth-username",
    key_func=_username_key,
    methods=["POST"],
    deduct_when=_failed,
    exempt_when=lambda: _device() is not None,
)
per_device = limiter.shared_limit(
    auth_limit,
    scope="auth-device",
    key_func=_device_key,
    methods=["POST"],
    deduct_when=_failed,
    exempt_when=lambda: _device() is None,
)


def credential_checks(view: F) -> F:
    """Guard a view that checks a password with all three limits, the per-IP one first.

    Flask-Limiter evaluates a view's limits in the order they were applied and stops at the
    first breach; the per-username and per-device ones read the body for the username. Applied
    first, the per-IP limit refuses a client over its budget before anything reads its body.
    """
    return cast(F, per_device(per_username(per_ip(view))))
