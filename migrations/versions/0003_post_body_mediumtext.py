"""Widen post.body to MEDIUMTEXT on MariaDB/MySQL.

TEXT there holds 65,535 bytes, and the form's 20,000 characters can be 80,000 bytes
of emoji. PostgreSQL's and SQLite's TEXT have no such limit: nothing to do there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _on_mysql() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    if _on_mysql():
        op.alter_column("post", "body", existing_type=sa.Text(), type_=mysql.MEDIUMTEXT(), existing_nullable=False)


def downgrade() -> None:
    # Refuses (data too long) rather than truncates when a body no longer fits.
    if _on_mysql():
        op.alter_column("post", "body", existing_type=mysql.MEDIUMTEXT(), type_=sa.Text(), existing_nullable=False)
