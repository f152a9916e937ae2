"""Samples as compressed blocks: batches keep their serialized body until compaction.

Revision ID: 0004
Revises: 0003

Adds `batches.body` (the agent's serialized Batch, NULL in older rows), `batch_ranges` (the keys
of compacted batches as runs of seqs), `sample_blocks` (compressed matrices of a node's samples)
and `rollup_blocks` (their 1-minute rollups). Rows already in the wide sample tables stay there:
the collector's compaction moves them into blocks in the background, so the upgrade takes
moments whatever the database holds.

On PostgreSQL both block tables are partitioned by range of t_start (a day per partition of
sample_blocks, 30 days per partition of rollup_blocks; compaction creates them as time moves), so
retention drops whole partitions. A partitioned table's primary key must hold the partition
key: (id, t_start) there, id alone on SQLite.

The downgrade drops the new tables and column, and with them every sample stored since.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _block_table(name: str, *extra: sa.Column) -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    key = ("id", "t_start") if postgresql else ("id",)
    op.create_table(
        name,
        sa.Column("id", _ROW_ID, autoincrement=True),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("t_start", sa.Double(), nullable=False),
        sa.Column("t_end", sa.Double(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        *extra,
        sa.PrimaryKeyConstraint(*key, name=f"pk_{name}"),
        postgresql_partition_by="RANGE (t_start)",
    )
    op.create_index(f"ix_{name}_node_kind_t_start", name, ["node", "kind", "t_start"])
    op.create_index(f"ix_{name}_t_end", name, ["t_end"])


def upgrade() -> None:
    # A plain ADD COLUMN: batch mode would copy the whole table on SQLite.
    op.add_column("batches", sa.Column("body", sa.LargeBinary(), nullable=True))
    op.create_table(
        "batch_ranges",
        sa.Column("id", _ROW_ID, primary_key=True),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("boot_id", sa.String(64), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_batch_ranges"),
    )
    op.create_index("ix_batch_ranges_node_boot_id", "batch_ranges", ["node", "boot_id"])
    op.create_index("ix_batch_ranges_last_received_at", "batch_ranges", ["last_received_at"])
    _block_table("sample_blocks", sa.Column("rolled_up", sa.Boolean(), nullable=False))
    op.create_index("ix_sample_blocks_rolled_up_t_end", "sample_blocks", ["rolled_up", "t_end"])
    _block_table("rollup_blocks")


def downgrade() -> None:
    op.drop_table("rollup_blocks")
    op.drop_table("sample_blocks")
    op.drop_table("batch_ranges")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("body")
