"""Create the rate-limit counters shared by every worker.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Binary collation on MariaDB/MySQL: keys compare exactly, as on the other backends.
key_type = (
    sa.String(length=255)
    .with_variant(mysql.VARCHAR(length=255, collation="utf8mb4_bin"), "mariadb")
    .with_variant(mysql.VARCHAR(length=255, collation="utf8mb4_bin"), "mysql")
)


def upgrade() -> None:
    op.create_table(
        "rate_limit",
        sa.Column("key", key_type, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_limit")),
    )
    op.create_index(op.f("ix_rate_limit_expires_at"), "rate_limit", ["expires_at"])


def downgrade() -> None:
    op.drop_table("rate_limit")
