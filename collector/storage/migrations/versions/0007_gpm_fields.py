"""NVML GPM fields in the wide GPU table.

Revision ID: 0007
Revises: 0006

Agents on Hopper and newer report NVML GPM metrics (fleetwatch.agent.sources.gpm): graphics, SM,
tensor, DRAM and FP64/FP32/FP16 activity, SM occupancy, NVLink bytes per second. New samples go to
the column blocks, which take new fields by their wire number without a schema change; the wide
`gpu_samples` table (rows stored before revision 0004) gets the columns so that it keeps one
column per wire field. Nullable ADD COLUMNs: the upgrade takes moments whatever the table holds.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_COLUMNS = (
    "graphics_active_percent",
    "sm_active_percent",
    "sm_occupancy_percent",
    "tensor_active_percent",
    "dram_active_percent",
    "fp64_active_percent",
    "fp32_active_percent",
    "fp16_active_percent",
    "nvlink_tx_bytes_per_second",
    "nvlink_rx_bytes_per_second",
)


def upgrade() -> None:
    for name in _COLUMNS:
        op.add_column("gpu_samples", sa.Column(name, sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gpu_samples") as batch:
        for name in _COLUMNS:
            batch.drop_column(name)
