"""Where settings come from, in which order, and which values are refused."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import myapp
from myapp.config import DEFAULTS, ENVIRONMENT_SETTINGS, ConfigError

BuildApp = Callable[..., Flask]


@pytest.fixture
def build_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BuildApp]:
    """``create_app`` with its instance folder in ``tmp_path`` and a clean environment.

    ``create_app`` takes no instance path, so the ``Flask`` it calls gets one: the
    project's real ``instance/`` folder is never read or written.
    """
    for name in [*ENVIRONMENT_SETTINGS, "FLASK_DEBUG", "FLASK_TESTING"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(myapp, "Flask", functools.partial(Flask, instance_path=str(tmp_path)))
    made: list[Flask] = []

    def build(test_config: dict[str, Any] | None = None, *, instance: str | None = None) -> Flask:
        if instance is not None:
            (tmp_path / "config.py").write_text(instance)
        app = myapp.create_app(test_config)
        made.append(app)
        return app

    yield build
    for app in made:
        app.extensions["myapp.database"].engine.dispose()


STRONG_KEY = secrets.token_hex(32)


def test_the_instance_folder_is_the_temporary_one(build_app: BuildApp, tmp_path: Path) -> None:
    app = build_app({"SECRET_KEY": STRONG_KEY})
    assert app.instance_path == str(tmp_path)
    # The default relative SQLite file lives in that instance folder.
    assert app.extensions["myapp.database"].engine.url.database == str(tmp_path / "myapp.sqlite")


def test_defaults_apply_when_nothing_overrides_them(build_app: BuildApp) -> None:
    app = build_app({"SECRET_KEY": STRONG_KEY})
    for name in ("DATABASE_POOL_SIZE", "DATABASE_MAX_OVERFLOW", "POSTS_PER_PAGE", "MAX_CONTENT_LENGTH"):
        assert app.config[name] == DEFAULTS[name]


def test_precedence_defaults_instance_environment_mapping(
    build_app: BuildApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance = (
        "POSTS_PER_PAGE = 7\n"
        "DATABASE_POOL_SIZE = 3\n"
        "DATABASE_APP_NAME = 'from-instance'\n"
        f"SECRET_KEY = {STRONG_KEY!r}\n"
    )
    monkeypatch.setenv("DATABASE_POOL_SIZE", "4")
    monkeypatch.setenv("DATABASE_APP_NAME", "from-environment")
    app = build_app({"DATABASE_APP_NAME": "from-mapping"}, instance=instance)

    assert app.config["DATABASE_MAX_OVERFLOW"] == DEFAULTS["DATABASE_MAX_OVERFLOW"]  # default only
    assert app.config["POSTS_PER_PAGE"] == 7  # instance beats default
    assert app.config["DATABASE_POOL_SIZE"] == 4  # environment beats instance, parsed to int
    assert app.config["DATABASE_APP_NAME"] == "from-mapping"  # mapping beats everything
    assert app.config["SECRET_KEY"] == STRONG_KEY
    assert app.extensions["myapp.database"].engine.pool.size() == 4  # the engine uses the result


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("DATABASE_ECHO", "yes", True),
        ("DATABASE_ECHO", "0", False),
        ("DATABASE_POOL_TIMEOUT", "2.5", 2.5),
        ("DATABASE_READ_ONLY_AUTOCOMMIT", "off", False),
    ],
)
def test_environment_values_are_parsed(
    build_app: BuildApp, monkeypatch: pytest.MonkeyPatch, name: str, raw: str, expected: Any
) -> None:
    monkeypatch.setenv(name, raw)
    assert build_app({"SECRET_KEY": STRONG_KEY}).config[name] == expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [("DATABASE_POOL_SIZE", "abc"), ("DATABASE_ECHO", "maybe"), ("DATABASE_POOL_TIMEOUT", "soon")],
)
def test_bad_environment_value_names_the_setting(
    build_app: BuildApp, monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError) as caught:
        build_app({"SECRET_KEY": STRONG_KEY})
    message = caught.value.format_message()
    assert name in message and raw in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "key",
    [None, "", "dev", "changeme", "x" * 31],
    ids=["missing", "empty", "dev", "changeme", "31-chars"],
)
def test_weak_secret_key_is_refused_outside_debug_and_testing(build_app: BuildApp, key: str | None) -> None:
    config = {} if key is None else {"SECRET_KEY": key}
    with pytest.raises(ConfigError) as caught:
        build_app(config)
    message = caught.value.format_message()
    assert "SECRET_KEY" in message and "\n" not in message


def test_secret_key_from_the_environment_is_checked_too(
    build_app: BuildApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_KEY", "dev")
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        build_app()
    monkeypatch.setenv("SECRET_KEY", STRONG_KEY)
    assert build_app().config["SECRET_KEY"] == STRONG_KEY


def test_random_secret_key_of_32_chars_is_accepted(build_app: BuildApp) -> None:
    key = secrets.token_urlsafe(24)  # 32 characters
    assert len(key) == 32
    assert build_app({"SECRET_KEY": key}).config["SECRET_KEY"] == key


@pytest.mark.parametrize(
    ("config", "environment"),
    [({"DEBUG": True}, {}), ({}, {"FLASK_DEBUG": "1"}), ({"TESTING": True}, {})],
    ids=["debug-mapping", "flask-debug-env", "testing"],
)
def test_secret_key_is_generated_in_debug_and_testing(
    build_app: BuildApp,
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, Any],
    environment: dict[str, str],
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    first, second = build_app(dict(config)), build_app(dict(config))
    key = first.config["SECRET_KEY"]
    assert isinstance(key, str) and len(key) >= 32
    assert key != second.config["SECRET_KEY"]  # random, not a constant


def test_an_explicit_key_is_kept_in_debug(build_app: BuildApp) -> None:
    app = build_app({"DEBUG": True, "SECRET_KEY": "short-but-debug"})
    assert app.config["SECRET_KEY"] == "short-but-debug"
