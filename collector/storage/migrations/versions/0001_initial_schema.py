"""The collector schema as fleetwatch 0.1.0 created it with metadata.create_all.

Revision ID: 0001
Revises:

Frozen: names, types and metric columns are spelled out here, not read from schema.py or
fleetwatch.wire, so later changes to those never change what this revision builds.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite makes only "INTEGER PRIMARY KEY" an alias of rowid (auto-increment); BIGINT elsewhere.
_ROW_ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The wide sample tables' metric columns, in fleetwatch.wire's 0.1.0 order; counters and bitmasks
# (uint64 on the wire) are BIGINT.
_GPU_METRICS: tuple[tuple[str, type[sa.types.TypeEngine]], ...] = (
    ("gpu_util_percent", sa.Double),
    ("mem_util_percent", sa.Double),
    ("mem_used_bytes", sa.BigInteger),
    ("mem_total_bytes", sa.BigInteger),
    ("temp_gpu_celsius", sa.Double),
    ("temp_mem_celsius", sa.Double),
    ("temp_slowdown_celsius", sa.Double),
    ("power_watts", sa.Double),
    ("power_limit_watts", sa.Double),
    ("energy_joules", sa.Double),
    ("sm_clock_mhz", sa.Double),
    ("sm_clock_max_mhz", sa.Double),
    ("mem_clock_mhz", sa.Double),
    ("clock_event_reasons", sa.BigInteger),
    ("fan_percent", sa.Double),
    ("pcie_replay_total", sa.BigInteger),
    ("pcie_tx_bytes_per_second", sa.Double),
    ("pcie_rx_bytes_per_second", sa.Double),
    ("pcie_link_gen", sa.BigInteger),
    ("pcie_link_gen_max", sa.BigInteger),
    ("pcie_link_width", sa.BigInteger),
    ("pcie_link_width_max", sa.BigInteger),
    ("ecc_sbe_volatile_total", sa.BigInteger),
    ("ecc_dbe_volatile_total", sa.BigInteger),
    ("ecc_sbe_aggregate_total", sa.BigInteger),
    ("ecc_dbe_aggregate_total", sa.BigInteger),
    ("retired_pages_sbe", sa.BigInteger),
    ("retired_pages_dbe", sa.BigInteger),
    ("retired_pages_pending", sa.BigInteger),
    ("remapped_rows_correctable", sa.BigInteger),
    ("remapped_rows_uncorrectable", sa.BigInteger),
    ("remap_pending", sa.BigInteger),
    ("remap_failure", sa.BigInteger),
    ("nvlink_links_up", sa.BigInteger),
    ("nvlink_links_total", sa.BigInteger),
    ("nvlink_crc_flit_errors_total", sa.BigInteger),
    ("nvlink_crc_data_errors_total", sa.BigInteger),
    ("nvlink_replay_errors_total", sa.BigInteger),
    ("nvlink_recovery_errors_total", sa.BigInteger),
    ("temp_shutdown_celsius", sa.Double),
)

_HOST_METRICS: tuple[tuple[str, type[sa.types.TypeEngine]], ...] = (
    ("cpu_percent", sa.Double),
    ("load1", sa.Double),
    ("mem_used_bytes", sa.BigInteger),
    ("mem_total_bytes", sa.BigInteger),
    ("disk_used_bytes", sa.BigInteger),
    ("disk_total_bytes", sa.BigInteger),
    ("net_rx_bytes_total", sa.BigInteger),
    ("net_tx_bytes_total", sa.BigInteger),
)

_IB_METRICS: tuple[tuple[str, type[sa.types.TypeEngine]], ...] = (
    ("ib_rate_gbps", sa.Double),
    ("ib_link_downed_total", sa.BigInteger),
    ("ib_symbol_error_total", sa.BigInteger),
    ("ib_rcv_errors_total", sa.BigInteger),
    ("ib_link_error_recovery_total", sa.BigInteger),
)


def _row_id() -> sa.Column:
    return sa.Column("id", _ROW_ID_TYPE, nullable=False)


def _metrics(columns: tuple[tuple[str, type[sa.types.TypeEngine]], ...]) -> list[sa.Column]:
    return [sa.Column(name, type_(), nullable=True) for name, type_ in columns]


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_meta"),
    )
    op.create_table(
        "nodes",
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("boot_id", sa.String(64), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        sa.Column("nvml_available", sa.Boolean(), nullable=False),
        sa.Column("sampling_interval_seconds", sa.Double(), nullable=True),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("boot_seen_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("node", name="pk_nodes"),
    )
    op.create_table(
        "gpus",
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("gpu", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(64), nullable=True),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("pci_bus_id", sa.String(32), nullable=True),
        sa.Column("serial", sa.String(64), nullable=True),
        sa.Column("memory_total_bytes", sa.BigInteger(), nullable=True),
        sa.Column("driver_version", sa.String(64), nullable=True),
        sa.Column("cuda_version", sa.String(64), nullable=True),
        sa.Column("power_limit_watts", sa.Double(), nullable=True),
        sa.Column("sm_clock_max_mhz", sa.Double(), nullable=True),
        sa.Column("mem_clock_max_mhz", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("node", "gpu", name="pk_gpus"),
        sa.ForeignKeyConstraint(["node"], ["nodes.node"], name="fk_gpus_node_nodes", ondelete="CASCADE"),
    )
    op.create_table(
        "batches",
        _row_id(),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("boot_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
        sa.UniqueConstraint("node", "boot_id", "seq", name="uq_batches_node_boot_id_seq"),
    )
    op.create_index("ix_batches_received_at", "batches", ["received_at"])
    op.create_table(
        "gpu_samples",
        _row_id(),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("gpu", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("uuid", sa.String(64), nullable=True),
        sa.Column("job", sa.String(255), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=True),
        *_metrics(_GPU_METRICS),
        sa.PrimaryKeyConstraint("id", name="pk_gpu_samples"),
    )
    op.create_index("ix_gpu_samples_node_gpu_ts", "gpu_samples", ["node", "gpu", "ts"])
    op.create_index("ix_gpu_samples_ts", "gpu_samples", ["ts"])
    op.create_table(
        "host_samples",
        _row_id(),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        *_metrics(_HOST_METRICS),
        sa.PrimaryKeyConstraint("id", name="pk_host_samples"),
    )
    op.create_index("ix_host_samples_node_ts", "host_samples", ["node", "ts"])
    op.create_index("ix_host_samples_ts", "host_samples", ["ts"])
    op.create_table(
        "ib_samples",
        _row_id(),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("ib_state", sa.String(32), nullable=True),
        *_metrics(_IB_METRICS),
        sa.PrimaryKeyConstraint("id", name="pk_ib_samples"),
    )
    op.create_index("ix_ib_samples_node_ts", "ib_samples", ["node", "ts"])
    op.create_index("ix_ib_samples_ts", "ib_samples", ["ts"])
    op.create_table(
        "events",
        _row_id(),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("gpu", sa.Integer(), nullable=True),
        sa.Column("xid", sa.Integer(), nullable=True),
        sa.Column("pci_bus_id", sa.String(32), nullable=True),
        sa.Column("uuid", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("source", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_node_ts", "events", ["node", "ts"])
    op.create_index("ix_events_ts", "events", ["ts"])
    op.create_table(
        "steps",
        _row_id(),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("job", sa.String(255), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("gpu", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_steps"),
    )
    op.create_index("ix_steps_job_rank_ts", "steps", ["job", "rank", "ts"])
    op.create_index("ix_steps_ts", "steps", ["ts"])
    op.create_table(
        "alerts",
        _row_id(),
        sa.Column("fingerprint", sa.String(512), nullable=False),
        sa.Column("detector", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("gpu", sa.Integer(), nullable=True),
        sa.Column("job", sa.String(255), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("starts_at", sa.Double(), nullable=False),
        sa.Column("ends_at", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_index("ix_alerts_status_fingerprint", "alerts", ["status", "fingerprint"])
    op.create_index(
        "uq_alerts_firing_fingerprint",
        "alerts",
        ["fingerprint"],
        unique=True,
        sqlite_where=sa.text("status = 'firing'"),
        postgresql_where=sa.text("status = 'firing'"),
    )
    op.create_table(
        "deliveries",
        _row_id(),
        sa.Column("alert_id", _ROW_ID_TYPE, nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("transition", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Double(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("sent_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"], name="fk_deliveries_alert_id_alerts", ondelete="CASCADE"),
    )
    op.create_index("ix_deliveries_state_next_attempt_at", "deliveries", ["state", "next_attempt_at"])
    op.create_index("ix_deliveries_alert_id", "deliveries", ["alert_id"])
    # 0.1.0 wrote this row with the tables; a database made here is then the same as one it made.
    op.bulk_insert(
        sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text)),
        [{"key": "schema_version", "value": "1"}],
    )


def downgrade() -> None:
    # Referencing tables first: SQLite enforces the foreign keys (PRAGMA foreign_keys=ON).
    for table in (
        "deliveries",
        "alerts",
        "steps",
        "events",
        "ib_samples",
        "host_samples",
        "gpu_samples",
        "batches",
        "gpus",
        "nodes",
        "meta",
    ):
        op.drop_table(table)
