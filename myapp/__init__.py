"""myapp: a Flask site on an app-context-scoped SQLAlchemy session registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build and configure an app; each call gives an app with its own engine."""
    app = Flask(__name__, instance_relative_config=True)

    from . import config

    config.load_config(app, test_config)

    from . import auth, cli, errors, health, login_limits, observability, posts, read_only, security
    from .db import db

    # First: the after_request hook registered first runs last, after any that replaces
    # the response (Flask runs them in reverse order).
    security.init_headers(app)
    # Next: its before_request hook runs first, its after_request hook sees the final response.
    observability.init_app(app)
    db.init_app(app)
    auth.init_app(app)
    errors.init_app(app)
    read_only.init_app(app)
    cli.init_app(app)
    login_limits.init_app(app)

    app.register_blueprint(health.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(posts.bp)
    app.add_url_rule("/", endpoint="index")
    security.init_app(app)
    return app
