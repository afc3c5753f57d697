"""Accounts: registration, login, logout, and who is logged in."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar, cast
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf import FlaskForm
from flask_wtf.csrf import CSRFProtect
from sqlalchemy import bindparam, select
from werkzeug.security import check_password_hash, generate_password_hash
from werkzeug.wrappers import Response
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length, Regexp

from .db import db
from .login_limits import login_limits
from .models import USERNAME_MAX_LENGTH, User, normalize_username
from .users import UsernameTaken, create_user

bp = Blueprint("auth", __name__, url_prefix="/auth")
csrf = CSRFProtect()

PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 256  # hashing is deliberately slow; do not hash megabytes
USERNAME_TAKEN = "That username is already taken."
BAD_LOGIN = "Invalid username or password."

# Checked when the username is unknown, so that a miss costs as much as a wrong password.
_DUMMY_HASH = generate_password_hash("not-a-real-password")

F = TypeVar("F", bound=Callable[..., Any])


def init_app(app: Flask) -> None:
    config = app.config

    @app.before_request
    def load_user_and_check_csrf() -> None:
        """The user first, so that a CSRF 400 page still shows who is logged in; then
        the CSRF check (a 400 page without a valid token) for POST, PUT, PATCH, DELETE.

        Flask-WTF's own hook (off: WTF_CSRF_CHECK_DEFAULT) looks up the view's
        exemptions before the method, so every GET paid for that lookup; this tests the
        method first and then runs the same check, exemptions applied. One hook for
        both: each hook costs every request, /healthz included.
        """
        load_logged_in_user()
        if request.method in config["WTF_CSRF_METHODS"] and config["WTF_CSRF_ENABLED"]:
            csrf.protect(apply_exemptions=True)

    csrf.init_app(app)


class CredentialsForm(FlaskForm):  # type: ignore[misc]  # Flask-WTF ships no type hints
    username = StringField(
        "Username",
        filters=[lambda value: normalize_username(value) if value else value],
        validators=[
            DataRequired(),
            Length(min=3, max=USERNAME_MAX_LENGTH),
            Regexp(
                r"^[a-z0-9_.-]+$",
                message="Use only letters a-z, digits, dots, dashes and underscores.",
            ),
        ],
    )
    password = PasswordField(
        "Password",
        validators=[DataRequired(), Length(min=PASSWORD_MIN_LENGTH, max=PASSWORD_MAX_LENGTH)],
    )


class LoginForm(FlaskForm):  # type: ignore[misc]
    # No format rules here: a login form only answers "yes" or "no".
    username = StringField(
        "Username",
        filters=[lambda value: normalize_username(value) if value else value],
        validators=[DataRequired(), Length(max=USERNAME_MAX_LENGTH)],
    )
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(max=PASSWORD_MAX_LENGTH)]
    )


@dataclass(frozen=True, slots=True)
class SignedIn:
    """The logged-in user as views and templates read it: a row, not an ORM object,
    since every page of a signed-in visitor reads it and none changes it."""

    id: int
    username: str


_users = User.__table__.c
_SIGNED_IN = select(_users.id, _users.username).where(_users.id == bindparam("user_id"))


def load_logged_in_user() -> None:
    """Put the logged-in user in ``g.user`` and their name in ``g.username``.

    Templates use the plain ``g.username`` so that an error page never needs the
    database (which may be the very thing that failed).
    """
    g.user = None
    g.username = None
    if request.endpoint == "static" or request.blueprint == "health":
        return  # stylesheets and probes need no user, and must answer while the database is down
    user_id = session.get("user_id")
    if isinstance(user_id, int):
        row = db.session.execute(_SIGNED_IN, {"user_id": user_id}).first()
        if row is not None:
            g.user = SignedIn(*row)
            g.username = g.user.username


def login_required(view: F) -> F:
    """Send anonymous visitors to the login page, then back here."""

    @functools.wraps(view)
    def wrapped_view(*args: Any, **kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return cast(F, wrapped_view)


def is_safe_redirect(target: str | None) -> TypeGuard[str]:
    """Only a path on this site: no scheme, no host, no tricks browsers resolve off-site."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return False
    if any(ord(char) < 32 or char == "\\" for char in target):
        return False
    parts = urlsplit(target)
    return not parts.scheme and not parts.netloc


@bp.route("/register", methods=("GET", "POST"))
def register() -> str | Response:
    form = CredentialsForm()
    if form.validate_on_submit():
        try:
            create_user(cast(str, form.username.data), cast(str, form.password.data))
        except UsernameTaken:
            form.username.errors.append(USERNAME_TAKEN)
        else:
            flash("Your account is ready. Please log in.", "success")
            return redirect(url_for("auth.login"))
    return render_template("auth/register.html", form=form)


@bp.route("/login", methods=("GET", "POST"))
def login() -> str | Response:
    form = LoginForm()
    if request.method == "POST":
        login_limits().check()  # failed attempts per username and per address: a 429 past either
    if form.validate_on_submit():
        username = cast(str, form.username.data)
        # No account name holds a NUL, and PostgreSQL refuses one even in a WHERE clause.
        user = None if "\x00" in username else db.session.scalar(select(User).where(User.username == username))
        password = cast(str, form.password.data)
        if user is None:
            check_password_hash(_DUMMY_HASH, password)
        if user is None or not check_password_hash(user.password_hash, password):
            form.form_errors.append(BAD_LOGIN)
        else:
            session.clear()
            session["user_id"] = user.id
            flash(f"Welcome back, {user.username}.", "success")
            target = request.args.get("next")
            return redirect(target if is_safe_redirect(target) else url_for("index"))
    if request.method == "POST":
        login_limits().count_failure()  # the form again: a wrong password, or a form it refused
    return render_template("auth/login.html", form=form)


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    flash("You are logged out.", "info")
    return redirect(url_for("index"))
