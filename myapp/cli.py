"""``flask`` commands: schema migrations, users, demo data, database status.

Every command runs inside the app context that the ``flask`` command pushes, so it
uses ``db.session`` like a view does and the same teardown removes the session.
Database and migration errors end the command with one line and exit code 1.
"""

from __future__ import annotations

import functools
import os
import random
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

import click
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import func, insert, select
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import MultiDict
from werkzeug.security import generate_password_hash

from .auth import CredentialsForm
from .config import packaged_migrations_dir
from .db import db
from .db.errors import describe_error, mask_url
from .models import Post, User, utcnow
from .users import UnknownUser, UsernameTaken, create_user, set_password

F = TypeVar("F", bound=Callable[..., Any])

db_cli = AppGroup("db", help="Manage the database schema (Alembic migrations) and check the database.")
user_cli = AppGroup("user", help="Manage user accounts.")


def init_app(app: Flask) -> None:
    app.cli.add_command(db_cli)
    app.cli.add_command(user_cli)
    app.cli.add_command(seed)


def one_line_errors(command: F) -> F:
    """Turn a database or migration failure into ``Error: <one line>`` and exit 1."""

    @functools.wraps(command)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SQLAlchemyError as error:
            raise click.ClickException(f"database error: {describe_error(error)}") from None
        except CommandError as error:
            raise click.ClickException(str(error).splitlines()[0]) from None

    return cast(F, wrapped)


# -- flask db -----------------------------------------------------------------------


def alembic_config() -> AlembicConfig:
    """Alembic's configuration, built from the app: no alembic.ini to keep in sync."""
    config = AlembicConfig()
    location = current_app.config["MIGRATIONS_DIR"] or packaged_migrations_dir()
    config.set_main_option("script_location", location)
    return config


@db_cli.command("upgrade")
@click.argument("revision", default="head")
@one_line_errors
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    alembic_command.upgrade(alembic_config(), revision)
    click.echo(f"Database upgraded to {revision}.")


# ignore_unknown_options: a relative revision such as -2 is an argument, not an option.
@db_cli.command("downgrade", context_settings={"ignore_unknown_options": True})
@click.argument("revision", default="-1")
@one_line_errors
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (default: one step)."""
    alembic_command.downgrade(alembic_config(), revision)
    click.echo(f"Database downgraded to {revision}.")


@db_cli.command("current")
@one_line_errors
def db_current() -> None:
    """Show the revision the database is at."""
    click.echo(_current_revision() or "(empty: no migration applied)")


@db_cli.command("revision")
@click.option("-m", "--message", required=True, help="What the migration does, as a short slug.")
@click.option("--autogenerate", is_flag=True, help="Compare the models with the database.")
@one_line_errors
def db_revision(message: str, autogenerate: bool) -> None:
    """Create a new migration file; read and tidy it before committing it."""
    alembic_command.revision(alembic_config(), message=message, autogenerate=autogenerate)


@db_cli.command("check")
@one_line_errors
def db_check() -> None:
    """Fail if the models and the migrated database differ."""
    alembic_command.check(alembic_config())
    click.echo("No differences between the models and the database.")


@db_cli.command("status")
@one_line_errors
def db_status() -> None:
    """Show the backend, the URL (password masked), revisions, pool figures and ping."""
    engine = db.get_engine()
    # Which database, before touching it: when it is down, the operator still sees
    # which (masked) URL the error line is about.
    click.echo(f"{'backend':<9}{engine.dialect.name} ({engine.driver})")
    click.echo(f"{'url':<9}{mask_url(engine.url)}")
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    # Before this command's own statements succeed and close them.
    breakers = {**db.breakers_status(), **db.node_breakers_status()}
    try:
        latency = db.ping()
    except SQLAlchemyError as error:
        _degraded_or_raise(error)
    current = _current_revision()
    pool = engine.pool
    rows = [
        ("revision", f"{current or '(empty)'} (head: {head}{', up to date' if current == head else ', run flask db upgrade'})"),
        ("pool", pool.status() if hasattr(pool, "status") else type(pool).__name__),
        ("ping", f"{latency * 1000:.1f} ms"),
        *(("breaker", f"{server}: {_describe_breaker(status)}") for server, status in breakers.items()),
    ]
    if not breakers:
        rows.append(("breaker", "off"))
    for label, value in rows:
        click.echo(f"{label:<9}{value}")
    for replica in db.replica_status(check=True) or []:
        click.echo(f"{'replica':<9}{_describe_replica(replica)}")
    cluster = db.galera_status()
    if cluster is not None:
        click.echo(
            f"{'galera':<9}node {cluster['node']} {cluster['state']}, {cluster['cluster_status']} component of "
            f"{cluster['cluster_size']} nodes ({cluster['mode']})"
        )


def _degraded_or_raise(error: SQLAlchemyError) -> None:
    """The primary did not answer: with a healthy replica the site is read-only, which
    this says (exit status 1: something needs doing); otherwise the error's one line."""
    replicas = db.replica_status(check=True) or []
    healthy = [replica for replica in replicas if replica["state"] == "healthy"]
    if not healthy:
        raise error
    click.echo(f"{'status':<9}degraded: read-only from replica {healthy[0]['replica']} "
               f"(the primary: {describe_error(error)})")
    for replica in replicas:
        click.echo(f"{'replica':<9}{_describe_replica(replica)}")
    raise SystemExit(1)


def _describe_replica(status: dict[str, Any]) -> str:
    line = f"{status['replica']} {status['url']} {status['state']}"
    if status["lag_bytes"] is not None:
        line += f", lag {status['lag_bytes']} bytes / {status['lag_seconds']:.1f} s, replayed {status['replay_lsn']}"
    return line + (f" ({status['reason']})" if status["reason"] else "")


def _describe_breaker(status: dict[str, Any]) -> str:
    line = f"{status['state']} in this process, {status['failures_in_a_row']} failures in a row"
    return line + (f" (last: {status['last_error']})" if status["last_error"] else "")


def _current_revision() -> str | None:
    with db.get_engine().connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


# -- flask user ---------------------------------------------------------------------


def _password_option(command: F) -> F:
    return click.option(
        "--password", prompt=True, hide_input=True, confirmation_prompt=True,
        help="Asked for when not given.",
    )(command)


def _validated_credentials(username: str, password: str) -> tuple[str, str]:
    """Check the pair with the registration form's own rules; the first problem is the error."""
    form = CredentialsForm(formdata=MultiDict({"username": username, "password": password}), meta={"csrf": False})
    if not form.validate():
        field, messages = next(iter(form.errors.items()))
        raise click.BadParameter(messages[0], param_hint=str(field))
    return cast(str, form.username.data), password


@user_cli.command("create")
@click.argument("username")
@_password_option
@one_line_errors
def user_create(username: str, password: str) -> None:
    """Create an account."""
    username, password = _validated_credentials(username, password)
    try:
        create_user(username, password)
    except UsernameTaken:
        raise click.ClickException(f"the username {username!r} is already taken") from None
    click.echo(f"Created user {username}.")


@user_cli.command("list")
@one_line_errors
def user_list() -> None:
    """List accounts with their number of posts."""
    stmt = (
        select(User.id, User.username, User.created_at, func.count(Post.id))
        .outerjoin(Post, Post.author_id == User.id)
        .group_by(User.id, User.username, User.created_at)
        .order_by(User.id)
    )
    rows = db.session.execute(stmt).all()
    if not rows:
        click.echo("No users yet: create one with `flask user create NAME`.")
        return
    click.echo(f"{'id':>6}  {'username':<30} {'created (UTC)':<19} posts")
    for user_id, username, created_at, posts in rows:
        click.echo(f"{user_id:>6}  {username:<30} {created_at:%Y-%m-%d %H:%M:%S} {posts:>5}")


@user_cli.command("set-password")
@click.argument("username")
@_password_option
@one_line_errors
def user_set_password(username: str, password: str) -> None:
    """Replace a user's password."""
    username, password = _validated_credentials(username, password)
    try:
        set_password(username, password)
    except UnknownUser:
        raise click.ClickException(f"no user named {username!r}") from None
    click.echo(f"Password of {username} changed.")


# -- flask seed ---------------------------------------------------------------------

SEED_PASSWORD = "seed-password"
_SEED_BATCH = 500


def _insert_batch(model: type[User] | type[Post], rows: list[dict[str, Any]]) -> None:
    """One batch, one transaction, re-run whole on a certification failure or deadlock."""

    @db.retrying()
    def insert_rows() -> None:
        with db.transaction() as session:
            session.execute(insert(model), rows)

    insert_rows()


def _insert_in_batches(
    model: type[User] | type[Post], count: int, label: str, make_row: Callable[[int], dict[str, Any]]
) -> None:
    """Insert ``count`` rows, ``make_row(1)`` to ``make_row(count)``, committing each
    batch on its own under a progress bar."""
    with click.progressbar(length=count, label=label) as bar:
        for start in range(0, count, _SEED_BATCH):
            size = min(_SEED_BATCH, count - start)
            _insert_batch(model, [make_row(start + i + 1) for i in range(size)])
            bar.update(size)


def _random_post_rows(author_ids: list[int]) -> Callable[[int], dict[str, Any]]:
    """Posts by random authors, of random length, dated over the past year."""
    now = utcnow()
    rng = random.Random(os.urandom(8))

    def make_post(number: int) -> dict[str, Any]:
        return {
            "author_id": rng.choice(author_ids),
            "title": f"Post number {number}",
            "body": "Seeded text. " * rng.randint(1, 40),
            "created_at": now - timedelta(seconds=rng.randint(0, 365 * 24 * 3600)),
            "version": 1,
        }

    return make_post


@click.command("seed")
@click.option("--users", "user_count", type=click.IntRange(0, 1_000_000), default=10, show_default=True)
@click.option("--posts", "post_count", type=click.IntRange(0, 10_000_000), default=100, show_default=True)
@with_appcontext  # a plain click command gets no app context from app.test_cli_runner()
@one_line_errors
def seed(user_count: int, post_count: int) -> None:
    """Fill the database with demo users and posts, in batches of 500.

    Each batch is committed on its own: an interrupted run keeps the batches it finished.
    """
    # One hash for all: hashing is deliberately slow and these are demo accounts.
    password_hash = generate_password_hash(SEED_PASSWORD)
    prefix = f"seed-{secrets.token_hex(3)}-"

    def make_user(number: int) -> dict[str, Any]:
        return {"username": f"{prefix}{number}", "password_hash": password_hash, "created_at": utcnow()}

    _insert_in_batches(User, user_count, f"Creating {user_count} users", make_user)
    author_ids = list(db.session.scalars(select(User.id)))
    if post_count and not author_ids:
        raise click.ClickException("there are no users to write the posts: pass --users N")
    _insert_in_batches(Post, post_count, f"Creating {post_count} posts", _random_post_rows(author_ids))
    if user_count:
        click.echo(f"Seeded users share the password {SEED_PASSWORD!r}.")
