"""Rate limits on credential checks (login form and token creation), per IP and per username."""

from __future__ import annotations

from flask import current_app, request
from flask_limiter.util import get_remote_address
from werkzeug.wrappers import Response

from broker.platform.extensions import limiter


def auth_limit() -> str:
    """Return the configured limit, e.g. "10 per minute"."""
    return str(current_app.config["AUTH_RATE_LIMIT"])


def _username_key() -> str:
    """Key the per-username limit by the casefolded username the request names."""
    from broker.auth.users import username_key

    name = request.form.get("username")
    if name is None:
        data = request.get_json(silent=True)
        name = data.get("username") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name.strip():
        return "ip:" + (get_remote_address() or "-")
    return "user:" + username_key(name.strip()[:64])


def _failed(response: Response) -> bool:
    """Count an attempt against the username only when it did not succeed."""
    return response.status_code not in (201, 302)


# Shared scopes: the login form and the token endpoint draw on the same budgets, so an attacker
# cannot double the guesses by alternating between them.
per_ip = limiter.shared_limit(auth_limit, scope="auth-ip", methods=["POST"])
per_username = limiter.shared_limit(
    auth_limit,
    scope="auth-username",
    key_func=_username_key,
    methods=["POST"],
    deduct_when=_failed,
)
