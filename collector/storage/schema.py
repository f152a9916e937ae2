"""The collector's tables as SQLAlchemy Core metadata, the same on SQLite and PostgreSQL.

They model the newest revision of migrations/ (Store.migrate builds and upgrades the database with
those; a test fails while the two differ), and every query is written against them.

Timestamps are float Unix seconds (the wire's `t`), so no dialect's datetime handling is involved.

Samples arrive as `batches` rows holding the agent's serialized Batch (`body`), committed before the
ack; compaction (storage/compaction.py) turns them into `sample_blocks` (one compressed matrix of a
node's GPUs, host or InfiniBand ports over a span, storage/chunks.py) and keeps their keys as
`batch_ranges`; whole hours of blocks are rolled up into 1-minute `rollup_blocks`. The wide
`gpu_samples`, `host_samples` and `ib_samples` tables (one column per canonical field) are where
revisions up to 0003 kept samples; nothing is written to them any more, and compaction moves what
an upgraded database holds there into blocks.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeEngine

from fleetwatch.wire import GPU_FIELDS, HOST_FIELDS, IB_FIELDS, INTEGER_FIELDS

ALERT_STATUSES = ("firing", "resolved")
# "silenced": a silence matched the alert when it was due, so it was not sent (revision 0006).
DELIVERY_STATES = ("pending", "sent", "failed", "silenced")

# A column named in IB_FIELDS that is text, not a number.
_IB_TEXT_FIELDS = frozenset({"ib_state"})

# Deterministic constraint names keep DDL identical on both dialects and readable in errors.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


# SQLite only makes "INTEGER PRIMARY KEY" an alias of rowid (auto-increment); BIGINT elsewhere.
_ROW_ID_TYPE = BigInteger().with_variant(Integer(), "sqlite")


def _row_id() -> Column:
    return Column("id", _ROW_ID_TYPE, primary_key=True)


def _metric_type(name: str) -> TypeEngine:
    # Counters and bitmasks are uint64 on the wire; BIGINT keeps them exact (a double would not).
    return BigInteger() if name in INTEGER_FIELDS else Double()


def _metric_columns(names: tuple[str, ...]) -> list[Column]:
    return [Column(name, _metric_type(name), nullable=True) for name in names]


# Where 0.1.0 kept its schema version (key "schema_version"); Alembic's alembic_version table
# holds the revision now. Revision 0002 sets the row to "2", which a 0.1.0 collector refuses.
meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("node", String(255), primary_key=True),
    Column("boot_id", String(64), nullable=False),
    Column("agent_version", String(64), nullable=False, default=""),
    Column("nvml_available", Boolean, nullable=False, default=True),
    Column("sampling_interval_seconds", Double, nullable=True),
    Column("first_seen", Double, nullable=False),
    Column("last_seen", Double, nullable=False),
    Column("boot_seen_at", Double, nullable=False),
    # Added by revision 0008: the collector whose stream the node's agent last sent on.
    Column("collector", String(255), nullable=True),
)

gpus = Table(
    "gpus",
    metadata,
    Column("node", String(255), ForeignKey("nodes.node", ondelete="CASCADE"), primary_key=True),
    Column("gpu", Integer, primary_key=True),  # NVML index
    Column("uuid", String(64), nullable=True),
    Column("name", String(255), nullable=True),
    Column("pci_bus_id", String(32), nullable=True),
    Column("serial", String(64), nullable=True),
    Column("memory_total_bytes", BigInteger, nullable=True),
    Column("driver_version", String(64), nullable=True),
    Column("cuda_version", String(64), nullable=True),
    Column("power_limit_watts", Double, nullable=True),
    Column("sm_clock_max_mhz", Double, nullable=True),
    Column("mem_clock_max_mhz", Double, nullable=True),
    Column("updated_at", Double, nullable=False),
)

# One row per stored agent batch not compacted yet: the key that makes ingest idempotent across
# resends, and the serialized pb.Batch as it came (NULL in rows of revisions before 0004, whose
# samples went to the wide tables).
batches = Table(
    "batches",
    metadata,
    _row_id(),
    Column("node", String(255), nullable=False),
    Column("boot_id", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("received_at", Double, nullable=False),
    # Added by revision 0004, so the database has it last.
    Column("body", LargeBinary, nullable=True),
    UniqueConstraint("node", "boot_id", "seq"),
    Index(None, "received_at"),
)

# The keys of compacted batches: runs first_seq..last_seq of one (node, boot_id), every seq stored.
batch_ranges = Table(
    "batch_ranges",
    metadata,
    _row_id(),
    Column("node", String(255), nullable=False),
    Column("boot_id", String(64), nullable=False),
    Column("first_seq", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_received_at", Double, nullable=False),
    Index(None, "node", "boot_id"),
    Index(None, "last_received_at"),
)

BLOCK_KINDS = ("gpu", "host", "ib")


# A node's samples of one kind over [t_start, t_end] as one compressed matrix (storage/chunks.py).
def _block_columns() -> list[Column]:
    """A block's row: whose (node, kind), which span (t_start..t_end), how many rows, the blob."""
    return [
        _row_id(),
        Column("node", String(255), nullable=False),
        Column("kind", String(8), nullable=False),
        Column("t_start", Double, nullable=False),
        Column("t_end", Double, nullable=False),
        Column("rows", Integer, nullable=False),
        Column("data", LargeBinary, nullable=False),
    ]


sample_blocks = Table(
    "sample_blocks",
    metadata,
    *_block_columns(),
    # Whether rollup_blocks hold this block's minutes: only then may retention drop it.
    Column("rolled_up", Boolean, nullable=False, default=False),
    Index(None, "node", "kind", "t_start"),
    Index(None, "t_end"),
    Index(None, "rolled_up", "t_end"),
    # PostgreSQL: a partition per day of t_start (storage/partitions.py); its primary key is (id, t_start).
    postgresql_partition_by="RANGE (t_start)",
)

# 1-minute rollups (count, min, max, mean, last per field) of a node's blocks of one kind and hour.
rollup_blocks = Table(
    "rollup_blocks",
    metadata,
    *_block_columns(),
    Index(None, "node", "kind", "t_start"),
    Index(None, "t_end"),
    postgresql_partition_by="RANGE (t_start)",  # a partition per 30 days of t_start
)

gpu_samples = Table(
    "gpu_samples",
    metadata,
    _row_id(),
    Column("node", String(255), nullable=False),
    Column("gpu", Integer, nullable=False),
    Column("ts", Double, nullable=False),
    Column("uuid", String(64), nullable=True),
    Column("job", String(255), nullable=True),
    Column("rank", Integer, nullable=True),
    *_metric_columns(GPU_FIELDS),
    Index(None, "node", "gpu", "ts"),
    # Fleet-wide window reads and retention select by time alone.
    Index(None, "ts"),
)

host_samples = Table(
    "host_samples",
    metadata,
    _row_id(),
    Column("node", String(255), nullable=False),
    Column("ts", Double, nullable=False),
    *_metric_columns(HOST_FIELDS),
    Index(None, "node", "ts"),
    Index(None, "ts"),
)

ib_samples = Table(
    "ib_samples",
    metadata,
    _row_id(),
    Column("node", String(255), nullable=False),
    Column("ts", Double, nullable=False),
    Column("device", String(64), nullable=False),
    Column("port", Integer, nullable=False),
    *(Column(name, String(32) if name in _IB_TEXT_FIELDS else _metric_type(name), nullable=True) for name in IB_FIELDS),
    Index(None, "node", "ts"),
    Index(None, "ts"),
)

events = Table(
    "events",
    metadata,
    _row_id(),
    Column("node", String(255), nullable=False),
    Column("ts", Double, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("gpu", Integer, nullable=True),
    Column("xid", Integer, nullable=True),
    Column("pci_bus_id", String(32), nullable=True),
    Column("uuid", String(64), nullable=True),
    Column("message", Text, nullable=False, default=""),
    Column("source", String(32), nullable=True),
    Index(None, "node", "ts"),
    Index(None, "ts"),
)

steps = Table(
    "steps",
    metadata,
    _row_id(),
    Column("node", String(255), nullable=False),
    Column("ts", Double, nullable=False),
    Column("job", String(255), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("seconds", Double, nullable=False),
    Column("gpu", Integer, nullable=True),
    # Added by revision 0005: where the job reports them, the rank's parallel coordinates and the
    # step's wall time.
    Column("dp_rank", Integer, nullable=True),
    Column("pp_stage", Integer, nullable=True),
    Column("tp_rank", Integer, nullable=True),
    Column("wall_seconds", Double, nullable=True),
    Index(None, "job", "rank", "ts"),
    Index(None, "ts"),
)

alerts = Table(
    "alerts",
    metadata,
    _row_id(),
    Column("fingerprint", String(512), nullable=False),  # Finding.fingerprint, an opaque digest
    Column("detector", String(64), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("action", String(32), nullable=False),
    Column("node", String(255), nullable=True),
    Column("gpu", Integer, nullable=True),
    Column("job", String(255), nullable=True),
    Column("rank", Integer, nullable=True),
    # Finding.key; added by revision 0002, so the database has it after updated_at.
    Column("key", String(255), nullable=False, default="", server_default=""),
    Column("summary", Text, nullable=False),
    Column("evidence", Text, nullable=False, default="{}"),  # JSON object
    Column("status", String(16), nullable=False),
    Column("starts_at", Double, nullable=False),
    Column("ends_at", Double, nullable=True),
    Column("updated_at", Double, nullable=False),
    Index(None, "status", "fingerprint"),
    # At most one firing alert per fingerprint, even when two collectors share the database.
    Index(
        "uq_alerts_firing_fingerprint",
        "fingerprint",
        unique=True,
        sqlite_where=text("status = 'firing'"),
        postgresql_where=text("status = 'firing'"),
    ),
)

# The outbox: one row per (alert transition, notifier target), committed with the alert change.
deliveries = Table(
    "deliveries",
    metadata,
    _row_id(),
    Column("alert_id", _ROW_ID_TYPE, ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
    Column("target", Text, nullable=False),
    Column("transition", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Double, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_at", Double, nullable=False),
    Column("sent_at", Double, nullable=True),
    Index(None, "state", "next_attempt_at"),
    Index(None, "alert_id"),
)

# Silences (revision 0006): alerts matching one while it is active are recorded and shown, not delivered.
# A silence names a node and, optionally, one of its GPUs and one detector; expiring it sets ends_at.
silences = Table(
    "silences",
    metadata,
    _row_id(),
    Column("node", String(255), nullable=False),
    Column("gpu", Integer, nullable=True),
    Column("detector", String(64), nullable=True),
    Column("starts_at", Double, nullable=False),
    Column("ends_at", Double, nullable=False),
    Column("comment", Text, nullable=False),
    Column("created_by", String(255), nullable=False, default="", server_default=""),
    Column("created_at", Double, nullable=False),
    Index(None, "ends_at"),
)

# Tables whose rows age out after retention_hours (Store.purge), each with the column of the row's time.
RETENTION_TABLES: tuple[tuple[Table, str], ...] = (
    (gpu_samples, "ts"),
    (host_samples, "ts"),
    (ib_samples, "ts"),
    (events, "ts"),
    (steps, "ts"),
    (batches, "received_at"),
    (batch_ranges, "last_received_at"),
)


# Revision 0008: collectors sharing one database. Each running collector beats here every few
# seconds; a fleet-wide duty (alert delivery, job-level detection, retention) is a lease one of
# them holds until it stops renewing it (collector/cluster.py).
collectors = Table(
    "collectors",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", String(64), nullable=False, default="", server_default=""),
    Column("grpc_address", String(255), nullable=False, default="", server_default=""),
    Column("http_address", String(255), nullable=False, default="", server_default=""),
    Column("started_at", Double, nullable=False),
    Column("heartbeat_at", Double, nullable=False),
    Column("streams", Integer, nullable=False, default=0, server_default="0"),
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("acquired_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
)
