"""Silences.

Revision ID: 0006
Revises: 0005

Adds the `silences` table (`fleetwatchctl silence`): a node, optionally one GPU and one detector,
a time range, a comment and who made it. Alerts that match an active silence are still recorded
and shown; their deliveries are marked 'silenced' instead of being sent. A new, empty table, so
the upgrade takes moments; the downgrade drops it and the silences it held.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "silences",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("gpu", sa.Integer(), nullable=True),
        sa.Column("detector", sa.String(64), nullable=True),
        sa.Column("starts_at", sa.Double(), nullable=False),
        sa.Column("ends_at", sa.Double(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False, server_default=""),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_silences_ends_at", "silences", ["ends_at"])


def downgrade() -> None:
    op.drop_index("ix_silences_ends_at", table_name="silences")
    op.drop_table("silences")
