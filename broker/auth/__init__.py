"""Authentication: browser sessions (flask-login + CSRF), bearer credentials for apps, the admin
role, and the accounts behind them.

Public interface:
- `init_app(app)`: wires everything below into the app (after broker.platform.extensions).
- `login_required` (flask-login's), `admin_required`: guard views; API views answer JSON 401/403.
- `csrf_token()`: the CSRF token for templates and page JavaScript (`X-CSRFToken` header).
- `current_api_token()`: the ApiToken of a bearer-authenticated request, else None.
- `session_user_clause(token)`, `fast_session_token()`: the rule a session cookie is judged by,
  for the `/i/` redirect, which checks it inside its own query.

Modules: `middleware` (who is asking, CSRF; see its docstring for the rules it enforces),
`views` (the pages under /auth, its blueprint `bp`), `api` and `cli` (tokens, service keys,
users), `rate_limits` (login and token-creation attempts), `tokens`, `service_keys`, `oidc`
and `external` (bearer credentials and the app's own users' accounts), `users`, `passwords`,
`remember`, `demo`, `models`.
"""

from __future__ import annotations

import functools

from flask import Flask
from flask_login import login_required
from flask_wtf.csrf import CSRFError

from broker.auth.middleware import (
    admin_required,
    check_request,
    csrf_error,
    csrf_token,
    current_api_token,
    fast_session_token,
    session_user_clause,
)
from broker.platform import health
from broker.platform.config import settings_of
from broker.platform.extensions import login_manager

__all__ = [
    "admin_required",
    "csrf_token",
    "current_api_token",
    "fast_session_token",
    "init_app",
    "login_required",
    "session_user_clause",
]


def init_app(app: Flask) -> None:
    """Wire authentication into `app` (after broker.platform.extensions.init_app)."""
    from broker.auth import tokens, views

    if settings_of(app).oidc_issuer:  # PyJWT and its X.509 code: only where OIDC is configured
        from broker.auth import oidc

        oidc.init_app(app)
    app.extensions["tokens"] = tokens.cache_for(app)
    tokens.watch_sessions()
    health.register_metrics(app, tokens.metric_lines)
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please log in to see that page."
    login_manager.login_message_category = "info"
    # Remember-me is broker.auth.remember's cookie; flask-login's own (a long-lived copy of the
    # session id) is read under a name nothing sets, so it never authenticates anyone.
    app.config["REMEMBER_COOKIE_NAME"] = "flask_login_remember_unused"
    # Header auth goes first so CSRF and views see the right user.
    app.before_request(functools.partial(check_request, app))
    app.register_error_handler(CSRFError, csrf_error)
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.register_blueprint(views.bp)
