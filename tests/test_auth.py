"""Accounts: registering, logging in and out, safe redirects, CSRF and login_required,
on every backend."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, g
from flask.testing import FlaskClient
from sqlalchemy import Select, false, select
from werkzeug.security import check_password_hash, generate_password_hash

import myapp.users
from myapp.auth import BAD_LOGIN, USERNAME_TAKEN, SignedIn
from myapp.db import db
from myapp.models import User
from tests.support.auth import AuthActions
from tests.support.certification import CertificationFailures
from tests.support.metrics import Delta

_FIELD_BLOCK = re.compile(
    r'<div class="field( has-error)?">\s*<label for="(?P<name>\w+)">(?P<inner>.*?)</div>', re.DOTALL
)
_CSRF_INPUT = re.compile(r'<input[^>]*name="csrf_token"[^>]*value="([^"]+)"')


def accounts(app: Flask) -> list[tuple[str, str]]:
    """(username, password_hash) of every stored account, read through the app's own
    session so that rows written inside the test's outer transaction are visible."""
    with app.app_context():
        return [tuple(row) for row in db.session.execute(select(User.username, User.password_hash))]  # type: ignore[misc]


def field_errors(html: str) -> dict[str, list[str]]:
    """The messages shown under each form field, keyed by the field's name."""
    return {
        match["name"]: re.findall(r'<p class="field-error">(.*?)</p>', match["inner"])
        for match in _FIELD_BLOCK.finditer(html)
    }


def csrf_token(client: FlaskClient, path: str) -> str:
    match = _CSRF_INPUT.search(client.get(path).get_data(as_text=True))
    assert match, f"no CSRF token in the form at {path}"
    return match.group(1)


# -- register --------------------------------------------------------------------------


def test_register_stores_one_hashed_account_and_sends_to_login(
    app: Flask, client: FlaskClient, auth: AuthActions
) -> None:
    response = auth.register("alice", "correct horse")

    assert response.status_code == 302
    assert response.headers["Location"] == "/auth/login"
    page = client.get("/auth/login").get_data(as_text=True)
    assert "Your account is ready. Please log in." in page
    [(username, password_hash)] = accounts(app)
    assert username == "alice"
    assert "correct horse" not in password_hash
    assert password_hash.startswith(("scrypt:", "pbkdf2:"))
    assert check_password_hash(password_hash, "correct horse")


@pytest.mark.parametrize("typed", [" Alice ", "ALICE", "Alice", "\u1d2c\u1d38\u1d35\u1d9c\u1d31"])
def test_register_normalises_the_username(app: Flask, auth: AuthActions, typed: str) -> None:
    # The last one is "ᴬᴸᴵᶜᴱ" (modifier letters), which NFKC folds to "ALICE".
    assert auth.register(typed).status_code == 302
    assert [name for name, _ in accounts(app)] == ["alice"]


def test_register_is_rerun_whole_after_a_certification_failure(
    app: Flask, auth: AuthActions, certification_failures: CertificationFailures
) -> None:
    certification_failures.next(1)
    delta = Delta()
    assert auth.register("alice").status_code == 302
    assert certification_failures.raised == 1
    assert delta("myapp_db_retries_total", reason="certification") == 1
    assert [name for name, _ in accounts(app)] == ["alice"]
    assert auth.login("alice").status_code == 302


@pytest.mark.parametrize("second", ["Alice", "ALICE", "alice ", " alice"])
def test_register_same_name_in_another_case_is_taken(
    app: Flask, client: FlaskClient, auth: AuthActions, second: str
) -> None:
    """MariaDB's default collation would call these equal and PostgreSQL would not;
    normalising first gives one answer everywhere."""
    assert auth.register("alice").status_code == 302

    response = auth.register(second, "another password")

    assert response.status_code == 200
    assert field_errors(response.get_data(as_text=True))["username"] == [USERNAME_TAKEN]
    assert len(accounts(app)) == 1


_LENGTH_3_80 = "Field must be between 3 and 80 characters long."
_LENGTH_8_256 = "Field must be between 8 and 256 characters long."
_BAD_CHARACTERS = "Use only letters a-z, digits, dots, dashes and underscores."
_REQUIRED = "This field is required."


@pytest.mark.parametrize(
    ("username", "password", "field", "message"),
    [
        pytest.param("", "correct horse", "username", _REQUIRED, id="empty-username"),
        pytest.param("   ", "correct horse", "username", _REQUIRED, id="blank-username"),
        pytest.param("ab", "correct horse", "username", _LENGTH_3_80, id="too-short"),
        pytest.param("a" * 81, "correct horse", "username", _LENGTH_3_80, id="too-long"),
        pytest.param("al ice", "correct horse", "username", _BAD_CHARACTERS, id="space"),
        pytest.param("alice!", "correct horse", "username", _BAD_CHARACTERS, id="punctuation"),
        pytest.param("älice", "correct horse", "username", _BAD_CHARACTERS, id="non-ascii"),
        pytest.param("<script>", "correct horse", "username", _BAD_CHARACTERS, id="markup"),
        pytest.param("al\x00ice", "correct horse", "username", _BAD_CHARACTERS, id="nul-byte"),
        pytest.param("alice", "", "password", _REQUIRED, id="empty-password"),
        pytest.param("alice", "x" * 7, "password", _LENGTH_8_256, id="password-7"),
        pytest.param("alice", "x" * 257, "password", _LENGTH_8_256, id="password-257"),
    ],
)
def test_register_rejects_bad_input_next_to_the_field(
    app: Flask, auth: AuthActions, username: str, password: str, field: str, message: str
) -> None:
    response = auth.register(username, password)

    assert response.status_code == 200
    errors = field_errors(response.get_data(as_text=True))
    assert errors[field] == [message]
    assert all(not shown for name, shown in errors.items() if name != field)
    assert accounts(app) == []


@pytest.mark.parametrize("password", ["x" * 8, "x" * 256])
def test_register_accepts_the_password_length_limits(app: Flask, auth: AuthActions, password: str) -> None:
    assert auth.register("alice", password).status_code == 302
    assert len(accounts(app)) == 1
    [(username, password_hash)] = accounts(app)
    assert username == "alice" and check_password_hash(password_hash, password)


@pytest.fixture
def blind_precheck(monkeypatch: pytest.MonkeyPatch) -> list[Select[Any]]:
    """Make register's "is this name free?" query find nothing, as it would if the
    other registration committed just after it ran; return the queries blinded."""
    blinded: list[Select[Any]] = []

    def select_missing_ids(*entities: Any) -> Select[Any]:
        statement = select(*entities)
        if len(entities) == 1 and entities[0] is User.id:
            blinded.append(statement := statement.where(false()))
        return statement

    # The pre-check is create_user's, which register calls.
    monkeypatch.setattr(myapp.users, "select", select_missing_ids)
    return blinded


def test_register_race_on_the_unique_constraint_is_a_form_error(
    app: Flask, client: FlaskClient, auth: AuthActions, blind_precheck: list[Select[Any]]
) -> None:
    """Every backend: the pre-check passes, the INSERT hits the unique index, and the
    user gets the form error (not a 500); the first account is untouched."""
    assert auth.register("alice", "first password").status_code == 302
    blind_precheck.clear()

    response = auth.register("Alice", "second password")

    assert len(blind_precheck) == 1  # the pre-check ran and found nothing
    assert response.status_code == 200
    assert field_errors(response.get_data(as_text=True))["username"] == [USERNAME_TAKEN]
    [(username, password_hash)] = accounts(app)
    assert username == "alice" and check_password_hash(password_hash, "first password")


@pytest.fixture
def rival_registers_during_hashing(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Commit "alice" from a second session between register's pre-check and its INSERT
    (the password is hashed in between), as a concurrent request would."""
    hashed: list[str] = []
    def hash_after_rival_commits(password: str) -> str:
        rival = db.get_session()
        try:
            with rival.begin():
                rival.add(User(username="alice", password_hash=generate_password_hash("rival password")))
        finally:
            rival.close()
        hashed.append(password)
        return generate_password_hash(password)

    monkeypatch.setattr(myapp.users, "generate_password_hash", hash_after_rival_commits)
    yield hashed


@pytest.mark.real_commits
@pytest.mark.backends("postgresql", "mysql")
def test_register_race_with_a_second_session(
    app: Flask, client: FlaskClient, auth: AuthActions, rival_registers_during_hashing: list[str]
) -> None:
    """A real interleaving needs two connections, so real commits; SQLite cannot
    interleave here at all (a POST's BEGIN IMMEDIATE holds the write lock from the
    pre-check to the commit), which the blinded pre-check test covers instead."""
    response = auth.register("alice", "my password")

    assert rival_registers_during_hashing == ["my password"]  # the pre-check did pass
    assert response.status_code == 200
    assert field_errors(response.get_data(as_text=True))["username"] == [USERNAME_TAKEN]
    [(username, password_hash)] = accounts(app)
    assert username == "alice" and check_password_hash(password_hash, "rival password")


# -- login -----------------------------------------------------------------------------


def test_login_sets_the_session_and_goes_home(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    auth.register()

    response = auth.login()

    assert response.status_code == 302
    assert response.headers["Location"] == "/"
    with client.session_transaction() as session:
        user_id = session["user_id"]
    with app.app_context():
        assert db.session.get(User, user_id).username == "alice"  # type: ignore[union-attr]
    assert "Welcome back, alice." in client.get("/").get_data(as_text=True)


def test_wrong_password_and_unknown_user_look_the_same(client: FlaskClient, auth: AuthActions) -> None:
    auth.register()
    client.get("/auth/login")  # show the registration flash now, not in the pages compared

    wrong_password = auth.login("alice", "wrong password")
    unknown_user = auth.login("bobby", "correct horse")

    assert wrong_password.status_code == unknown_user.status_code == 200
    # Identical pages apart from the echoed username.
    assert wrong_password.get_data(as_text=True).replace("alice", "bobby") == unknown_user.get_data(as_text=True)
    assert BAD_LOGIN in wrong_password.get_data(as_text=True)
    with client.session_transaction() as session:
        assert "user_id" not in session


@pytest.mark.parametrize("typed", ["ALICE", " Alice "])
def test_login_normalises_the_username(app: Flask, client: FlaskClient, auth: AuthActions, typed: str) -> None:
    auth.register()

    assert auth.login(typed).status_code == 302
    with client.session_transaction() as session:
        assert "user_id" in session
        user_id = session["user_id"]
    with app.app_context():
        assert db.session.get(User, user_id).username == "alice"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("target", "location"),
    [
        ("/posts/new", "/posts/new"),
        ("/users/alice?page=2", "/users/alice?page=2"),
        ("//evil.com", "/"),
        ("///evil.com", "/"),
        ("https://evil.com", "/"),
        ("http:evil.com", "/"),
        ("/\\evil.com", "/"),
        ("\\/evil.com", "/"),
        ("\\\\evil.com", "/"),
        ("javascript:alert(1)", "/"),
        ("\t/evil", "/"),
        ("/\t/evil.com", "/"),
        (" /evil.com", "/"),
        ("evil.com", "/"),
        ("", "/"),
    ],
)
def test_login_follows_only_same_site_next(client: FlaskClient, auth: AuthActions, target: str, location: str) -> None:
    auth.register()

    response = client.post(
        "/auth/login",
        query_string={"next": target},
        data={"username": "alice", "password": "correct horse"},
    )

    assert response.status_code == 302
    assert response.headers["Location"] == location


# -- logout and the navigation bar -----------------------------------------------------


def test_logout_clears_the_session(client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()

    response = auth.logout()

    assert response.status_code == 302
    assert response.headers["Location"] == "/"
    with client.session_transaction() as session:
        assert "user_id" not in session
    assert client.get("/posts/new").status_code == 302


def test_logout_by_get_is_refused(client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()

    response = client.get("/auth/logout")

    assert response.status_code == 405
    assert 'class="site-header"' in response.get_data(as_text=True)
    with client.session_transaction() as session:
        assert "user_id" in session


def test_nav_shows_who_is_logged_in(client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()

    page = client.get("/").get_data(as_text=True)

    assert '<a href="/users/alice" class="who">alice</a>' in page
    assert '<form class="inline" method="post" action="/auth/logout">' in page
    assert 'href="/auth/login"' not in page and 'href="/auth/register"' not in page


def test_the_signed_in_user_is_a_row_not_a_tracked_object(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    """Every page of a signed-in visitor loads the user; as a row it costs no identity
    map and no ORM object to track."""
    auth.register_and_login()
    with client.session_transaction() as cookie:
        user_id = cookie["user_id"]
    cookie = client.get_cookie(app.config["SESSION_COOKIE_NAME"])
    assert cookie is not None
    with app.test_request_context("/", headers={"Cookie": f"{cookie.key}={cookie.value}"}):
        app.preprocess_request()
        assert g.user == SignedIn(user_id, "alice") and g.username == "alice"
        assert len(db.session.identity_map) == 0


def test_nav_offers_login_and_register_when_anonymous(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)

    assert 'href="/auth/login"' in page and 'href="/auth/register"' in page
    assert 'action="/auth/logout"' not in page
    assert 'class="who"' not in page


# -- CSRF --------------------------------------------------------------------------------


@pytest.mark.parametrize("app_config", [{"WTF_CSRF_ENABLED": True}])
def test_post_without_csrf_token_is_a_400_page(app: Flask, client: FlaskClient) -> None:
    response = client.post("/auth/register", data={"username": "alice", "password": "correct horse"})

    assert response.status_code == 400
    page = response.get_data(as_text=True)
    assert 'class="site-header"' in page and "Bad request" in page
    assert accounts(app) == []


@pytest.mark.parametrize("app_config", [{"WTF_CSRF_ENABLED": True}])
def test_post_with_a_forged_csrf_token_is_refused(app: Flask, client: FlaskClient) -> None:
    client.get("/auth/register")  # a session with a real token exists; this one is not it

    response = client.post(
        "/auth/register",
        data={"username": "alice", "password": "correct horse", "csrf_token": "forged"},
    )

    assert response.status_code == 400
    assert accounts(app) == []


@pytest.mark.parametrize("app_config", [{"WTF_CSRF_ENABLED": True}])
def test_forms_work_with_the_csrf_token_from_the_page(app: Flask, client: FlaskClient) -> None:
    credentials = {"username": "alice", "password": "correct horse"}

    registered = client.post("/auth/register", data={**credentials, "csrf_token": csrf_token(client, "/auth/register")})
    logged_in = client.post("/auth/login", data={**credentials, "csrf_token": csrf_token(client, "/auth/login")})
    refused_logout = client.post("/auth/logout")
    with client.session_transaction() as session:
        still_logged_in = "user_id" in session
    logged_out = client.post("/auth/logout", data={"csrf_token": csrf_token(client, "/")})

    assert registered.status_code == 302 and len(accounts(app)) == 1
    assert logged_in.status_code == 302
    assert refused_logout.status_code == 400
    assert still_logged_in, "the logout without a token logged out"
    assert logged_out.status_code == 302
    with client.session_transaction() as session:
        assert "user_id" not in session


# -- login_required ----------------------------------------------------------------------


def test_login_required_sends_anonymous_visitors_to_login_and_back(client: FlaskClient, auth: AuthActions) -> None:
    response = client.get("/posts/new")

    assert response.status_code == 302
    assert response.headers["Location"] == "/auth/login?next=/posts/new"

    auth.register()
    back = client.post(response.headers["Location"], data={"username": "alice", "password": "correct horse"})
    assert back.headers["Location"] == "/posts/new"
    assert client.get("/posts/new").status_code == 200


def test_login_with_nul_in_username_is_the_usual_error(client: FlaskClient, auth: AuthActions) -> None:
    """PostgreSQL refuses NUL even in a WHERE clause; the answer must stay the plain "no"."""
    auth.register()
    response = auth.login("al\x00ice")
    assert response.status_code == 200
    assert BAD_LOGIN in response.get_data(as_text=True)
    with client.session_transaction() as session:
        assert "user_id" not in session
