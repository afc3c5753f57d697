"""Index the index pages' order, (created_at, id), in place of created_at alone.

Every backend scans it backwards for ``ORDER BY created_at DESC, id DESC``, so a page
(and the ids of a deep page) comes from the index without a sort.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_post_created_at_id", "post", ["created_at", "id"])
    op.drop_index("ix_post_created_at", table_name="post")


def downgrade() -> None:
    op.create_index("ix_post_created_at", "post", ["created_at"])
    op.drop_index("ix_post_created_at_id", table_name="post")
