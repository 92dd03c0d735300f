"""Flask extensions, created unbound and wired to each app by `init_app`.

    from broker.platform.extensions import csrf, limiter, login_manager

`csrf.exempt(view_or_blueprint)` opts a view out of CSRF (inbound webhooks);
`limiter.limit("10 per minute")` rate-limits a view.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

# Remember-me cookies never outlive this (ASVS 3.3: bounded absolute session lifetime).
REMEMBER_MAX = timedelta(days=30)

login_manager = LoginManager()
csrf = CSRFProtect()
# No default limits: only login and token creation are limited, so ordinary tests and pages never
# hit a limit. Headers on: a 429 carries Retry-After.
limiter = Limiter(key_func=get_remote_address, headers_enabled=True, default_limits=[])


def init_app(app: Flask) -> None:
    """Bind flask-login, CSRF protection and the rate limiter to `app`."""
    config = app.config
    remember = config.get("REMEMBER_COOKIE_DURATION") or REMEMBER_MAX
    if isinstance(remember, int | float):
        remember = timedelta(seconds=remember)
    config["REMEMBER_COOKIE_DURATION"] = min(remember, REMEMBER_MAX)
    config.setdefault("REMEMBER_COOKIE_REFRESH_EACH_REQUEST", False)
    # CSRF is checked by broker.auth's own before_request, which skips bearer-token requests.
    config["WTF_CSRF_CHECK_DEFAULT"] = False
    # Tokens live as long as the session (which ends at logout): a page left open stays usable.
    config.setdefault("WTF_CSRF_TIME_LIMIT", None)
    # Flask-Limiter keeps its state on the shared Limiter; set every app's flag explicitly so one
    # app disabling it cannot leak into the next app built in the same process (tests).
    config.setdefault("RATELIMIT_ENABLED", True)
    login_manager.init_app(app)
    csrf.init_app(app)
    limiter.init_app(app)
