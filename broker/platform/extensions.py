"""Flask extensions, created unbound and wired to each app by `init_app`.

    from broker.platform.extensions import csrf, limiter, login_manager

`csrf.exempt(view_or_blueprint)` opts a view out of CSRF (inbound webhooks);
`limiter.limit("10 per minute")` rate-limits a view.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from flask import Flask, Request, Response
from flask.globals import request_ctx
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

# Remember-me cookies never outlive this (ASVS 3.3: bounded absolute session lifetime).
REMEMBER_MAX = timedelta(days=30)

login_manager = LoginManager()
csrf = CSRFProtect()
# No default limits: only login and token creation are limited, so ordinary tests and pages never
# hit a limit. Headers on: a limited route's answers carry X-RateLimit-*, and a 429 Retry-After
# (never a success: see `_limits_only_where_they_apply`).
limiter = Limiter(key_func=get_remote_address, headers_enabled=True, default_limits=[])


class CachedSigningSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with the signer built once per app, not per request, and
    no work for a request that brings no session cookie and leaves the session alone."""

    def get_signing_serializer(self, app: Flask) -> Any:
        """Return the app's serializer, built on first use (the secret key is fixed by then)."""
        cached = app.extensions.get("session_serializer")
        if cached is None or cached[0] != (app.secret_key, app.config["SECRET_KEY_FALLBACKS"]):
            serializer = super().get_signing_serializer(app)
            cached = ((app.secret_key, app.config["SECRET_KEY_FALLBACKS"]), serializer)
            app.extensions["session_serializer"] = cached
        return cached[1]

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        """Load the session from its cookie; an empty one when the request has no such cookie."""
        if app.secret_key and self.get_cookie_name(app) not in request.environ.get(
            "HTTP_COOKIE", ""
        ):
            return self.session_class()  # what Flask answers too, without parsing the cookies
        return super().open_session(app, request)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """Save the session as Flask does (nothing at all for an empty session nobody read or
        changed)."""
        if not session and not session.modified and not session.accessed:
            return
        super().save_session(app, session, response)


def init_app(app: Flask) -> None:
    """Bind flask-login, CSRF protection and the rate limiter to `app`."""
    config = app.config
    # CSRF is checked by broker.auth's own before_request, which skips bearer-token requests.
    config["WTF_CSRF_CHECK_DEFAULT"] = False
    # Tokens live as long as the session (which ends at logout): a page left open stays usable.
    config.setdefault("WTF_CSRF_TIME_LIMIT", None)
    # Flask-Limiter keeps its state on the shared Limiter; set every app's flag explicitly so one
    # app disabling it cannot leak into the next app built in the same process (tests).
    config.setdefault("RATELIMIT_ENABLED", True)
    app.session_interface = CachedSigningSessions()
    login_manager.init_app(app)
    # flask-login's own remember cookie is never issued (remember-me is broker.auth.remember's
    # cookie, one per login): its after-request hook, which would read the session on every
    # request (and so mark every response `Vary: Cookie`), has nothing to do.
    after = app.after_request_funcs[None]
    after[:] = [f for f in after if f != login_manager._update_remember_cookie]
    csrf.init_app(app)
    # Flask-WTF's own hook does nothing while WTF_CSRF_CHECK_DEFAULT is off (broker.auth
    # checks CSRF where it applies): spare every request the call.
    hooks = app.before_request_funcs[None]
    hooks[:] = [
        f
        for f in hooks
        if getattr(f, "__qualname__", "") != "CSRFProtect.init_app.<locals>.csrf_protect"
    ]
    limiter.init_app(app)
    _limits_only_where_they_apply(app)


def _limits_only_where_they_apply(app: Flask) -> None:
    """Keep Flask-Limiter's per-request hooks off the requests no limit applies to.

    Every limit is a decorator on its view, which checks it when the view runs. The app-wide
    filter Flask-Limiter adds (for default and blueprint limits, which the broker has none of)
    goes; its header hook runs only when a decorated limit was checked (it leaves its state on
    the request context then). Its teardown goes too: it only clears that state, on a request
    context that is being discarded anyway.
    """
    before = app.before_request_funcs.get(None, [])
    before[:] = [f for f in before if getattr(f, "__self__", None) is not limiter]
    after = app.after_request_funcs.get(None, [])
    teardown = app.teardown_request_funcs.get(None, [])
    inject = next((f for f in after if "inject_headers" in getattr(f, "func", f).__name__), None)
    if inject is None:
        return  # Flask-Limiter already bound to this app (and its hooks replaced) before

    def limit_headers(response: Response) -> Response:
        # The request context itself, not an attribute lookup through its proxy.
        ctx = request_ctx._get_current_object()  # type: ignore[attr-defined]
        if not hasattr(ctx, "_limiter_request_context"):
            return response
        waited = response.headers.get("Retry-After")
        response = cast(Response, inject(response))
        if response.status_code != 429:
            # Flask-Limiter stamps every limited answer with the window's reset as Retry-After:
            # only its own 429 asks to wait for that; a success or a wrong password does not,
            # and a refusal that says when to retry (503 server_busy) keeps its own value.
            del response.headers["Retry-After"]
            if waited is not None:
                response.headers["Retry-After"] = waited
        return response

    after[after.index(inject)] = limit_headers
    teardown[:] = [f for f in teardown if getattr(f, "__self__", None) is not limiter]
