"""Step reports' parallel coordinates and wall time.

Revision ID: 0005
Revises: 0004

Adds `steps.dp_rank`, `steps.pp_stage`, `steps.tp_rank` (the rank's data-parallel replica,
pipeline stage and tensor-parallel rank, where the job reports them) and `steps.wall_seconds`
(the step's wall time as the rank saw it). All nullable: older reporters send none of them, and
the rows already stored keep NULL. Plain ADD COLUMNs, so the upgrade takes moments whatever the
table holds; the downgrade drops the columns and what they held.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_COLUMNS = ("dp_rank", "pp_stage", "tp_rank")


def upgrade() -> None:
    for name in _COLUMNS:
        op.add_column("steps", sa.Column(name, sa.Integer(), nullable=True))
    op.add_column("steps", sa.Column("wall_seconds", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("steps") as batch:
        for name in (*_COLUMNS, "wall_seconds"):
            batch.drop_column(name)
