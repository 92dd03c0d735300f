"""The auth pages: login, logout, register, account (change password, create and revoke tokens)."""

from __future__ import annotations

from datetime import timedelta
from typing import cast
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required, logout_user
from sqlalchemy.exc import IntegrityError

from broker.auth import passwords, rate_limits, remember, tokens, users
from broker.auth.forms import (
    ActionForm,
    ChangePasswordForm,
    CreateTokenForm,
    LoginForm,
    RegisterForm,
)
from broker.auth.middleware import start_session
from broker.platform.config import current_settings
from broker.platform.db import db

bp = Blueprint("auth", __name__, url_prefix="/auth")

INVALID_LOGIN = "Invalid username or password."


def safe_next(target: str | None) -> str | None:
    """Return `target` if it is a path on this site, else None (no open redirects)."""
    if not target or len(target) > 2048 or not target.startswith("/"):
        return None
    # "//host" and "/\host" are other sites to a browser; control characters get stripped.
    if target.startswith("//") or "\\" in target or any(ord(c) < 32 or c == "\x7f" for c in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


@bp.route("/login", methods=["GET", "POST"])
@rate_limits.credential_checks
def login() -> ResponseReturnValue:
    """Show the login form; log the user in on a valid submission."""
    target = safe_next(request.args.get("next"))
    if current_user.is_authenticated:
        return redirect(target or url_for("web.index"))
    form = LoginForm()
    status = 200
    if form.validate_on_submit():
        user = users.authenticate(db.session, form.username.data or "", form.password.data or "")
        if user is not None:
            start_session(user)
            secret = remember.issue(db.session, user) if form.remember.data else None
            db.session.commit()
            response = redirect(target or url_for("web.index"))
            if secret is not None:
                remember.set_cookie(response, current_app, secret)
            rate_limits.set_device_cookie(response, user.username_key)
            return response
        db.session.rollback()
        form.form_errors.append(INVALID_LOGIN)
        status = 401
    elif request.method == "POST":
        status = 400
    return render_template(
        "auth/login.html",
        form=form,
        next=target,
        registration=current_settings().registration,
    ), status


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    """End every session, remember cookie and the current browser session of the user."""
    if current_user.is_authenticated:
        user = current_user._get_current_object()
        user.end_sessions()  # rotates the session id, deletes every remember token
        db.session.commit()
    session.clear()
    logout_user()
    flash("You are logged out.", "info")
    response = redirect(url_for("auth.login"))
    remember.clear_cookie(response, current_app)
    return response


@bp.route("/register", methods=["GET", "POST"])
@rate_limits.per_ip
def register() -> ResponseReturnValue:
    """Create an account (only when BROKER_REGISTRATION is on) and log it in."""
    if not current_settings().registration:
        abort(404)
    form = RegisterForm()
    status = 200
    if form.validate_on_submit():
        try:
            user = users.create_user(
                db.session,
                form.username.data or "",
                form.password.data or "",
                email=form.email.data,
            )
            db.session.commit()
        except users.AccountError as exc:
            db.session.rollback()
            getattr(form, exc.field).errors.append(exc.message)
        except IntegrityError:  # a concurrent registration took the name first
            db.session.rollback()
            # A validated field's errors are a list.
            cast(list[str], form.username.errors).append("That username is taken.")
        else:
            start_session(user)
            user.last_login_at = user.created_at
            db.session.commit()
            flash("Welcome! Your account is ready.", "info")
            return redirect(url_for("web.index"))
        status = 422
    elif request.method == "POST":
        status = 422
    return render_template("auth/register.html", form=form), status


def _account_page(
    password_form: ChangePasswordForm | None = None,
    status: int = 200,
    *,
    token_form: CreateTokenForm | None = None,
    new_token: tokens.IssuedToken | None = None,
) -> ResponseReturnValue:
    user = current_user._get_current_object()
    return render_template(
        "auth/account.html",
        user=user,
        tokens=tokens.active_tokens(db.session, user),
        password_form=password_form or ChangePasswordForm(),
        token_form=token_form or CreateTokenForm(formdata=None),
        new_token=new_token,
        action_form=ActionForm(),
    ), status


@bp.get("/account")
@login_required
def account() -> ResponseReturnValue:
    """Show the account: details, password change, the API tokens with revoke buttons."""
    return _account_page()


@bp.post("/account/password")
@login_required
@rate_limits.per_ip
def change_password() -> ResponseReturnValue:
    """Change the password; ends every other session and revokes every API token."""
    form = ChangePasswordForm()
    user = current_user._get_current_object()
    if not form.validate_on_submit():
        return _account_page(form, 422)
    if not passwords.verify_password(user.password_hash, form.current.data or ""):
        cast(list[str], form.current.errors).append("That is not your current password.")
        return _account_page(form, 422)
    users.set_password(db.session, user, form.password.data or "")
    db.session.commit()
    # The id in this browser's cookie was just rotated; carry on in a fresh session.
    start_session(user)
    flash("Password changed. Other sessions and all API tokens were ended.", "info")
    return redirect(url_for("auth.account"))


@bp.post("/account/tokens")
@login_required
def create_token() -> ResponseReturnValue:
    """Create an API token for the signed-in user and show its secret this once."""
    form = CreateTokenForm()
    if not form.validate_on_submit():
        return _account_page(token_form=form, status=422)
    days = current_settings().api_token_ttl_days
    issued = tokens.issue(
        db.session,
        current_user._get_current_object(),
        form.name.data or "",
        ttl=timedelta(days=days),
    )
    db.session.commit()
    # The secret is in this page only: not in a flash message (the session cookie is signed,
    # not encrypted) and not in any cache.
    response = make_response(
        _account_page(token_form=CreateTokenForm(formdata=None), new_token=issued)
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/account/tokens/<token_id>/revoke")
@login_required
def revoke_token(token_id: str) -> ResponseReturnValue:
    """Revoke one of the user's API tokens (another user's token: 404)."""
    if not ActionForm().validate_on_submit():
        abort(400)
    token = tokens.find_own(db.session, current_user._get_current_object(), token_id)
    if token is None:
        abort(404)
    tokens.revoke(token)
    db.session.commit()
    flash(f"Token “{token.name}” revoked.", "info")
    return redirect(url_for("auth.account"))
