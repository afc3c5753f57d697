"""Alembic environment: the URL and the metadata come from the app, never from a literal.

`flask db ...` runs this inside the app context it pushed. Run as plain `alembic`,
it builds the app from the environment (DATABASE_URL) itself.
"""

from __future__ import annotations

from contextlib import nullcontext

from alembic import context
from flask import has_app_context

from myapp import create_app, models  # noqa: F401  (models register their tables)
from myapp.db import Base, db


def run_migrations() -> None:
    app_context = nullcontext() if has_app_context() else create_app().app_context()
    with app_context:
        engine = db.get_engine()
        if context.is_offline_mode():
            context.configure(url=engine.url, target_metadata=Base.metadata, literal_binds=True)
            with context.begin_transaction():
                context.run_migrations()
            return
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                compare_type=True,
                # SQLite cannot ALTER most things; batch mode copies the table instead.
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()


run_migrations()
