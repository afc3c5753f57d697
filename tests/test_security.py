"""The security a public site needs, each point shown by an outcome: CSRF on every
state-changing request, password storage, login rate limits (in-process and across two
gunicorn workers), cookie flags, SECRET_KEY refusal, safe redirects, security headers,
escaping, bound parameters, and no secret in logs, CLI output, error pages or headers."""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import pytest
import requests
from flask import Flask, Response, request, url_for
from flask.testing import FlaskClient
from itsdangerous import BadSignature
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from werkzeug.security import check_password_hash, generate_password_hash
from werkzeug.test import TestResponse

import myapp.auth
import myapp.errors
from myapp.auth import BAD_LOGIN, PASSWORD_MIN_LENGTH, is_safe_redirect
from myapp.db import db
from myapp.models import Post, RateLimit, User
from myapp.login_limits import TOO_MANY_LOGINS, DatabaseStorage, LoginLimits
from tests.support.apps import SECRET_KEY, make_app
from tests.support.auth import AuthActions
from tests.support.certification import CertificationFailures
from tests.support.databases import Backend
from tests.support.forms import csrf_token
from tests.support.gunicorn import GUNICORN, ROOT, start_gunicorn, stop_gunicorn
from tests.support.network import free_port
from tests.support.queries import count_queries

PASSWORD = "correct horse"
TEMPLATES = ROOT / "myapp" / "templates"


def with_config(**settings: Any) -> pytest.MarkDecorator:
    """Give this test's ``app`` fixture extra settings."""
    return pytest.mark.parametrize("app_config", [settings], ids=["config"])


def limits_on(**settings: Any) -> pytest.MarkDecorator:
    return with_config(
        RATELIMIT_ENABLED=True,
        LOGIN_RATE_LIMIT="3 per minute",
        LOGIN_RATE_LIMIT_PER_ADDRESS="5 per minute",
        **settings,
    )


def add_user(app: Flask, username: str = "alice", password: str = PASSWORD) -> int:
    with app.app_context(), db.transaction() as session:
        user = User(username=username, password_hash=generate_password_hash(password))
        session.add(user)
    return user.id


def add_post(app: Flask, author_id: int, title: str = "Hello", body: str = "World") -> int:
    with app.app_context(), db.transaction() as session:
        post = Post(author_id=author_id, title=title, body=body)
        session.add(post)
    return post.id


def log_in_as(client: FlaskClient, user_id: int) -> None:
    with client.session_transaction() as session:
        session["user_id"] = user_id


def login(client: FlaskClient, username: str, password: str, **kwargs: Any) -> TestResponse:
    return client.post("/auth/login", data={"username": username, "password": password}, **kwargs)


def page_token(client: FlaskClient, path: str) -> str:
    """The CSRF token of the form at ``path``, whatever the order of its attributes."""
    for tag in re.findall(r"<input[^>]*>", client.get(path).get_data(as_text=True)):
        if 'name="csrf_token"' in tag:
            value = re.search(r'value="([^"]+)"', tag)
            assert value
            return value.group(1)
    raise AssertionError(f"no CSRF token at {path}")


def is_logged_in(client: FlaskClient) -> bool:
    return client.get("/posts/new").status_code == 200


# -- CSRF and logout ---------------------------------------------------------------------


@with_config(WTF_CSRF_ENABLED=True)
def test_every_post_route_refuses_a_request_without_csrf_token(app: Flask, client: FlaskClient) -> None:
    """Every rule that accepts POST, found in the URL map, so a new route is covered too."""
    alice = add_user(app)
    post_id = add_post(app, alice)
    log_in_as(client, alice)
    arguments = {"post_id": post_id, "username": "alice"}
    form = {"username": "mallory", "password": "long enough", "title": "Changed", "body": "Changed", "version": "1"}

    refused = set()
    with app.test_request_context():
        urls = {
            rule.endpoint: url_for(rule.endpoint, **{name: arguments[name] for name in rule.arguments})
            for rule in app.url_map.iter_rules()
            if "POST" in (rule.methods or ())
        }
    for endpoint, url in urls.items():
        response = client.post(url, data=form)
        assert response.status_code == 400, (endpoint, response.status_code)
        refused.add(endpoint)
    assert {"auth.register", "auth.login", "auth.logout", "posts.create", "posts.edit", "posts.delete"} <= refused

    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 1
        assert [(p.id, p.title, p.body) for p in db.session.scalars(select(Post))] == [(post_id, "Hello", "World")]
    assert is_logged_in(client), "a logout without a token must not log out"

    # Control: the same edit with the page's token goes through.
    token = page_token(client, f"/posts/{post_id}/edit")
    response = client.post(f"/posts/{post_id}/edit", data={**form, "version": "1", "csrf_token": token})
    assert response.status_code == 302
    with app.app_context():
        assert db.session.get(Post, post_id).title == "Changed"  # type: ignore[union-attr]


@with_config(WTF_CSRF_ENABLED=True)
def test_only_state_changing_methods_run_the_csrf_check(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads pay nothing for CSRF; every POST is checked once, by our hook alone."""
    checked: list[str] = []
    protect = myapp.auth.csrf.protect
    monkeypatch.setattr(myapp.auth.csrf, "protect", lambda **kw: (checked.append(request.path), protect(**kw)))
    for path in ("/healthz", "/", "/auth/login", "/no/such/page"):
        client.get(path)
        client.head(path)
    assert checked == []
    assert client.post("/auth/register", data={"username": "x"}).status_code == 400
    assert client.post("/auth/logout").status_code == 400
    assert checked == ["/auth/register", "/auth/logout"]


def test_logout_is_post_only(app: Flask, client: FlaskClient) -> None:
    log_in_as(client, add_user(app))
    assert client.get("/auth/logout").status_code == 405
    assert is_logged_in(client)
    assert client.post("/auth/logout").status_code == 302
    assert not is_logged_in(client)


# -- passwords -----------------------------------------------------------------------------


def test_passwords_are_stored_with_werkzeugs_default_hash(app: Flask, auth: AuthActions) -> None:
    assert auth.register("alice", PASSWORD).status_code == 302
    with app.app_context():
        stored = db.session.scalar(select(User.password_hash).where(User.username == "alice"))
    assert stored is not None and PASSWORD not in stored
    method = stored.split("$", 1)[0]
    assert method.startswith(("scrypt:", "pbkdf2:")), method
    assert method == generate_password_hash("anything").split("$", 1)[0], "not werkzeug's current default"
    assert check_password_hash(stored, PASSWORD)


@pytest.mark.parametrize(("length", "accepted"), [(PASSWORD_MIN_LENGTH - 1, False), (PASSWORD_MIN_LENGTH, True)])
def test_password_minimum_length(app: Flask, auth: AuthActions, length: int, accepted: bool) -> None:
    response = auth.register("alice", "p" * length)
    assert response.status_code == (302 if accepted else 200)
    if not accepted:
        assert re.search(rf"\b{PASSWORD_MIN_LENGTH}\b", response.get_data(as_text=True)), "the error names the minimum"
    with app.app_context():
        assert (db.session.scalar(select(func.count()).select_from(User)) == 1) is accepted


def test_login_error_is_identical_for_unknown_user_and_wrong_password(app: Flask, client: FlaskClient) -> None:
    unknown = login(client, "mallory", PASSWORD)
    add_user(app, "mallory", "another password")
    wrong = login(client, "mallory", PASSWORD)
    assert unknown.status_code == wrong.status_code == 200
    assert BAD_LOGIN in unknown.get_data(as_text=True)
    assert unknown.get_data() == wrong.get_data()


# -- login rate limits -----------------------------------------------------------------------


def stored_limit_keys(app: Flask) -> list[str]:
    with app.app_context():
        return sorted(db.session.scalars(select(RateLimit.key)))


def stored_counters(app: Flask) -> dict[str, int]:
    """The failed-login counters in the database, by bucket ("username:alice",
    "address:127.0.0.1"): stored keys look like "LIMITER/<bucket>/auth.login/5/1/minute"."""
    with app.app_context():
        return {key.split("/")[1]: count for key, count in db.session.execute(select(RateLimit.key, RateLimit.count))}


def address_counters(app: Flask) -> dict[str, int]:
    return {bucket: count for bucket, count in stored_counters(app).items() if bucket.startswith("address:")}


@limits_on()
def test_failed_logins_are_limited_per_username(app: Flask, client: FlaskClient) -> None:
    add_user(app, "alice")
    add_user(app, "bob")
    for _ in range(3):
        assert login(client, "alice", "wrong password").status_code == 200

    limited = login(client, "alice", PASSWORD)  # even the right password
    assert limited.status_code == 429
    page = limited.get_data(as_text=True)
    assert TOO_MANY_LOGINS in page and "Too many requests" in page and "</nav>" in page
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "frame-ancestors 'none'" in limited.headers["Content-Security-Policy"]
    assert not is_logged_in(client)
    assert login(client, " Alice", PASSWORD).status_code == 429, "the username is normalised first"

    # The counters live in the app's database, not in this process.
    keys = stored_limit_keys(app)
    assert any("username:alice" in key for key in keys) and any("address:127.0.0.1" in key for key in keys)
    # Another account from the same address is still welcome (3 failures < 5).
    assert login(client, "bob", PASSWORD).status_code == 302


@limits_on()
def test_failed_logins_are_limited_per_client_address(app: Flask, client: FlaskClient) -> None:
    add_user(app, "alice")
    for number in range(5):
        assert login(client, f"nobody{number}", "wrong password").status_code == 200
    assert login(client, "alice", PASSWORD).status_code == 429
    assert not is_logged_in(client)
    assert address_counters(app) == {"address:127.0.0.1": 5}
    elsewhere = login(client, "alice", PASSWORD, environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert elsewhere.status_code == 302
    assert is_logged_in(client)
    assert address_counters(app) == {"address:127.0.0.1": 5}  # a success adds no counter


@limits_on()
def test_a_failed_login_is_counted_once_when_its_count_loses_certification(
    app: Flask, client: FlaskClient, certification_failures: CertificationFailures
) -> None:
    """The counter's upsert loses its first commit (error 1213, as on Galera) and is
    re-run whole: each bucket counts the attempt once, neither twice nor not at all."""
    certification_failures.next(1)
    assert login(client, "nobody", "wrong password").status_code == 200
    assert certification_failures.raised == 1
    assert stored_counters(app) == {"username:nobody": 1, "address:127.0.0.1": 1}


@limits_on()
def test_successful_logins_are_not_counted(app: Flask, client: FlaskClient) -> None:
    add_user(app, "alice")
    for _ in range(6):
        assert login(client, "alice", PASSWORD).status_code == 302
        assert client.post("/auth/logout").status_code == 302
    assert stored_counters(app) == {}
    # Control: the limiter is on and counting, so the empty table above means something.
    assert login(client, "alice", "wrong password").status_code == 200
    assert stored_counters(app) == {"username:alice": 1, "address:127.0.0.1": 1}


@limits_on()
def test_only_posts_to_the_login_view_are_limited(app: Flask, client: FlaskClient) -> None:
    """The login limits are the limiter's default limits: every other route, and a GET
    of the login page, is neither counted nor refused."""
    for _ in range(6):
        assert client.get("/auth/login").status_code == 200
        # A refused registration shows its form again (200), as a failed login does.
        assert client.post("/auth/register", data={"username": "x", "password": "short"}).status_code == 200
        assert client.get("/").status_code == 200
    assert stored_counters(app) == {}
    # Control: the limiter is on and counting.
    assert login(client, "nobody", "wrong password").status_code == 200
    assert stored_counters(app) == {"username:nobody": 1, "address:127.0.0.1": 1}


@limits_on()
def test_a_spoofed_forwarded_for_does_not_change_the_bucket(app: Flask, client: FlaskClient) -> None:
    for number in range(5):
        headers = {"X-Forwarded-For": f"198.51.100.{number}"}
        assert login(client, f"nobody{number}", "wrong", headers=headers).status_code == 200
    assert login(client, "nobody9", "wrong", headers={"X-Forwarded-For": "198.51.100.99"}).status_code == 429
    assert address_counters(app) == {"address:127.0.0.1": 5}


@limits_on(PROXY_FIX_X_FOR=1)
def test_behind_a_trusted_proxy_each_forwarded_client_has_its_bucket(app: Flask, client: FlaskClient) -> None:
    for number in range(5):
        assert login(client, f"nobody{number}", "wrong", headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 200
    assert login(client, "nobody9", "wrong", headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 429
    assert login(client, "nobody9", "wrong", headers={"X-Forwarded-For": "198.51.100.2"}).status_code == 200
    assert address_counters(app) == {"address:198.51.100.1": 5, "address:198.51.100.2": 1}


@limits_on(PROPAGATE_EXCEPTIONS=False)
def test_a_failing_limiter_storage_fails_open_never_500(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The storage alone fails (the database still answers the login): logins go on, and
    the failure is logged."""
    add_user(app, "alice")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("SELECT rate_limit", {}, Exception("server closed the connection"))

    monkeypatch.setattr(DatabaseStorage, "_read", broken)
    monkeypatch.setattr(DatabaseStorage, "incr", broken)
    with caplog.at_level(logging.ERROR, logger="myapp.login_limits"):
        statuses = [login(client, "alice", "wrong password").status_code for _ in range(5)]
        assert statuses == [200] * 5
        assert login(client, "alice", PASSWORD).status_code == 302
    assert "server closed the connection" in caplog.text
    assert is_logged_in(client)


@limits_on()
def test_a_429_whose_reset_time_cannot_be_read_logs_it_and_falls_back_to_the_window(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The limit was read before the view, but the counter's expiry cannot be read for
    the page: still a 429, its Retry-After the whole window, and a warning saying why."""
    for _ in range(3):
        assert login(client, "alice", "wrong password").status_code == 200

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("SELECT rate_limit.expires_at", {}, Exception("server closed the connection"))

    monkeypatch.setattr(DatabaseStorage, "get_expiry", broken)
    with caplog.at_level(logging.WARNING, logger="myapp.login_limits"):
        limited = login(client, "alice", "wrong password")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "60", "the whole window of '3 per minute'"
    warnings = [record for record in caplog.records if record.name == "myapp.login_limits"]
    assert [record.levelno for record in warnings] == [logging.WARNING]
    assert "server closed the connection" in warnings[0].getMessage()


def test_rate_limits_are_off_under_testing_unless_enabled(app: Flask, client: FlaskClient) -> None:
    add_user(app, "alice")
    assert app.config["RATELIMIT_ENABLED"] is False
    for _ in range(8):
        assert login(client, "alice", "wrong password").status_code == 200
    assert login(client, "alice", PASSWORD).status_code == 302
    assert stored_counters(app) == {}


# -- over real gunicorn: the limit holds across two workers ----------------------------------


@pytest.fixture
def limited_server(request: pytest.FixtureRequest, app: Flask, backend: Backend, tmp_path: Path) -> Iterator[Any]:
    """gunicorn, 2 workers, with the rate-limit storage named by the test's parameter."""
    running = start_gunicorn(
        backend.url.render_as_string(hide_password=False),
        tmp_path,
        LOGIN_RATE_LIMIT="4 per minute",
        LOGIN_RATE_LIMIT_PER_ADDRESS="1000 per minute",
        RATELIMIT_STORAGE_URI=request.param,
        # Four logins at once may land on one worker, whose bulkhead (gunicorn's default:
        # threads - 1) would answer one of them 503: counted neither way, it blurs the
        # limit being measured. The bulkhead has tests of its own.
        DATABASE_BULKHEAD="0",
        # The worker's pid in gunicorn's access log shows which worker answered.
        GUNICORN_ACCESS_LOG="-",
        GUNICORN_CMD_ARGS="--access-logformat 'pid=%(p)s %(m)s %(U)s %(s)s'",
    )
    try:
        yield running
    finally:
        stop_gunicorn(running)
    assert "Traceback" not in running.log_text()


def _login_over_http(url: str, username: str, password: str) -> int:
    # A fresh connection each time, so that either worker may take it.
    with requests.Session() as browser:
        token = csrf_token(browser.get(f"{url}/auth/login", timeout=10).text)
        response = browser.post(
            f"{url}/auth/login",
            data={"username": username, "password": password, "csrf_token": token},
            headers={"Connection": "close"},
            allow_redirects=False,
            timeout=10,
        )
        return response.status_code


@pytest.mark.gunicorn
@pytest.mark.real_commits
@pytest.mark.parametrize(
    ("limited_server", "allowed"),
    [("myapp-db://", "exactly 4"), ("memory://", "more than 4")],
    indirect=["limited_server"],
    ids=["database-storage", "negative-control-memory"],
)
def test_login_limit_holds_across_gunicorn_workers(app: Flask, limited_server: Any, allowed: str) -> None:
    """Four failures allowed per minute: with the database storage, four in all; with
    per-process memory (the negative control), each worker allows its own four."""
    add_user(app, "alice")
    statuses: list[int] = []
    pids: set[str] = set()
    with ThreadPoolExecutor(max_workers=4) as pool:
        # Concurrent bursts spread the attempts over both workers; stop once both
        # have answered login attempts and the limit has been reached.
        for _ in range(10):
            statuses += pool.map(lambda _: _login_over_http(limited_server.url, "alice", "wrong"), range(4))
            pids = set(re.findall(r"pid=<?(\d+)>? POST /auth/login", limited_server.log_text()))
            if len(pids) >= 2 and 429 in statuses:
                break
    assert len(pids) == 2, f"one worker answered every attempt: {pids}"
    assert set(statuses) == {200, 429}
    if allowed == "more than 4":
        assert statuses.count(200) > 4, statuses
        return
    # Four failures in all, not four per worker: the counter is shared.
    assert statuses.count(200) == 4, statuses
    assert _login_over_http(limited_server.url, "alice", PASSWORD) == 429
    assert _login_over_http(limited_server.url, "bob", "wrong") == 200
    with app.app_context():
        assert db.session.scalar(select(RateLimit.count).where(RateLimit.key.contains("username:alice"))) == 4


# -- session cookie ---------------------------------------------------------------------------


def session_cookie_flags(response: TestResponse) -> set[str]:
    for header in response.headers.getlist("Set-Cookie"):
        if header.startswith("session="):
            return {part.strip().split("=")[0].lower() for part in header.split(";")[1:]} | {
                part.strip().lower() for part in header.split(";")[1:] if part.strip().lower().startswith("samesite")
            }
    raise AssertionError("no session cookie set")


def test_session_cookie_is_httponly_and_lax_but_not_secure_over_http(app: Flask, client: FlaskClient) -> None:
    add_user(app)
    flags = session_cookie_flags(login(client, "alice", PASSWORD))
    assert {"httponly", "samesite=lax"} <= flags and "secure" not in flags
    spoofed = session_cookie_flags(login(client, "alice", PASSWORD, headers={"X-Forwarded-Proto": "https"}))
    assert "secure" not in spoofed, "X-Forwarded-Proto is not trusted without PROXY_FIX_X_PROTO"


@with_config(SESSION_COOKIE_SECURE=True)
def test_session_cookie_is_secure_when_configured(app: Flask, client: FlaskClient) -> None:
    add_user(app)
    assert {"httponly", "samesite=lax", "secure"} <= session_cookie_flags(login(client, "alice", PASSWORD))


@with_config(PROXY_FIX_X_PROTO=1)
def test_session_cookie_is_secure_over_https_behind_a_trusted_proxy(app: Flask, client: FlaskClient) -> None:
    add_user(app)
    response = login(client, "alice", PASSWORD, headers={"X-Forwarded-Proto": "https"})
    assert {"httponly", "samesite=lax", "secure"} <= session_cookie_flags(response)
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    plain = login(client, "alice", PASSWORD)
    assert "secure" not in session_cookie_flags(plain) and "Strict-Transport-Security" not in plain.headers


def test_the_session_follows_a_new_secret_key_and_its_fallbacks(app: Flask, client: FlaskClient) -> None:
    """The cookie's signing serializer is built once per app, not per request: a key
    rotated afterwards (SECRET_KEY_FALLBACKS) must still be what signs and verifies."""
    with client.session_transaction() as session:
        session["user_id"] = 12345
    cookie = client.get_cookie("session")
    assert cookie is not None
    interface = app.session_interface
    assert interface.get_signing_serializer(app).loads(cookie.value) == {"user_id": 12345}

    old_key, app.secret_key = app.secret_key, secrets.token_hex(32)
    with pytest.raises(BadSignature):
        interface.get_signing_serializer(app).loads(cookie.value)
    app.config["SECRET_KEY_FALLBACKS"] = [old_key]
    rotated = interface.get_signing_serializer(app)
    assert rotated.loads(cookie.value) == {"user_id": 12345}
    resigned = rotated.dumps({"user_id": 1})
    app.config["SECRET_KEY_FALLBACKS"] = []
    assert interface.get_signing_serializer(app).loads(resigned) == {"user_id": 1}, "signed with the new key"


# -- SECRET_KEY refusal --------------------------------------------------------------------------

REFUSAL = "SECRET_KEY must be set to a random value of at least 32 characters"


def _environment(tmp_path: Path, secret_key: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("FLASK_", "SECRET"))}
    # Set, even when empty: python-dotenv never overrides a variable that exists.
    environment.update(FLASK_APP="myapp", FLASK_DEBUG="0", SECRET_KEY=secret_key,
                       DATABASE_URL=f"sqlite:///{tmp_path / 'refused.sqlite'}")
    return environment


@pytest.mark.parametrize("secret_key", ["", "dev", "short-but-not-empty"], ids=["missing", "known-weak", "short"])
def test_flask_refuses_to_start_without_a_real_secret_key_in_one_line(tmp_path: Path, secret_key: str) -> None:
    flask = Path(sys.executable).with_name("flask")
    result = subprocess.run(
        [str(flask), "user", "list"], cwd=tmp_path, env=_environment(tmp_path, secret_key),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: " + REFUSAL), result.stderr


@pytest.mark.gunicorn
def test_gunicorn_refuses_to_start_without_a_secret_key(tmp_path: Path) -> None:
    environment = _environment(tmp_path, "")
    environment.update(GUNICORN_BIND=f"127.0.0.1:{free_port()}", WEB_CONCURRENCY="2")
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as sink:
        result = subprocess.run(
            [str(GUNICORN), "-c", "gunicorn.conf.py", "--no-control-socket", "wsgi:app"], cwd=ROOT, env=environment,
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60,
        )
    output = log.read_text(errors="replace")
    assert result.returncode != 0, output
    # The reason is one complete line that names the setting to fix.
    reasons = [line for line in output.splitlines() if REFUSAL in line]
    assert len(reasons) == 1 and reasons[0].startswith("Error: SECRET_KEY"), output
    assert reasons[0].rstrip().endswith("in .env or the environment."), output
    assert "Traceback" not in output


# -- ?next= -----------------------------------------------------------------------------------------

HOSTILE_NEXT = [
    "//evil.example", "///evil.example", "////evil.example", "/\\evil.example", "\\/evil.example",
    "\\\\evil.example", "https://evil.example", "https:evil.example", "http:/evil.example",
    "javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/html,hi", " //evil.example",
    "/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example", "\x00//evil.example",
    "evil.example", "http://localhost@evil.example/", "//localhost@evil.example", "",
]


@pytest.mark.parametrize("target", HOSTILE_NEXT)
def test_hostile_next_values_are_refused(target: str) -> None:
    assert not is_safe_redirect(target)


@pytest.mark.parametrize("target", ["/", "/posts/new", "/users/alice?page=2", "/posts/1/edit#title"])
def test_own_paths_are_accepted(target: str) -> None:
    assert is_safe_redirect(target)


def test_login_never_redirects_off_site(app: Flask, client: FlaskClient) -> None:
    add_user(app)
    for target in HOSTILE_NEXT:
        response = client.post(
            "/auth/login?" + "next=" + quote(target, safe=""), data={"username": "alice", "password": PASSWORD}
        )
        assert response.status_code == 302
        # Where a browser would really go, resolving the Location against the page.
        landing = urlsplit(urljoin("http://localhost/auth/login", response.headers["Location"]))
        assert (landing.scheme, landing.netloc, landing.path) == ("http", "localhost", "/"), (target, response.headers["Location"])
        client.post("/auth/logout")
    own = client.post("/auth/login?next=/posts/new", data={"username": "alice", "password": PASSWORD})
    assert own.headers["Location"] == "/posts/new"


# -- security headers and templates -------------------------------------------------------------------


def assert_security_headers(response: TestResponse) -> None:
    policy = response.headers.get("Content-Security-Policy", "")
    directives = {part.strip() for part in policy.split(";")}
    assert {"default-src 'self'", "frame-ancestors 'none'", "form-action 'self'", "base-uri 'self'"} <= directives, policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert response.headers.get("X-Content-Type-Options") == "nosniff"
    assert response.headers.get("X-Frame-Options") == "DENY"
    assert response.headers.get("Referrer-Policy") in ("same-origin", "strict-origin", "strict-origin-when-cross-origin")


def test_json_answers_carry_the_headers_that_apply_to_data(app: Flask, client: FlaskClient) -> None:
    """The probes answer JSON: not sniffed as HTML, not framed; the page-only headers
    (Referrer-Policy, COOP, the page's CSP) are left off. Their HTML error pages get all."""
    for path in ("/healthz", "/readyz"):
        response = client.get(path)
        assert response.status_code == 200 and response.is_json, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        policy = {part.strip() for part in response.headers["Content-Security-Policy"].split(";")}
        assert policy == {"default-src 'none'", "frame-ancestors 'none'"}
        assert "Referrer-Policy" not in response.headers and "Cross-Origin-Opener-Policy" not in response.headers
    refused = client.post("/healthz")
    assert refused.status_code == 405 and refused.mimetype == "text/html"
    assert_security_headers(refused)


@with_config(PROXY_FIX_X_PROTO=1)
def test_json_answers_over_https_carry_strict_transport_security(app: Flask, client: FlaskClient) -> None:
    response = client.get("/healthz", headers={"X-Forwarded-Proto": "https"})
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@with_config(PROPAGATE_EXCEPTIONS=False, WTF_CSRF_ENABLED=True, MAX_CONTENT_LENGTH=1000,
             RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT="1 per minute")
def test_every_kind_of_response_carries_the_security_headers(app: Flask, client: FlaskClient) -> None:
    def crash() -> str:
        raise RuntimeError("boom")

    def database_down() -> str:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    app.add_url_rule("/_test/crash", view_func=crash)
    app.add_url_rule("/_test/down", view_func=database_down)
    credentials = {"username": "alice", "password": "wrong", "csrf_token": page_token(client, "/auth/login")}
    assert login(client, "alice", "wrong").status_code == 400  # no token: not counted
    assert client.post("/auth/login", data=credentials).status_code == 200  # one failure: the limit

    responses = {
        200: client.get("/"),
        "static": client.get("/static/style.css"),
        302: client.get("/posts/new"),
        400: client.post("/auth/register", data={"username": "x"}),
        404: client.get("/no/such/page"),
        405: client.get("/auth/logout"),
        413: client.post("/auth/login", data={"username": "x" * 5000}),
        429: client.post("/auth/login", data=credentials),
        500: client.get("/_test/crash"),
        503: client.get("/_test/down"),
    }
    for expected, response in responses.items():
        assert response.status_code == (200 if expected == "static" else expected), expected
        assert_security_headers(response)
        response.close()


def test_security_headers_are_added_after_a_hook_replaced_the_response(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook that an extension registers while create_app assembles the app may
    replace the response (as the database's DATABASE_COMMIT_ON_SUCCESS hook does with
    an error page): the headers are added to the replacement, so they are added last."""
    register_errors = myapp.errors.init_app

    def register_errors_and_a_replacing_hook(app: Flask) -> None:
        register_errors(app)

        @app.after_request
        def replace(response: Response) -> Response:
            return Response("replaced", status=418)

    monkeypatch.setattr(myapp.errors, "init_app", register_errors_and_a_replacing_hook)
    app = make_app(backend.url)
    try:
        response = app.test_client().get("/healthz")
    finally:
        app.extensions["myapp.database"].engine.dispose()
    assert (response.status_code, response.get_data(as_text=True)) == (418, "replaced")
    assert_security_headers(response)


_INLINE = [
    re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.IGNORECASE),  # inline script
    re.compile(r"<style\b", re.IGNORECASE),
    re.compile(r"""\sstyle\s*=\s*["']""", re.IGNORECASE),
    re.compile(r"""\son[a-z]+\s*=\s*["']""", re.IGNORECASE),  # onclick= and friends
    re.compile(r"javascript:", re.IGNORECASE),
]


def inline_code(html: str) -> list[str]:
    return [match.group(0) for pattern in _INLINE for match in pattern.finditer(html)]


def test_no_template_has_inline_script_or_style() -> None:
    templates = sorted(TEMPLATES.rglob("*.html"))
    assert len(templates) >= 5
    found = {str(path.relative_to(TEMPLATES)): inline_code(path.read_text()) for path in templates}
    assert not {name: hits for name, hits in found.items() if hits}


# -- escaping and bound parameters ------------------------------------------------------------------

SCRIPT_TITLE = '<script>alert("title")</script>"><img src=x onerror=alert(1)>'
SCRIPT_BODY = "<script>alert('body')</script><style>body{display:none}</style>"


def test_script_in_a_post_is_inert_on_every_page(app: Flask, client: FlaskClient) -> None:
    alice = add_user(app)
    log_in_as(client, alice)
    created = client.post("/posts/new", data={"title": SCRIPT_TITLE, "body": SCRIPT_BODY})
    assert created.status_code == 302
    post_path = created.headers["Location"]

    for path in ["/", post_path, "/users/alice", f"{post_path}/edit"]:
        response = client.get(path)
        page = response.get_data(as_text=True)
        assert response.status_code == 200, path
        assert "&lt;script&gt;" in page, path
        assert not inline_code(page), (path, inline_code(page))
        assert "<img src=x" not in page, path
        assert_security_headers(response)


HOSTILE_NAMES = ["' OR 1=1 --", "alice' --", "x'; DROP TABLE user; --", '" OR ""="']


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_username_is_just_a_name(app: Flask, client: FlaskClient, name: str) -> None:
    alice = add_user(app, "alice")
    add_post(app, alice, title="Alice's post")
    with count_queries(app) as queries:
        response = login(client, name, "anything at all")
        user_page = client.get("/users/" + quote(name, safe=""))
    assert response.status_code == 200 and BAD_LOGIN in response.get_data(as_text=True)
    assert user_page.status_code == 404 and "Alice&#39;s post" not in user_page.get_data(as_text=True)
    assert not is_logged_in(client)
    assert queries.statements and not any("1=1" in s or "DROP" in s or "--" in s for s in queries.statements)

    # Stored under that very name (bypassing the form's rules), it is one account.
    hostile = add_user(app, name.casefold(), "hostile password")
    add_post(app, hostile, title="Hostile post")
    assert login(client, name, "hostile password").status_code == 302
    with client.session_transaction() as session:
        assert session["user_id"] == hostile
    page = client.get("/users/" + quote(name.casefold(), safe="")).get_data(as_text=True)
    assert "Hostile post" in page and "Alice&#39;s post" not in page
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 2


# -- no secret in output ------------------------------------------------------------------------------------


@pytest.fixture
def password_url(backend: Backend) -> Iterator[tuple[URL, str | None]]:
    """The backend's URL with a password that works (SQLite has none)."""
    if backend.is_sqlite:
        yield backend.url, None
        return
    password = "Db-Pw-" + secrets.token_hex(8)
    if backend.name == "postgresql":
        yield backend.url.set(password=password), password  # trust auth ignores it
        return
    user = "sec_" + secrets.token_hex(4)
    admin = create_engine(backend.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
            connection.execute(text(f"GRANT ALL PRIVILEGES ON {backend.url.database}.* TO '{user}'@'%'"))
        yield backend.url.set(username=user, password=password), password
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP USER IF EXISTS '{user}'@'%'"))
        admin.dispose()


def assert_no_secret(where: str, output: str, secrets_: list[str]) -> None:
    leaked = [secret for secret in secrets_ if secret in output]
    assert not leaked, f"{where} shows {leaked}"


@pytest.mark.real_commits
def test_no_secret_in_logs_pages_headers_or_cli(
    app: Flask,
    password_url: tuple[URL, str | None],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, db_password = password_url
    debug_app = make_app(
        url, DEBUG=True, DATABASE_ECHO=True, DATABASE_SLOW_QUERY_MS=1e-9, PROPAGATE_EXCEPTIONS=False,
        RATELIMIT_ENABLED=True,
    )

    def duplicate_user() -> str:
        """An IntegrityError whose parameters hold a password hash."""
        existing = db.session.scalar(select(User).where(User.username == "alice"))
        assert existing is not None
        with db.transaction() as session:
            session.add(User(username="alice", password_hash=existing.password_hash))
        return "unreachable"

    debug_app.add_url_rule("/_test/duplicate", view_func=duplicate_user)
    outputs: dict[str, str] = {}
    caplog.set_level(logging.DEBUG)
    try:
        client = debug_app.test_client()
        auth = AuthActions(client)
        steps = [
            auth.register("alice", PASSWORD), auth.login("alice", "wrong password"), auth.login("alice", PASSWORD),
            client.post("/posts/new", data={"title": "Mine", "body": "Text"}), client.get("/"),
            client.get("/users/alice"), client.get("/no/such/page"), client.get("/_test/duplicate"),
            auth.logout(),
        ]
        assert steps[2].status_code == 302 and steps[7].status_code == 500
        assert "X-Query-Count" in steps[4].headers, "debug headers are part of what is checked"
        for number, response in enumerate(steps):
            outputs[f"response {number}"] = str(response.headers) + response.get_data(as_text=True)
        runner = debug_app.test_cli_runner()
        for command, given in ((["db", "status"], None), (["user", "list"], None),
                               (["user", "create", "bob"], f"{PASSWORD}\n{PASSWORD}\n")):
            result = runner.invoke(args=command, input=given)
            assert result.exit_code == 0, result.output
            outputs[" ".join(command)] = result.output
        with debug_app.app_context():
            hashes = list(db.session.scalars(select(User.password_hash)))
    finally:
        debug_app.extensions["myapp.database"].engine.dispose()
        debug_app.extensions["myapp.database"].probe_engine.dispose()

    captured = capsys.readouterr()
    outputs["logs"] = caplog.text
    outputs["stdout"], outputs["stderr"] = captured.out, captured.err
    assert "slow query" in caplog.text and "rate_limit" in caplog.text, "the SQL logs were captured"
    assert len(hashes) == 2
    forbidden = [SECRET_KEY, PASSWORD, *hashes, *(h.split("$", 1)[1] for h in hashes)]
    if db_password is not None:
        forbidden.append(db_password)
        assert "***" in outputs["db status"]
    for where, output in outputs.items():
        assert_no_secret(where, output, forbidden)


@pytest.mark.parametrize("driver", ["postgresql+psycopg", "mysql+pymysql"])
def test_no_database_password_when_the_database_is_down(
    driver: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """503 pages, /readyz, the login (rate-limited, failing open) and `flask db status`
    with an unreachable server: never a 500, never the password."""
    db_password = "Down-Pw-" + secrets.token_hex(8)
    url = make_url(f"{driver}://myapp:{db_password}@127.0.0.1:{free_port()}/myapp")
    app = make_app(url, PROPAGATE_EXCEPTIONS=False, RATELIMIT_ENABLED=True, DATABASE_CONNECT_TIMEOUT=2)
    caplog.set_level(logging.DEBUG)
    try:
        client = app.test_client()
        index, ready, login_attempt = client.get("/"), client.get("/readyz"), login(client, "alice", PASSWORD)
        status = app.test_cli_runner().invoke(args=["db", "status"])
    finally:
        app.extensions["myapp.database"].engine.dispose()
    assert index.status_code == ready.status_code == login_attempt.status_code == 503
    assert index.headers["Retry-After"] and login_attempt.headers["Retry-After"]
    assert status.exit_code == 1 and "***" in status.output
    for where, output in {
        "index": index.get_data(as_text=True), "readyz": ready.get_data(as_text=True),
        "login": login_attempt.get_data(as_text=True), "db status": status.output, "logs": caplog.text,
    }.items():
        assert_no_secret(where, output, [db_password, SECRET_KEY])


@limits_on()
def test_only_the_login_post_runs_the_limits(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other request pays nothing for them: no hook of the limiter runs."""
    calls: list[str] = []
    monkeypatch.setattr(LoginLimits, "check", lambda self: calls.append("check"))
    monkeypatch.setattr(LoginLimits, "count_failure", lambda self: calls.append("count"))
    client.get("/healthz")
    client.get("/")
    client.get("/auth/login")
    client.post("/auth/register", data={"username": "x", "password": "short"})
    assert calls == []
    login(client, "nobody", "wrong password")
    assert calls == ["check", "count"]
