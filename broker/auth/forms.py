"""The browser forms of the auth pages (Flask-WTF: CSRF field included)."""

from __future__ import annotations

from typing import Any

from flask import request
from flask_wtf import FlaskForm
from werkzeug.datastructures import ImmutableMultiDict
from wtforms import BooleanField, EmailField, PasswordField, StringField
from wtforms.validators import DataRequired, EqualTo, Length, Optional, Regexp, ValidationError

from broker.auth import passwords
from broker.platform.json_input import text_problem


class BrowserForm(FlaskForm):
    """A FlaskForm that reads only form-encoded bodies.

    Flask-WTF would otherwise feed a JSON body to the fields, and JSON values of any type
    (numbers, lists, a bare `1`) crash the validators with a 500; a JSON post is an empty form.
    """

    class Meta(FlaskForm.Meta):
        def wrap_formdata(self, form: Any, formdata: Any) -> Any:
            if (
                request.method != "GET"
                and request.is_json
                and not request.form
                and not request.files
            ):
                return ImmutableMultiDict()
            return super().wrap_formdata(form, formdata)

    def validate(self, extra_validators: Any = None) -> bool:
        """Validate the fields, refusing text no field may hold (a NUL: PostgreSQL refuses it)."""
        valid = super().validate(extra_validators)
        for field in self:
            if isinstance(field.data, str) and (problem := text_problem(field.data)):
                field.errors = [*field.errors, problem]
                valid = False
        return valid


def _password_rules(form: FlaskForm, field: PasswordField) -> None:
    problem = passwords.password_problem(field.data or "")
    if problem:
        raise ValidationError(problem)


class LoginForm(BrowserForm):
    """Username, password, remember me."""

    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(max=passwords.MAX_LENGTH)]
    )
    remember = BooleanField("Keep me logged in on this device (30 days)")


class RegisterForm(BrowserForm):
    """A new account."""

    username = StringField("Username", validators=[DataRequired(), Length(min=3, max=64)])
    email = EmailField(
        "Email (optional)",
        validators=[
            Optional(),
            Length(max=254),
            Regexp(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", message="Enter an email address."),
        ],
    )
    password = PasswordField("Password", validators=[DataRequired(), _password_rules])
    confirm = PasswordField(
        "Repeat password",
        validators=[DataRequired(), EqualTo("password", message="The passwords differ.")],
    )


class ChangePasswordForm(BrowserForm):
    """The current password and a new one."""

    current = PasswordField(
        "Current password", validators=[DataRequired(), Length(max=passwords.MAX_LENGTH)]
    )
    password = PasswordField("New password", validators=[DataRequired(), _password_rules])
    confirm = PasswordField(
        "Repeat new password",
        validators=[DataRequired(), EqualTo("password", message="The passwords differ.")],
    )


class ActionForm(BrowserForm):
    """A button-only form (logout, revoke): just the CSRF token."""


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


class CreateTokenForm(BrowserForm):
    """A name for a new API token."""

    name = StringField("Token name", validators=[DataRequired(), Length(max=100)], filters=[_strip])
