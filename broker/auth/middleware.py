"""The request side of authentication: who is asking, and may they write.

Every request passes `check_request` (a before-request hook): a request with an `Authorization`
header is authenticated ONLY by that header (the session and remember cookies are ignored),
which is why such requests are exempt from CSRF; every other POST/PUT/PATCH/DELETE needs a
valid CSRF token (form field or `X-CSRFToken` header), including JSON calls to the API made
with the session cookie. Browser sessions end `BROKER_SESSION_LIFETIME` seconds after login;
a remember cookie then starts a new one.

Bearer credentials, told apart by their form: `brk_…` API tokens (`tokens`), `bsk_…` service
keys of the app's backend acting for the app's user named in `On-Behalf-Of` (`service_keys`, API
routes only), and JWTs of the app's OpenID Connect issuer (`oidc`, when configured). The last
two act as accounts of the app's own users (`external`). A service key's scopes are left in
`g.credential_scopes`, which `broker.api.spec.endpoint` holds each route to.

Authenticating is a unit of work of its own, committed here before the view runs (this module
is request middleware, and commits as a view does): a token's last-used stamp and an external
user's first account must not wait on, or be rolled back with, whatever the view does next.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from flask import (
    Flask,
    after_this_request,
    current_app,
    flash,
    g,
    redirect,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_user
from flask_wtf.csrf import CSRFError, generate_csrf
from werkzeug.wrappers import Response

from broker.auth.models import ApiToken, ServiceKey, User
from broker.platform import bearer
from broker.platform.config import current_settings
from broker.platform.db import db
from broker.platform.errors import ApiError, handle_api_error, wants_json
from broker.platform.extensions import csrf, login_manager
from broker.platform.routing import reads_only, serves_no_user

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("broker.auth")


def csrf_token() -> str:
    """Return the CSRF token of the current session (for forms, meta tags and page scripts)."""
    return generate_csrf()


def current_api_token() -> ApiToken | None:
    """Return the token that authenticated this request, or None for cookie sessions."""
    current_user._get_current_object()  # make sure the loaders ran
    token: ApiToken | None = g.get("api_token")
    return token


def _bearer_secret() -> str | None:
    """Return the token of an `Authorization: Bearer …` header, else None."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _is_bearer_request() -> bool:
    return _bearer_secret() is not None


def session_user_clause(session_token: Any) -> sa.ColumnElement[bool]:
    """Return the SQL condition "this User row is the active owner of `session_token`".

    The one rule a session or remember cookie is judged by; `broker.images.urls` embeds it in the
    `/i/` redirect's query, so both paths accept and refuse exactly the same users.
    """
    return sa.and_(User.session_token == session_token, User.active.is_(True))


def start_session(user: User) -> None:
    """Log `user` in on a brand-new session (no value of the old one survives: no fixation),
    stamped with its start so it ends `BROKER_SESSION_LIFETIME` seconds later."""
    session.clear()
    login_user(user)
    session["login_at"] = int(time.time())


# Seconds a login stamp may lie ahead of this instance's clock (another instance stamped it).
LOGIN_CLOCK_SKEW = 60


def _session_expired() -> bool:
    """Tell whether this session started longer ago than BROKER_SESSION_LIFETIME (or has no
    start: sessions from before the stamp existed)."""
    started = session.get("login_at")
    if not isinstance(started, int):
        return True
    now = time.time()
    if started > now + LOGIN_CLOCK_SKEW:
        return True  # stamped by a clock far ahead: it would otherwise not end for as long
    return now - started > current_settings().session_lifetime


def fast_session_token() -> str | None:
    """Return the session's token when flask-login would judge this request by the session
    cookie through `load_user_from_session` alone, else None (use `current_user`).

    None when an Authorization header is present (it is the only credential considered) and
    under "strong" session protection (flask-login then compares the client identifier first,
    which only its own path does). A token that matches no active user must also fall back,
    since flask-login then tries the remember cookie.
    """
    if "Authorization" in request.headers:
        return None
    mode = current_app.config.get("SESSION_PROTECTION", login_manager.session_protection)
    if mode == "strong" or _session_expired():
        return None
    token = session.get("_user_id")
    return token if isinstance(token, str) and token else None


@login_manager.user_loader
def load_user_from_session(session_token: str) -> User | None:
    """Load the session's (or remember cookie's) user by the rotating session token."""
    if "Authorization" in request.headers:
        return None  # an Authorization header is the only credential considered
    if _session_expired():
        return None  # flask-login then asks the request loader: the remember cookie
    return db.session.scalar(sa.select(User).where(session_user_clause(session_token)))


@login_manager.request_loader
def load_user_from_request(req: Any) -> User | None:
    """Authenticate the bearer credential: an API token `brk_…`, a service key `bsk_…` acting
    for one of the app's users, or a JWT from the app's OpenID Connect issuer (None for a
    missing, bad or dead one); without an Authorization header, a remember cookie."""
    from broker.auth import service_keys, tokens

    if "Authorization" not in request.headers:
        return _restore_remembered()
    secret = _bearer_secret()
    if secret is None:
        return None
    if secret.startswith(service_keys.PREFIX):
        user = _service_key_user(secret)
    elif secret.startswith(tokens.PREFIX):
        token = tokens.authenticate(db.session, secret, cache=current_app.extensions["tokens"])
        g.api_token = token
        user = token.user if token is not None else None
        if token is None:
            bearer.refuse(tokens.refusal_reason(db.session, secret))
    else:
        user = _identity_provider_user(secret)
    # Authentication is a unit of work of its own: the last-used stamp must not wait on (or be
    # rolled back with) whatever the view does next. A token kept in memory makes no session.
    if db.session.registry.has():
        stamped = db.session.info.pop(tokens.STAMPED, False)  # popped whether or not it decides
        if db.session.dirty or stamped:
            db.session.commit()
    return user


def _service_key_user(secret: str) -> User | None:
    """Authenticate a service key on the API; return the user it acts for (None: the key alone)."""
    from broker.auth import external, service_keys, tokens

    if not _on_the_api():
        return None  # a backend's key, for the API only: no pages, no /i/ redirects
    key = service_keys.authenticate(db.session, secret)
    if key is None:
        known = tokens.find_by_secret(db.session, ServiceKey, secret, service_keys.PREFIX)
        bearer.refuse("invalid" if known is None else "revoked")
        return None
    g.service_key = key
    g.credential_scopes = service_keys.scopes_of(key)
    raw = request.headers.get(service_keys.ON_BEHALF_OF)
    if raw is None:
        return None
    try:
        # WSGI hands header bytes over as latin-1 text: read them as the UTF-8 they are, so
        # "José" names the same account as an identity provider's "José".
        subject = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        subject = ""  # not UTF-8: refused below
    if not external.valid_subject(subject):
        raise ApiError(
            400,
            "invalid_on_behalf_of",
            f"{service_keys.ON_BEHALF_OF} names your user by an id of 1-255 printable characters.",
        )
    return _external_account(key.issuer, subject)


def _identity_provider_user(token: str) -> User | None:
    """Authenticate a JWT of the configured OpenID Connect issuer; return its subject's account."""
    verifier = current_app.extensions.get("oidc")
    if verifier is None or not _on_the_api():
        bearer.refuse("invalid")  # nobody here vouches for it
        return None  # the provider vouches for API calls: no pages, session or CSRF token
    from broker.auth import oidc  # loaded (with PyJWT) by init_app: OIDC is configured

    try:
        identity = verifier.check(token)
    except oidc.TokenRefused as refused:
        bearer.refuse(refused.reason)
        return None
    except oidc.IssuerUnavailable as exc:
        log.warning("identity provider unavailable: %s", exc)
        raise ApiError(
            503,
            "identity_provider_unavailable",
            "The identity provider's keys cannot be fetched right now; try again shortly.",
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
        ) from None
    g.oidc_claims = identity.claims  # for upload profiles limited by a claim
    return _external_account(identity.issuer, identity.subject)


def _external_account(issuer: str, subject: str) -> User:
    """Return the account of `subject` at `issuer`, created (and committed) by its first write;
    a read before that acts as an account that owns nothing and is never stored."""
    from broker.auth import external

    # No autoflush: the credential's last-used stamp stays pending for the commit after this.
    with db.session.no_autoflush:
        user = external.find_account(db.session, issuer, subject)
    if user is None and _reads():
        return external.reader(issuer, subject)  # a read creates no account
    if user is None:
        user = external.create_account(db.session, issuer, subject)
        # Before the view's own work: the account exists whatever the view does next.
        db.session.commit()
    return _usable(user)


def _reads() -> bool:
    """Tell whether this request only reads: a safe method, or a route declared `reads_only`
    (a POST whose body is a query, such as a batch of signed URLs)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return True
    return reads_only(current_app, request.endpoint)


def _on_the_api() -> bool:
    """Tell whether this request is for the JSON API, the only place external credentials count."""
    return request.path.startswith("/api/")


def _usable(user: User) -> User:
    """Refuse an external account an administrator deactivated."""
    if not user.is_active:
        raise ApiError(403, "account_deactivated", "This account is deactivated.")
    return user


def _restore_remembered() -> User | None:
    """Start a new session for the owner of a valid remember cookie (None without one)."""
    from broker.auth import remember

    secret = request.cookies.get(remember.COOKIE)
    if not secret:
        return None
    user = remember.find_user(db.session, secret)
    if user is None:
        # Expired, logged out or forged: the browser forgets it. Asked of this response only,
        # so no other request pays for an after-request check.
        after_this_request(_drop_dead_remember_cookie)
        return None
    start_session(user)
    return user


def _drop_dead_remember_cookie(response: Response) -> Response:
    """Delete a remember cookie the server no longer honours."""
    from broker.auth import remember

    remember.clear_cookie(response, current_app)
    return response


def check_request(app: Flask) -> None:
    """Settle who is asking (the Authorization header first), then require a CSRF token on a
    cookie-authenticated write. One hook, reading the request once: it runs on every request."""
    req = request._get_current_object()  # type: ignore[attr-defined]
    has_header = "HTTP_AUTHORIZATION" in req.environ
    if has_header:
        _authenticate_header_first(app, req)
    if req.method in app.config["WTF_CSRF_METHODS"]:
        _csrf_protect(req, has_header)


def _authenticate_header_first(app: Flask, req: Any) -> None:
    """Resolve the user from the Authorization header alone, before any cookie is considered."""
    if serves_no_user(app, req.endpoint):
        # Probes, metrics and static files look at no user: nobody is, at no database cost.
        g._login_user = login_manager.anonymous_user()
        return
    # flask-login reads a remember cookie before its request loader; deciding here, first,
    # guarantees that a request carrying a header is judged by the header only.
    user = load_user_from_request(req)
    g._login_user = user if user is not None else login_manager.anonymous_user()


def _csrf_protect(req: Any, has_header: bool) -> None:
    """Require a CSRF token on this write unless it is a bearer request (no cookies count)."""
    if not req.endpoint or (has_header and _is_bearer_request()):
        return
    # An anonymous request has no ambient authority to abuse. The login and registration
    # forms still check their own token (FlaskForm), which stops login CSRF.
    if not current_user.is_authenticated:
        return
    csrf.protect(apply_exemptions=True)


def csrf_error(exc: CSRFError) -> ResponseReturnValue:
    """Refuse a write without a valid CSRF token (403, JSON for the API)."""
    return handle_api_error(
        ApiError(
            403,
            "csrf_failed",
            "The CSRF token is missing or invalid; reload the page and try again.",
        )
    )


@login_manager.unauthorized_handler
def unauthorized() -> ResponseReturnValue:
    """Answer JSON 401 for the API (with why a bearer credential was refused, RFC 6750),
    redirect pages to the login form."""
    if wants_json():
        raise bearer.unauthorized()
    flash(login_manager.login_message, login_manager.login_message_category)
    target = request.full_path if request.query_string else request.path
    return redirect(url_for("auth.login", next=target))


def admin_required(view: F) -> F:
    """Let only administrators through (401 when anonymous, 403 JSON/HTML otherwise)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not current_user.is_authenticated:
            return login_manager.unauthorized()
        if not current_user.is_admin:
            raise ApiError(403, "forbidden", "This needs an administrator account.")
        return view(*args, **kwargs)

    return cast(F, wrapped)
