"""The ``flask`` commands: users, demo data, database status, and their one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from alembic.script import ScriptDirectory
from click.testing import Result
from flask import Flask
from sqlalchemy import func, select
from werkzeug.security import check_password_hash

from myapp.db.breaker import Guards
from myapp.cli import alembic_config
from myapp.db import db
from myapp.db.errors import mask_url
from myapp.models import Post, User
from tests.support.apps import SECRET_KEY
from tests.support.certification import CertificationFailures
from tests.support.databases import UNREACHABLE_URLS, Backend

FLASK = Path(sys.executable).with_name("flask")
PASSWORD = "correct horse"

def assert_one_line_error(result: Result, *, exit_code: int | None = None) -> str:
    """The command failed with exactly one ``Error:`` line, last, and no traceback."""
    assert result.exit_code != 0, result.output
    if exit_code is not None:
        assert result.exit_code == exit_code, result.output
    # Anything but SystemExit means click did not handle it: a traceback for the user.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


def users(app: Flask) -> dict[str, User]:
    with app.app_context():
        return {user.username: user for user in db.session.scalars(select(User))}


def count(app: Flask, model: type[Any]) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(model)) or 0


def create_user(runner: Any, name: str, password: str = PASSWORD) -> Result:
    return runner.invoke(args=["user", "create", name, "--password", password])


# -- flask user ---------------------------------------------------------------------


def test_user_create_stores_a_hashed_normalised_user(app: Flask, runner: Any) -> None:
    result = create_user(runner, "  Alice ")
    assert result.exit_code == 0, result.output
    assert "Created user alice." in result.output
    stored = users(app)
    assert list(stored) == ["alice"]
    password_hash = stored["alice"].password_hash
    assert PASSWORD not in password_hash
    assert check_password_hash(password_hash, PASSWORD)


def test_user_create_and_set_password_are_rerun_whole_after_a_certification_failure(
    app: Flask, runner: Any, certification_failures: CertificationFailures
) -> None:
    certification_failures.next(1)
    assert create_user(runner, "alice").exit_code == 0
    certification_failures.next(1)
    result = runner.invoke(args=["user", "set-password", "alice", "--password", "another password"])
    assert result.exit_code == 0, result.output
    assert certification_failures.raised == 2
    stored = users(app)
    assert list(stored) == ["alice"] and check_password_hash(stored["alice"].password_hash, "another password")


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("ALICE", PASSWORD, "already taken"),  # taken once normalised
        ("bad name!", PASSWORD, "letters a-z"),
        ("bob", "short", "between 8 and"),
        ("", PASSWORD, "username"),
    ],
    ids=["taken", "bad-name", "short-password", "empty-name"],
)
def test_user_create_refuses_bad_input_in_one_line(
    app: Flask, runner: Any, name: str, password: str, message: str
) -> None:
    assert create_user(runner, "alice").exit_code == 0
    result = create_user(runner, name, password)
    line = assert_one_line_error(result)
    assert message in line
    assert password not in line
    assert list(users(app)) == ["alice"]


def test_user_list_shows_users_with_their_post_counts(app: Flask, runner: Any) -> None:
    empty = runner.invoke(args=["user", "list"])
    assert empty.exit_code == 0 and "No users yet" in empty.output

    for name in ("alice", "bob"):
        assert create_user(runner, name).exit_code == 0
    alice = users(app)["alice"]
    with app.app_context(), db.transaction() as session:
        session.add_all(Post(author_id=alice.id, title=f"t{n}", body="b") for n in range(2))

    result = runner.invoke(args=["user", "list"])
    assert result.exit_code == 0, result.output
    assert "No users yet" not in result.output
    rows = [line.split() for line in result.output.splitlines()[1:]]  # id, name, date, time, posts
    posts = {fields[1]: int(fields[-1]) for fields in rows}
    assert posts == {"alice": 2, "bob": 0}


def test_user_set_password_replaces_the_hash(app: Flask, runner: Any) -> None:
    assert create_user(runner, "alice").exit_code == 0
    old_hash = users(app)["alice"].password_hash

    result = runner.invoke(args=["user", "set-password", "Alice", "--password", "a new password"])
    assert result.exit_code == 0, result.output
    new_hash = users(app)["alice"].password_hash
    assert new_hash != old_hash
    assert not check_password_hash(new_hash, PASSWORD)
    assert check_password_hash(new_hash, "a new password")


def test_user_set_password_of_an_unknown_user_is_one_line(app: Flask, runner: Any) -> None:
    result = runner.invoke(args=["user", "set-password", "nobody", "--password", "a new password"])
    line = assert_one_line_error(result, exit_code=1)
    assert "nobody" in line
    assert count(app, User) == 0


def test_user_create_prompts_for_the_password_twice(app: Flask, runner: Any) -> None:
    result = runner.invoke(args=["user", "create", "carol"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output  # hidden input is not echoed
    assert check_password_hash(users(app)["carol"].password_hash, PASSWORD)


# -- flask seed ---------------------------------------------------------------------


def test_seed_creates_exactly_the_rows_asked_for(app: Flask, runner: Any) -> None:
    result = runner.invoke(args=["seed", "--users", "3", "--posts", "10"])
    assert result.exit_code == 0, result.output
    assert "Creating 3 users" in result.output and "Creating 10 posts" in result.output
    assert count(app, User) == 3
    assert count(app, Post) == 10
    seeded = users(app)
    assert all(check_password_hash(user.password_hash, "seed-password") for user in seeded.values())


@pytest.mark.parametrize("args", [["--users", "-1"], ["--posts", "abc"]], ids=["negative", "not-a-number"])
def test_seed_rejects_bad_numbers_as_usage_errors(app: Flask, runner: Any, args: list[str]) -> None:
    result = runner.invoke(args=["seed", *args])
    assert_one_line_error(result, exit_code=2)
    assert count(app, User) == 0 and count(app, Post) == 0


def test_seed_posts_without_any_user_is_one_line(app: Flask, runner: Any) -> None:
    result = runner.invoke(args=["seed", "--posts", "5", "--users", "0"])
    line = assert_one_line_error(result, exit_code=1)
    assert "--users" in line
    assert count(app, Post) == 0


# -- flask db -----------------------------------------------------------------------


def _head(app: Flask) -> str | None:
    with app.app_context():
        return ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.mark.real_commits  # Alembic opens connections of its own, outside the test's transaction
def test_db_current_is_the_head_revision(app: Flask, runner: Any) -> None:
    result = runner.invoke(args=["db", "current"])
    assert result.exit_code == 0, result.output
    head = _head(app)
    assert head and result.output.strip() == head


@pytest.mark.real_commits
def test_db_check_finds_no_drift(runner: Any) -> None:
    result = runner.invoke(args=["db", "check"])
    assert result.exit_code == 0, result.output
    assert "No differences" in result.output


@pytest.mark.real_commits
def test_db_status_names_backend_url_revision_and_ping(app: Flask, runner: Any) -> None:
    result = runner.invoke(args=["db", "status"])
    assert result.exit_code == 0, result.output
    rows = dict(line.split(None, 1) for line in result.output.splitlines())
    engine = app.extensions["myapp.database"].engine
    assert rows["backend"].startswith(engine.dialect.name)
    assert rows["url"] == mask_url(engine.url)
    assert rows["revision"].startswith(f"{_head(app)} (head: {_head(app)}, up to date")
    assert rows["ping"].endswith(" ms")
    assert rows["breaker"] == "primary: closed in this process, 0 failures in a row"
    assert engine.pool.checkedout() == 0


@pytest.mark.real_commits  # on SQLite the isolating transaction would hold the write lock
def test_db_status_shows_an_open_breaker_and_why(app: Flask, runner: Any) -> None:
    breaker = app.extensions["myapp.database"].feature(Guards).breaker
    for _ in range(breaker.threshold):
        breaker.record_failure(RuntimeError("no answer"))
    result = runner.invoke(args=["db", "status"])
    rows = dict(line.split(None, 1) for line in result.output.splitlines())
    assert rows.get("breaker") == "primary: open in this process, 3 failures in a row (last: RuntimeError: no answer)", result.output


@pytest.mark.parametrize("down_app", ["postgresql", "mysql"], indirect=True)
def test_db_status_masks_the_password_of_an_unreachable_database(down_app: Flask) -> None:
    result = down_app.test_cli_runner().invoke(args=["db", "status"])
    line = assert_one_line_error(result, exit_code=1)
    assert "s3cret" not in result.output
    url_lines = [row for row in result.output.splitlines() if row.startswith("url")]
    assert len(url_lines) == 1 and ":***@127.0.0.1:1/x" in url_lines[0]
    assert "127.0.0.1" in line  # the error names what could not be reached


# -- the command's session ----------------------------------------------------------


@pytest.mark.real_commits  # a pooled connection of its own, not the test's shared one
def test_command_session_comes_from_the_registry_and_is_removed(app: Flask, runner: Any) -> None:
    engine = app.extensions["myapp.database"].engine
    seen: dict[str, Any] = {}

    @app.cli.command("peek-session")
    def peek_session() -> None:
        db.session.scalar(select(func.count()).select_from(User))
        seen["session"] = db.session()
        seen["same"] = db.session() is seen["session"]
        seen["checked_out"] = engine.pool.checkedout()
        seen["in_transaction"] = seen["session"].in_transaction()
        click.echo("peeked")

    result = runner.invoke(args=["peek-session"])
    assert result.exit_code == 0, result.output
    assert seen["same"] and seen["in_transaction"] and seen["checked_out"] == 1
    # The command's context ended: its session was removed, its connection returned.
    assert not seen["session"].in_transaction()
    assert engine.pool.checkedout() == 0

    assert create_user(runner, "alice").exit_code == 0
    assert engine.pool.checkedout() == 0
    assert list(users(app)) == ["alice"]


# -- a real ``flask`` process -------------------------------------------------------


def run_flask(cwd: Path, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
    """Run ``flask`` as an operator would, from a directory with no .env/.flaskenv;
    a None value removes that variable."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("FLASK_", "DATABASE_", "SQLITE_")) and name != "SECRET_KEY"
    }
    environment.update(FLASK_APP="myapp", FLASK_DEBUG="0", SECRET_KEY=SECRET_KEY)
    for name, value in env.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run(
        [str(FLASK), *args], cwd=cwd, env=environment, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=60,
    )


def assert_process_failed_in_one_line(process: subprocess.CompletedProcess[str]) -> str:
    output = process.stdout + process.stderr
    assert process.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert process.stderr.strip() == errors[0]  # nothing else on stderr
    return errors[0]


def test_process_db_status_of_an_unreachable_database(tmp_path: Path) -> None:
    process = run_flask(tmp_path, "db", "status", DATABASE_URL=UNREACHABLE_URLS["postgresql"])
    line = assert_process_failed_in_one_line(process)
    assert "Connection refused" in line or "connection failed" in line
    assert "s3cret" not in process.stdout + process.stderr


def test_process_invalid_database_url(tmp_path: Path) -> None:
    process = run_flask(tmp_path, "db", "status", DATABASE_URL="nonsense://")
    line = assert_process_failed_in_one_line(process)
    assert "DATABASE_URL" in line
    assert process.stdout == ""


def test_process_without_secret_key_outside_debug(tmp_path: Path) -> None:
    process = run_flask(
        tmp_path, "user", "list", SECRET_KEY=None, DATABASE_URL=f"sqlite:///{tmp_path / 'x.sqlite'}"
    )
    line = assert_process_failed_in_one_line(process)
    assert "SECRET_KEY" in line
    assert process.stdout == ""
    assert not (tmp_path / "x.sqlite").exists()  # refused before touching the database


def test_process_db_status_on_the_test_database(backend: Backend, tmp_path: Path) -> None:
    url = backend.url.render_as_string(hide_password=False)
    process = run_flask(tmp_path, "db", "status", DATABASE_URL=url)
    assert process.returncode == 0, process.stdout + process.stderr
    assert process.stderr == ""
    assert "up to date" in process.stdout
    assert process.stdout.startswith(f"backend  {backend.url.get_backend_name()}")
