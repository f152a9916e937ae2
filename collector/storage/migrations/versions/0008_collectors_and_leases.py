"""Collectors sharing one database: who is alive, who holds which fleet-wide duty, which node.

Revision ID: 0008
Revises: 0007

Adds `collectors` (each running collector's heartbeat and addresses), `leases` (a fleet-wide duty
such as alert delivery or job-level detection, held by one collector until it stops renewing) and
`nodes.collector` (the collector whose stream the node's agent last sent on). New tables and a
nullable column: the upgrade takes moments; the downgrade drops them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "collectors",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False, server_default=""),
        sa.Column("grpc_address", sa.String(255), nullable=False, server_default=""),
        sa.Column("http_address", sa.String(255), nullable=False, server_default=""),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("heartbeat_at", sa.Double(), nullable=False),
        sa.Column("streams", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("acquired_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
    )
    op.add_column("nodes", sa.Column("collector", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("collector")
    op.drop_table("leases")
    op.drop_table("collectors")
