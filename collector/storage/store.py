"""Every database read and write of the collector, on SQLite (embedded) or PostgreSQL (shared)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import (
    Connection,
    Engine,
    RowMapping,
    Select,
    Table,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.sql.elements import ColumnElement

from fleetwatch import __version__
from fleetwatch.collector.storage import schema
from fleetwatch.collector.storage.blocks import blocks_from_bodies
from fleetwatch.collector.storage.blocks import gpu_samples as block_gpu_samples
from fleetwatch.collector.storage.blocks import host_samples as block_host_samples
from fleetwatch.collector.storage.blocks import ib_ports as block_ib_ports
from fleetwatch.collector.storage.chunks import Block, body_message, compress_body, decode_block
from fleetwatch.collector.storage.migrations import alembic_config, script_directory
from fleetwatch.configfile import MASK
from fleetwatch.limits import storable_metric
from fleetwatch.records import Event, Finding, GpuSample, HostSample, Step
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import GPU_FIELDS, HOST_FIELDS, IB_FIELDS, INTEGER_FIELDS, fill_metrics

# How long an SQLite writer waits for another writer's lock; well above one purge chunk's time.
SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_WAL_LIMIT_BYTES = 16 * 1024 * 1024
# A collector should fail start-up within seconds, not hang, when PostgreSQL is unreachable.
PG_CONNECT_TIMEOUT_SECONDS = 10
# Notifier errors can be whole HTTP bodies; keep what fits a log line.
LAST_ERROR_MAX_CHARS = 2000
# The delivery targets of an alert transition: names, or names with the seconds each waits before
# its first try (a webhook's group wait).
Targets = Sequence[str] | Mapping[str, float]
# A masked password in a URL, and that text as a rendered URL quotes it.
_HIDDEN = "***"
_HIDDEN_QUOTED = "%2A%2A%2A"

# BIGINT is signed; NVML reports "not available" in uint64 fields as all-ones, never a real count.
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)

# What a database raises for a value it cannot take (a constraint, a type's range, a NUL byte in
# PostgreSQL text); SQLite's driver raises OverflowError itself for an integer beyond 64 bits.
_DATA_ERRORS = (sa_exc.IntegrityError, sa_exc.DataError, OverflowError)

# IB_FIELDS holds ib_state (text) beside the numeric port counters.
_IB_METRIC_FIELDS: tuple[str, ...] = tuple(f for f in IB_FIELDS if f != "ib_state")

_GPU_FIELD_SET = frozenset(GPU_FIELDS)
_HOST_FIELD_SET = frozenset(HOST_FIELDS)
_IB_METRIC_SET = frozenset(_IB_METRIC_FIELDS)

# Execution option that makes the SQLite "begin" hook take the write lock up front.
_WRITE_OPTION = "fleetwatch_write"

# A database fleetwatch 0.1.0 made: meta row schema_version "1", the tables of revision 0001.
LEGACY_SCHEMA_VERSION_KEY = "schema_version"
LEGACY_SCHEMA_VERSION = "1"
LEGACY_REVISION = "0001"

# PostgreSQL advisory lock key of Store.migrate: "fleetwat" in ASCII, unlikely to be another
# application's.
_MIGRATION_LOCK_ID = 0x666C656574776174

# Raw batches are selected by when they arrived, samples by their own time, which may be ahead of
# arrival by the clock skew the collector allows (limits: minutes at most).
_RAW_RECEIVED_MARGIN_SECONDS = 3600.0
_LATEST_BATCHES_PER_NODE = 8
# A node's GPUs in its newest block: samples this close to its last row count as "latest".
_LATEST_SPREAD_SECONDS = 120.0

# The meta row Store.probe_write rewrites (0.1.0 reads only its schema_version row).
PROBE_KEY = "readiness_probe_at"

log = logging.getLogger(__name__)


class StoreError(Exception):
    """The database cannot be reached or cannot take the write (full disk, lost connection).

    Nothing of the failed call was committed; the caller may keep serving and retry later.
    """


class BatchRefused(Exception):
    """The database refused a batch for its values (a constraint, a type's range), not for an outage.

    Resending it cannot help. The message is the database's one-line reason, never the statement
    or its parameters; `key` is the refused batch's (node, boot_id, seq) when one batch is known
    to be the cause, and `stored` the keys of the call's batches that were committed before it
    (each in its own transaction, on the item-by-item path).
    """

    def __init__(
        self,
        reason: str,
        key: tuple[str, str, int] | None = None,
        stored: frozenset[tuple[str, str, int]] = frozenset(),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key
        self.stored = stored


@dataclass(frozen=True, slots=True)
class SchemaMigration:
    """What Store.migrate did: from which revision (None: an empty database) to which."""

    from_revision: str | None
    to_revision: str


@dataclass(frozen=True, slots=True)
class GpuRows:
    """A dense batch's GPU samples as arrays (Batch.gpu_columns, checked): row i is GPU `gpu[i]` at `t[i]`.

    `values` has a column per fleetwatch.wire.GPU_FIELDS, NaN where absent; `label[i]` indexes
    `labels`, the (uuid, job, rank) of the row's GPU then, None where unknown.
    """

    t: np.ndarray
    gpu: np.ndarray
    values: np.ndarray
    label: np.ndarray
    labels: Sequence[tuple[str | None, str | None, int | None]]

    def __len__(self) -> int:
        return len(self.t)

    def newest_rows(self) -> dict[int, int]:
        """Per GPU: the row of its newest sample (the later row on a tie)."""
        newest: dict[int, int] = {}
        times = self.t.tolist()
        for row, gpu in enumerate(self.gpu.tolist()):
            held = newest.get(gpu)
            if held is None or times[row] >= times[held]:
                newest[gpu] = row
        return newest


@dataclass(frozen=True, slots=True)
class IngestBatch:
    """One agent batch as stored: its idempotency key (node, boot_id, seq) and its records."""

    node: str
    boot_id: str
    seq: int
    received_at: float
    gpu_samples: Sequence[GpuSample] = ()
    # The dense form's GPU samples (agents since 0.2), beside or instead of gpu_samples.
    gpu_rows: GpuRows | None = None
    host_samples: Sequence[HostSample] = ()
    # Dicts with keys t, device, port, ib_state and the numeric IB_FIELDS (absent = unsupported).
    ib_ports: Sequence[Mapping[str, Any]] = ()
    events: Sequence[Event] = ()
    steps: Sequence[Step] = ()
    # The serialized pb.Batch as the agent sent it: what is stored (the samples above feed live
    # detection). Empty: built from the records (tests, tools that make IngestBatches themselves).
    body: bytes = b""
    # False when the batch cannot be among the compacted ones: its stream's Welcome said the boot
    # held less than its seq. Spares the lookup in batch_ranges for nearly every batch.
    may_be_compacted: bool = True

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.node, self.boot_id, int(self.seq))

    @property
    def gpu_sample_count(self) -> int:
        return len(self.gpu_samples) + (len(self.gpu_rows) if self.gpu_rows is not None else 0)


def redact_url(url: str | URL) -> str:
    """The database URL with its password replaced, fit for logs and error messages.

    psycopg also takes the password as a query parameter (?password=...); those are masked too.
    """
    try:
        parsed = make_url(url)
        hidden = {key: _HIDDEN for key in parsed.query if "password" in key.lower()}
        return parsed.update_query_dict(hidden).render_as_string(hide_password=True).replace(_HIDDEN_QUOTED, _HIDDEN)
    except (sa_exc.ArgumentError, ValueError, TypeError):
        # Unparseable: where userinfo or a query could hold a password, nothing of it is safe to show.
        text = str(url)
        return MASK if "@" in text or "?" in text else text


class Store:
    """The collector's database: samples, node inventory, alerts and their delivery outbox."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url_for_log = redact_url(url)
        try:
            parsed = make_url(url)
        except sa_exc.ArgumentError as exc:
            raise StoreError(f"invalid database URL {self.url_for_log!r}: {exc}") from None
        backend = parsed.get_backend_name()
        # A pooled PostgreSQL connection may have been cut (a server restart, a proxy's idle timeout);
        # a SQLite file cannot be, and a ping per transaction would cost every ingest commit.
        engine_args: dict[str, Any] = {"echo": echo, "pool_pre_ping": backend != "sqlite"}
        if backend == "postgresql":
            if parsed.drivername == "postgresql":
                # The bare scheme means psycopg2 to SQLAlchemy; fleetwatch ships psycopg 3 only.
                parsed = parsed.set(drivername="postgresql+psycopg")
            if "connect_timeout" not in parsed.query:
                engine_args["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS}
        elif backend != "sqlite":
            raise StoreError(
                f"unsupported database {self.url_for_log!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
            )
        try:
            self._engine = create_engine(parsed, **engine_args)
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as exc:
            raise StoreError(f"cannot use database {self.url_for_log!r}: {exc}") from None
        if backend == "sqlite":
            _install_sqlite_hooks(self._engine)
        self._write_engine = self._engine.execution_options(**{_WRITE_OPTION: True})
        # Fail at start-up, naming the database, rather than at the first batch.
        with self._read("connect") as conn:
            conn.execute(select(1))

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise StoreError(self._describe(what, exc)) from exc
        except sa_exc.TimeoutError as exc:  # every pooled connection busy
            raise StoreError(f"database {self.url_for_log}: {what} failed: {exc}") from exc

    def _describe(self, what: str, exc: sa_exc.DBAPIError) -> str:
        reason = str(exc.orig if exc.orig is not None else exc).strip().splitlines()[0]
        message = f"database {self.url_for_log}: {what} failed: {reason}"
        if "full" in reason.lower() or "no space" in reason.lower():
            message += " (free disk space or shorten retention; nothing of this call was stored)"
        return message

    @contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        with self._errors(what), self._engine.connect() as conn:
            yield conn

    @contextmanager
    def _write(self, what: str) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self._errors(what), self._write_engine.begin() as conn:
            yield conn

    def reading(self, what: str) -> AbstractContextManager[Connection]:
        """A connection for reads (storage/compaction.py); errors become StoreError naming `what`."""
        return self._read(what)

    def writing(self, what: str) -> AbstractContextManager[Connection]:
        """One write transaction, committed when the block ends (storage/compaction.py)."""
        return self._write(what)

    def release_free_pages(self) -> None:
        """SQLite: give the pages freed by compaction and expiry back to the file system.

        Databases created since revision 0004 are in incremental auto-vacuum mode; in an older
        file this does nothing (its free pages are reused by later writes instead).
        """
        if self._engine.dialect.name != "sqlite":
            return
        with self._errors("release free pages"):
            raw = self._engine.raw_connection()
            try:
                # executescript steps the pragma to the end (a plain execute frees nothing) and
                # runs it in autocommit, where SQLite's incremental vacuum works.
                raw.driver_connection.executescript("PRAGMA incremental_vacuum;")  # type: ignore[union-attr]
            finally:
                raw.close()

    def close(self) -> None:
        self._engine.dispose()

    # -- schema -----------------------------------------------------------------------------

    def migrate(self) -> SchemaMigration:
        """Bring the schema to this fleetwatch's newest revision; refuse a database it does not know.

        An empty database is built from the first revision; one written by fleetwatch 0.1.0 (its
        `meta` table says schema_version 1, and it has no alembic_version) is stamped at 0001 and
        upgraded in place. Everything happens in one transaction, which a second collector
        migrating the same database waits for.
        """
        scripts = script_directory()
        head = scripts.get_current_head()
        assert head is not None, "versions/ holds revision 0001 at least"
        known = {script.revision for script in scripts.walk_revisions()}
        try:
            with self._write("migrate schema") as conn:
                if conn.dialect.name == "postgresql":
                    # Held to commit: a second collector upgrades nothing and finds the head.
                    conn.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK_ID)))
                before = MigrationContext.configure(conn).get_current_revision()
                config = alembic_config(conn)
                legacy = before is None and self._is_legacy_database(conn)
                if legacy:
                    command.stamp(config, LEGACY_REVISION)
                    before = LEGACY_REVISION
                elif before is not None and before not in known:
                    raise StoreError(
                        f"database {self.url_for_log} is at schema revision {before!r}, which "
                        f"fleetwatch {__version__} does not know (its newest is {head!r}): a newer "
                        "fleetwatch wrote it; run that version or a later one"
                    )
                if before != head:
                    command.upgrade(config, "head")
        except (sa_exc.DBAPIError, CommandError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise StoreError(
                f"database {self.url_for_log}: schema migration failed, nothing changed: {reason}"
            ) from exc
        if before is None:
            log.info("database schema created at %s", head)
        elif before == head:
            log.info("database schema up to date at %s", head)
        else:
            origin = " (written by fleetwatch 0.1.0)" if legacy else ""
            log.info("database schema upgraded from %s to %s%s", before, head, origin)
        return SchemaMigration(from_revision=before, to_revision=head)

    def _is_legacy_database(self, conn: Connection) -> bool:
        """Whether fleetwatch 0.1.0 made this database; raise for a meta version it did not write."""
        if not inspect(conn).has_table(schema.meta.name):
            return False
        version = conn.execute(
            select(schema.meta.c.value).where(schema.meta.c.key == LEGACY_SCHEMA_VERSION_KEY)
        ).scalar()
        if version != LEGACY_SCHEMA_VERSION:
            raise StoreError(
                f"database {self.url_for_log} has no alembic_version table and schema_version "
                f"{version!r} in its meta table; fleetwatch {__version__} can upgrade only the "
                f"{LEGACY_SCHEMA_VERSION!r} of fleetwatch 0.1.0"
            )
        return True

    # -- ingest -----------------------------------------------------------------------------

    def ingest(self, items: Sequence[IngestBatch]) -> list[bool]:
        """Store batches in one transaction; per item True = stored, False = already held.

        A batch is held when its key (node, boot_id, seq) is in `batches` (not compacted yet) or in
        a compacted run of `batch_ranges`; a repeat of a key within `items` is False too. Raises
        StoreError when the database is unreachable or full (nothing stored), and BatchRefused for
        a record the database refuses (never reported as a duplicate, so it is never acked; its
        `key` names it when `items` is one batch). The collector checks every value before it gets
        here (collector/validate.py), so BatchRefused means a check is missing.
        """
        stored = [False] * len(items)
        first_index: dict[tuple[str, str, int], int] = {}
        for i, item in enumerate(items):
            first_index.setdefault(item.key, i)  # a repeat inside the list is a duplicate too
        unique = [(i, items[i]) for i in first_index.values()]
        if not unique:
            return stored
        try:
            with self._write("ingest") as conn:
                compacted = _compacted_keys(conn, [item.key for _, item in unique if item.may_be_compacted])
                fresh = [(i, item) for i, item in unique if item.key not in compacted]
                new_keys = _insert_batches(conn, [item for _, item in fresh])
        except _DATA_ERRORS as exc:
            if len(unique) == 1:
                raise BatchRefused(_reason(exc), unique[0][1].key) from exc
            return self._ingest_one_by_one(unique, stored)
        for i, item in fresh:
            stored[i] = item.key in new_keys
        return stored

    def _ingest_one_by_one(self, unique: list[tuple[int, IngestBatch]], stored: list[bool]) -> list[bool]:
        """Item by item, in order, to find the batch the database refuses (BatchRefused names it)."""
        for i, item in unique:
            try:
                with self._write("ingest") as conn:
                    if _compacted_keys(conn, [item.key]):
                        continue
                    stored[i] = item.key in _insert_batches(conn, [item])
            except _DATA_ERRORS as exc:
                done = frozenset(unique_item.key for j, unique_item in unique if stored[j])
                raise BatchRefused(_reason(exc), item.key, done) from exc
        return stored

    def newest_batch_id(self) -> int:
        """The id of the newest stored batch not compacted yet (0: none)."""
        b = schema.batches
        with self._read("read newest batch id") as conn:
            return int(conn.execute(select(func.max(b.c.id))).scalar() or 0)

    def batch_ids_after(self, after_id: int, limit: int) -> list[int]:
        """Ids of stored batches (not compacted yet) after `after_id`, ascending."""
        b = schema.batches
        query = select(b.c.id).where(b.c.id > after_id, b.c.body.is_not(None)).order_by(b.c.id).limit(limit)
        with self._read("read new batch ids") as conn:
            return [int(row_id) for row_id in conn.execute(query).scalars()]

    def batches_by_id(self, ids: Collection[int]) -> list[tuple[int, str, str, float, bytes]]:
        """(id, node, boot_id, received_at, serialized Batch) of these stored batches, by id: what
        other collectors stored, for the fleet-wide detectors."""
        if not ids:
            return []
        b = schema.batches
        query = (
            select(b.c.id, b.c.node, b.c.boot_id, b.c.received_at, b.c.body)
            .where(b.c.id.in_(list(ids)), b.c.body.is_not(None))
            .order_by(b.c.id)
        )
        with self._read("read new batches") as conn:
            rows = conn.execute(query).all()
        return [(int(r.id), r.node, r.boot_id, float(r.received_at), body_message(r.body)) for r in rows]

    def node_known(self, node: str) -> bool:
        """Whether `node` has a row, i.e. some stream of it has had a batch stored."""
        n = schema.nodes
        with self._read("node_known") as conn:
            return conn.execute(select(n.c.node).where(n.c.node == node)).first() is not None

    def last_seq(self, node: str, boot_id: str) -> int:
        """Highest stored seq of this node's boot; 0 when none (the wire's Welcome.last_seq)."""
        b, r = schema.batches, schema.batch_ranges
        with self._read("last_seq") as conn:
            raw = conn.execute(select(func.max(b.c.seq)).where(b.c.node == node, b.c.boot_id == boot_id)).scalar()
            ranges = conn.execute(
                select(func.max(r.c.last_seq)).where(r.c.node == node, r.c.boot_id == boot_id)
            ).scalar()
        return max(int(raw or 0), int(ranges or 0))

    def stored_seqs(self, node: str, boot_id: str | None = None) -> list[int]:
        """Every stored seq of `node` (of one boot, or of all), compacted or not, ascending; repeats across boots."""
        b, r = schema.batches, schema.batch_ranges
        raw = select(b.c.seq).where(b.c.node == node)
        runs = select(r.c.first_seq, r.c.last_seq).where(r.c.node == node)
        if boot_id is not None:
            raw, runs = raw.where(b.c.boot_id == boot_id), runs.where(r.c.boot_id == boot_id)
        with self._read("read stored seqs") as conn:
            seqs = [int(seq) for seq in conn.execute(raw).scalars()]
            for first, last in conn.execute(runs):
                seqs.extend(range(int(first), int(last) + 1))
        return sorted(seqs)

    # -- node inventory ---------------------------------------------------------------------

    def upsert_node(
        self,
        node: str,
        boot_id: str,
        agent_version: str,
        nvml_available: bool,
        sampling_interval_seconds: float,
        gpus: Sequence[Mapping[str, Any]],
        seen_at: float,
    ) -> None:
        """Record an agent's Hello: node row (boot_seen_at moves only on a new boot), GPU rows."""
        n, g = schema.nodes, schema.gpus
        gpu_rows = [_gpu_info_row(node, info, seen_at) for info in gpus]
        for attempt in (1, 2):
            try:
                with self._write("upsert node") as conn:
                    current = conn.execute(
                        select(n.c.boot_id, n.c.last_seen).where(n.c.node == node).with_for_update()
                    ).first()
                    values = {
                        "boot_id": boot_id,
                        "agent_version": agent_version or "",
                        "nvml_available": bool(nvml_available),
                        "sampling_interval_seconds": sampling_interval_seconds,
                    }
                    if current is None:
                        conn.execute(
                            insert(n).values(
                                node=node,
                                first_seen=seen_at,
                                last_seen=seen_at,
                                boot_seen_at=seen_at,
                                **values,
                            )
                        )
                    else:
                        values["last_seen"] = max(current.last_seen, seen_at)
                        if current.boot_id != boot_id:
                            values["boot_seen_at"] = seen_at
                        conn.execute(update(n).where(n.c.node == node).values(**values))
                    conn.execute(delete(g).where(g.c.node == node))
                    if gpu_rows:
                        conn.execute(insert(g), gpu_rows)
                return
            except sa_exc.IntegrityError:
                # Another collector inserted this node at the same moment; retry as an update.
                if attempt == 2:
                    raise

    def touch_nodes(self, last_seen: Mapping[str, float]) -> None:
        """Move each known node's last_seen forward (never back); unknown nodes are ignored."""
        if not last_seen:
            return
        n = schema.nodes
        stmt = (
            update(n)
            .where(n.c.node == bindparam("b_node"), n.c.last_seen < bindparam("b_seen_at"))
            .values(last_seen=bindparam("b_seen_at"))
        )
        rows = [{"b_node": node, "b_seen_at": float(t)} for node, t in last_seen.items()]
        with self._write("touch nodes") as conn:
            conn.execute(stmt, rows)

    # -- collectors sharing the database (collector/cluster.py) ------------------------------

    def beat(self, collector: Mapping[str, Any]) -> None:
        """Inserts or refreshes a collector's row: id, host, pid, version, grpc_address,
        http_address, started_at, heartbeat_at, streams."""
        c = schema.collectors
        row = dict(collector)
        with self._write("collector heartbeat") as conn:
            upsert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(c).values(**row)
            changing = {key: value for key, value in row.items() if key not in ("id", "started_at")}
            conn.execute(upsert.on_conflict_do_update(index_elements=[c.c.id], set_=changing))

    def collectors(self) -> list[dict[str, Any]]:
        """Every collector that has beaten, newest start first (dead ones until forgotten)."""
        c = schema.collectors
        with self._read("read collectors") as conn:
            rows = conn.execute(select(c).order_by(c.c.started_at.desc(), c.c.id)).mappings()
            return [dict(row) for row in rows]

    def forget_collector(self, collector_id: str) -> None:
        """A collector's row and its leases, on a clean stop (its duties move at once)."""
        c, le = schema.collectors, schema.leases
        with self._write("forget collector") as conn:
            conn.execute(delete(le).where(le.c.holder == collector_id))
            conn.execute(delete(c).where(c.c.id == collector_id))

    def forget_dead_collectors(self, older_than: float) -> int:
        """Rows of collectors that have not beaten since `older_than` (their leases have long expired)."""
        c = schema.collectors
        with self._write("forget dead collectors") as conn:
            return int(conn.execute(delete(c).where(c.c.heartbeat_at < older_than)).rowcount or 0)

    def acquire_lease(self, name: str, holder: str, now: float, ttl_seconds: float) -> bool:
        """Takes or renews lease `name` for `holder` until now + ttl; False while another holds it.

        One statement decides: the row is updated only where this holder has it or it has expired,
        so two collectors racing for an expired lease cannot both win (the loser updates no row).
        """
        le = schema.leases
        expires_at = now + ttl_seconds
        # RETURNING, not rowcount: what a driver reports as rowcount for ON CONFLICT varies.
        with self._write(f"acquire lease {name}") as conn:
            taken = conn.execute(
                update(le)
                .where(le.c.name == name, or_(le.c.holder == holder, le.c.expires_at < now))
                .values(
                    holder=holder,
                    expires_at=expires_at,
                    acquired_at=case((le.c.holder == holder, le.c.acquired_at), else_=now),
                )
                .returning(le.c.name)
            ).first()
            if taken is not None:
                return True
            dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            inserted = conn.execute(
                dialect_insert(le)
                .values(name=name, holder=holder, acquired_at=now, expires_at=expires_at)
                .on_conflict_do_nothing(index_elements=[le.c.name])
                .returning(le.c.name)
            ).first()
            return inserted is not None

    def release_lease(self, name: str, holder: str) -> None:
        le = schema.leases
        with self._write(f"release lease {name}") as conn:
            conn.execute(delete(le).where(le.c.name == name, le.c.holder == holder))

    def leases(self) -> list[dict[str, Any]]:
        le = schema.leases
        with self._read("read leases") as conn:
            return [dict(row) for row in conn.execute(select(le).order_by(le.c.name)).mappings()]

    def claim_nodes(self, nodes: Collection[str], collector: str) -> None:
        """Records that these nodes' agents stream to `collector` now."""
        if not nodes:
            return
        n = schema.nodes
        with self._write("claim nodes") as conn:
            conn.execute(
                update(n)
                .where(n.c.node.in_(list(nodes)), or_(n.c.collector.is_(None), n.c.collector != collector))
                .values(collector=collector)
            )

    def node_holders(self) -> dict[str, str | None]:
        """node -> the collector its agent last streamed to (None: not recorded)."""
        n = schema.nodes
        with self._read("read node holders") as conn:
            return {row.node: row.collector for row in conn.execute(select(n.c.node, n.c.collector))}

    def nodes(self) -> list[dict[str, Any]]:
        n = schema.nodes
        with self._read("read nodes") as conn:
            rows = conn.execute(select(n).order_by(n.c.node)).mappings().all()
        return [{**row, "nvml_available": bool(row["nvml_available"])} for row in rows]

    def gpus(self, node: str | None = None) -> list[dict[str, Any]]:
        """GPU inventory rows by node and index: node, gpu (the NVML index), the other GpuInfo
        keys, updated_at."""
        g = schema.gpus
        query = select(g).order_by(g.c.node, g.c.gpu)
        if node is not None:
            query = query.where(g.c.node == node)
        with self._read("read gpus") as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    # -- sample reads -----------------------------------------------------------------------

    def blocks(
        self, kind: str, start: float, end: float = math.inf, node: str | None = None, *, rolled_up: bool | None = None
    ) -> list[tuple[str, Block]]:
        """Each node's samples of `kind` ("gpu", "host", "ib") that may hold times in [start, end].

        Compacted blocks, then the batches not compacted yet (decoded here), oldest first per node;
        rows outside [start, end] are not cut off (Block rows are sorted: callers slice). With
        `rolled_up` False, only blocks whose minutes are not in rollup_blocks yet (raw batches
        are never rolled up).
        """
        sb, b = schema.sample_blocks, schema.batches
        query = select(sb.c.node, sb.c.data).where(sb.c.kind == kind, sb.c.t_end >= start, sb.c.t_start <= end)
        raw = select(b.c.node, b.c.body).where(
            b.c.body.is_not(None), b.c.received_at >= start - _RAW_RECEIVED_MARGIN_SECONDS
        )
        if node is not None:
            query = query.where(sb.c.node == node)
            raw = raw.where(b.c.node == node)
        if rolled_up is not None:
            query = query.where(sb.c.rolled_up == rolled_up)
        with self._read(f"read {kind} blocks") as conn:
            stored = conn.execute(query.order_by(sb.c.node, sb.c.t_start, sb.c.id)).all()
            bodies = conn.execute(raw.order_by(b.c.node, b.c.id)).all()
        out: list[tuple[str, Block]] = [(row_node, decode_block(data)) for row_node, data in stored]
        by_node: dict[str, list[bytes]] = {}
        for row_node, body in bodies:
            by_node.setdefault(row_node, []).append(body)
        for row_node, node_bodies in by_node.items():
            block = blocks_from_bodies(row_node, node_bodies).get(kind)
            if block is not None:
                out.append((row_node, block))
        return out

    def gpu_samples_since(self, ts: float, node: str | None = None) -> list[GpuSample]:
        """GPU samples with t >= ts, oldest first."""
        samples = [s for name, block in self.blocks("gpu", ts, node=node) for s in block_gpu_samples(name, block, ts)]
        g = schema.gpu_samples
        with self._read("read gpu samples") as conn:
            rows = conn.execute(_of_node(select(g).where(g.c.ts >= ts), g, node).order_by(g.c.ts, g.c.id)).mappings()
            samples += [_gpu_sample(row) for row in rows]  # written before revision 0004, not moved yet
        samples.sort(key=lambda s: s.t)
        return samples

    def latest_gpu_samples(self) -> dict[tuple[str, int], GpuSample]:
        """The newest stored sample of every (node, gpu)."""
        latest: dict[tuple[str, int], GpuSample] = {}

        def keep(sample: GpuSample) -> None:
            key = (sample.node, sample.gpu)
            current = latest.get(key)
            if current is None or sample.t >= current.t:
                latest[key] = sample

        g, sb, b = schema.gpu_samples, schema.sample_blocks, schema.batches
        legacy_newest = select(g.c.node, g.c.gpu, func.max(g.c.ts).label("ts")).group_by(g.c.node, g.c.gpu).subquery()
        legacy = select(g).join(
            legacy_newest,
            and_(g.c.node == legacy_newest.c.node, g.c.gpu == legacy_newest.c.gpu, g.c.ts == legacy_newest.c.ts),
        )
        newest_block = select(func.max(sb.c.id)).where(sb.c.kind == "gpu").group_by(sb.c.node).scalar_subquery()
        # The newest few batches of each node not compacted yet: a spooled one sent late may hold
        # older samples than the one stored before it.
        ranked = (
            select(
                b.c.node,
                b.c.body,
                func.row_number().over(partition_by=b.c.node, order_by=b.c.id.desc()).label("rank"),
            )
            .where(b.c.body.is_not(None))
            .subquery()
        )
        newest_bodies = select(ranked.c.node, ranked.c.body).where(ranked.c.rank <= _LATEST_BATCHES_PER_NODE)
        with self._read("read latest gpu samples") as conn:
            for row in conn.execute(legacy.order_by(g.c.id)).mappings():
                keep(_gpu_sample(row))
            blocks = conn.execute(select(sb.c.node, sb.c.data).where(sb.c.id.in_(newest_block))).all()
            bodies = conn.execute(newest_bodies).all()
        for node, data in blocks:
            block = decode_block(data)
            for sample in block_gpu_samples(node, block, float(block.t[-1]) - _LATEST_SPREAD_SECONDS):
                keep(sample)
        by_node: dict[str, list[bytes]] = {}
        for node, body in bodies:
            by_node.setdefault(node, []).append(body)
        for node, node_bodies in by_node.items():
            raw_block = blocks_from_bodies(node, node_bodies).get("gpu")
            if raw_block is not None:
                for sample in block_gpu_samples(node, raw_block, float(raw_block.t[-1]) - _LATEST_SPREAD_SECONDS):
                    keep(sample)
        return latest

    def host_samples_since(self, ts: float, node: str | None = None) -> list[HostSample]:
        """Host samples with t >= ts, oldest first."""
        samples = [s for name, block in self.blocks("host", ts, node=node) for s in block_host_samples(name, block, ts)]
        h = schema.host_samples
        with self._read("read host samples") as conn:
            rows = conn.execute(_of_node(select(h).where(h.c.ts >= ts), h, node).order_by(h.c.ts, h.c.id)).mappings()
            samples += [
                HostSample(t=row["ts"], node=row["node"], metrics=_row_metrics(row, HOST_FIELDS)) for row in rows
            ]
        samples.sort(key=lambda s: s.t)
        return samples

    def ib_samples_since(self, ts: float, node: str | None = None) -> list[dict[str, Any]]:
        """InfiniBand port samples with t >= ts, oldest first: the ingest dict shape plus node."""
        result = [
            {**port, "node": name}
            for name, block in self.blocks("ib", ts, node=node)
            for port in block_ib_ports(block, ts)
        ]
        ib = schema.ib_samples
        with self._read("read ib samples") as conn:
            rows = conn.execute(
                _of_node(select(ib).where(ib.c.ts >= ts), ib, node).order_by(ib.c.ts, ib.c.id)
            ).mappings()
            for row in rows:
                port: dict[str, Any] = {
                    "t": row["ts"],
                    "node": row["node"],
                    "device": row["device"],
                    "port": row["port"],
                }
                if row["ib_state"] is not None:
                    port["ib_state"] = row["ib_state"]
                port.update(_row_metrics(row, _IB_METRIC_FIELDS))
                result.append(port)
        result.sort(key=lambda p: p["t"])
        return result

    def events_since(self, ts: float, node: str | None = None) -> list[Event]:
        """Events with t >= ts, oldest first."""
        e = schema.events
        with self._read("read events") as conn:
            rows = conn.execute(_of_node(select(e).where(e.c.ts >= ts), e, node).order_by(e.c.ts, e.c.id)).mappings()
            return [
                Event(
                    t=row["ts"],
                    node=row["node"],
                    kind=row["kind"],
                    gpu=row["gpu"],
                    xid=row["xid"],
                    pci_bus_id=row["pci_bus_id"],
                    uuid=row["uuid"],
                    message=row["message"],
                    source=row["source"],
                )
                for row in rows
            ]

    def steps_since(self, ts: float, node: str | None = None) -> list[Step]:
        """Step reports with t >= ts, oldest first."""
        s = schema.steps
        with self._read("read steps") as conn:
            rows = conn.execute(_of_node(select(s).where(s.c.ts >= ts), s, node).order_by(s.c.ts, s.c.id)).mappings()
            return [
                Step(
                    t=row["ts"],
                    job=row["job"],
                    rank=row["rank"],
                    node=row["node"],
                    step=row["step"],
                    seconds=row["seconds"],
                    gpu=row["gpu"],
                    dp_rank=row["dp_rank"],
                    pp_stage=row["pp_stage"],
                    tp_rank=row["tp_rank"],
                    wall_seconds=row["wall_seconds"],
                )
                for row in rows
            ]

    def count_rows(self, table: str) -> int:
        if table not in schema.metadata.tables:
            raise ValueError(f"unknown table {table!r}; known: {sorted(schema.metadata.tables)}")
        with self._read(f"count {table}") as conn:
            return int(conn.execute(select(func.count()).select_from(schema.metadata.tables[table])).scalar_one())

    # -- alerts and the delivery outbox -----------------------------------------------------

    def open_alert(self, finding: Finding, now: float, targets: Targets) -> int:
        """Insert a firing alert and one pending delivery per target, in one transaction.

        When an alert with the same fingerprint is already firing, return its id and add nothing.
        """
        a = schema.alerts
        fingerprint = finding.fingerprint
        try:
            with self._write("open alert") as conn:
                alert_id = _firing_alert_id(conn, fingerprint)
                if alert_id is not None:
                    return alert_id
                primary_key = conn.execute(
                    insert(a).values(
                        fingerprint=fingerprint,
                        detector=finding.detector,
                        severity=finding.severity,
                        action=finding.action,
                        node=finding.node,
                        gpu=finding.gpu,
                        job=finding.job,
                        rank=finding.rank,
                        key=finding.key,
                        summary=finding.summary,
                        evidence=json.dumps(_evidence_with_board(finding), sort_keys=True, default=str),
                        status="firing",
                        starts_at=finding.start,
                        ends_at=None,
                        updated_at=now,
                    )
                ).inserted_primary_key
                assert primary_key is not None  # an INSERT of one row into a table with a primary key
                alert_id = int(primary_key[0])
                _add_deliveries(conn, alert_id, "firing", targets, now)
                return alert_id
        except sa_exc.IntegrityError:
            # Another collector sharing the database opened the same alert first (the firing
            # fingerprint is unique); its alert is ours.
            with self._read("open alert") as conn:
                alert_id = _firing_alert_id(conn, fingerprint)
            if alert_id is None:
                raise
            return alert_id

    def resolve_alert(self, fingerprint: str, end: float, now: float, targets: Targets) -> int | None:
        """Resolve the firing alert and queue its 'resolved' deliveries; None when none fires."""
        a = schema.alerts
        with self._write("resolve alert") as conn:
            alert_id = _firing_alert_id(conn, fingerprint, for_update=True)
            if alert_id is None:
                return None
            changed = conn.execute(
                update(a)
                .where(a.c.id == alert_id, a.c.status == "firing")
                .values(status="resolved", ends_at=end, updated_at=now)
            ).rowcount
            if changed != 1:
                return None
            _add_deliveries(conn, alert_id, "resolved", targets, now)
            return alert_id

    def firing_alerts(self) -> list[dict[str, Any]]:
        """Every firing alert, oldest start first."""
        a = schema.alerts
        with self._read("read alerts") as conn:
            rows = conn.execute(_alert_select().where(a.c.status == "firing").order_by(a.c.starts_at, a.c.id))
            return [_alert_dict(row) for row in rows.mappings()]

    def alerts_to_announce(self, resolved_since: float) -> list[dict[str, Any]]:
        """Firing alerts and those resolved at or after `resolved_since`, oldest start first (Alertmanager's feed)."""
        a = schema.alerts
        query = _alert_select().where(or_(a.c.status == "firing", a.c.ends_at >= resolved_since))
        with self._read("read alerts") as conn:
            rows = conn.execute(query.order_by(a.c.starts_at, a.c.id))
            return [_alert_dict(row) for row in rows.mappings()]

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        """One alert by id, or None."""
        a = schema.alerts
        with self._read("read alert") as conn:
            row = conn.execute(_alert_select().where(a.c.id == alert_id)).mappings().first()
        return None if row is None else _alert_dict(row)

    def alerts(
        self,
        status: str | None = None,
        limit: int = 100,
        *,
        node: str | None = None,
        gpu: int | None = None,
        detector: str | None = None,
        severity: str | None = None,
        active_since: float | None = None,
    ) -> list[dict[str, Any]]:
        """Alerts newest start first, optionally only those with `status`, on `node` / `gpu`, of
        `detector` / `severity`, or firing at some time from `active_since` on."""
        if status is not None and status not in schema.ALERT_STATUSES:
            raise ValueError(f"status {status!r} not in {schema.ALERT_STATUSES}")
        a = schema.alerts
        query = _alert_select().order_by(a.c.starts_at.desc(), a.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(a.c.status == status)
        for column, value in (("node", node), ("gpu", gpu), ("detector", detector), ("severity", severity)):
            if value is not None:
                query = query.where(a.c[column] == value)
        if active_since is not None:
            query = query.where(or_(a.c.ends_at.is_(None), a.c.ends_at >= active_since))
        with self._read("read alerts") as conn:
            return [_alert_dict(row) for row in conn.execute(query).mappings()]

    def due_deliveries(
        self,
        now: float,
        limit: int = 50,
        *,
        skip_ids: Collection[int] = (),
        skip_targets: Collection[str] = (),
    ) -> list[dict[str, Any]]:
        """Pending deliveries due by `now`, oldest first, each with its alert's fields.

        Keys: id (the delivery's), alert_id, target, transition, state, attempts,
        next_attempt_at, last_error, created_at, and the alert's fingerprint, detector, severity,
        action, node, gpu, job, rank, summary, evidence (dict), status, starts_at, ends_at.
        A delivery waits while an older one for the same alert fingerprint and target is still
        pending, so a receiver hears an alert's transitions in order, across re-openings too:
        firing, resolved, firing again ends firing there, whatever was retried. `skip_ids` (being
        sent) and `skip_targets` (no room to send now) leave rows out, so that they cannot crowd
        other targets' deliveries out of `limit`.
        """
        d, a = schema.deliveries, schema.alerts
        query = (
            _delivery_select()
            .where(d.c.state == "pending", d.c.next_attempt_at <= now, _not_blocked(d, a))
            .where(*_skipping(d, skip_ids, skip_targets))
            .order_by(d.c.created_at, d.c.id)
            .limit(limit)
        )
        with self._read("read due deliveries") as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, "evidence": _parse_evidence(row["evidence"])} for row in rows]

    def group_mates(
        self,
        targets: Collection[str],
        node: str | None,
        now: float,
        limit: int,
        *,
        skip_ids: Collection[int] = (),
    ) -> list[dict[str, Any]]:
        """Deliveries to join a group being sent now: not tried yet, for `node` (None: no node) and one of `targets`.

        They are still in their group wait (next_attempt_at ahead); sending them with the group's
        first is Alertmanager's group_wait. Same keys and order rule as `due_deliveries`.
        """
        d, a = schema.deliveries, schema.alerts
        query = (
            _delivery_select()
            .where(d.c.state == "pending", d.c.attempts == 0, d.c.created_at <= now, _not_blocked(d, a))
            .where(d.c.target.in_(sorted(targets)), a.c.node.is_(None) if node is None else a.c.node == node)
            .where(*_skipping(d, skip_ids, ()))
            .order_by(d.c.created_at, d.c.id)
            .limit(limit)
        )
        with self._read("read group mates") as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, "evidence": _parse_evidence(row["evidence"])} for row in rows]

    def next_delivery_due(self, *, skip_ids: Collection[int] = (), skip_targets: Collection[str] = ()) -> float | None:
        """When the next pending delivery falls due (may be in the past); None when none pends.

        Only deliveries `due_deliveries` would return count, with the same `skip_ids` and `skip_targets`.
        """
        d, a = schema.deliveries, schema.alerts
        query = (
            select(func.min(d.c.next_attempt_at))
            .select_from(d.join(a, a.c.id == d.c.alert_id))
            .where(d.c.state == "pending", _not_blocked(d, a), *_skipping(d, skip_ids, skip_targets))
        )
        with self._read("read next delivery") as conn:
            value = conn.execute(query).scalar()
        return None if value is None else float(value)

    def mark_delivered(self, delivery_id: int, now: float) -> None:
        # last_error stays: it tells why earlier attempts failed.
        self._finish_attempt(delivery_id, "mark delivered", state="sent", sent_at=now)

    def mark_retry(self, delivery_id: int, error: str, next_attempt_at: float) -> None:
        self._finish_attempt(
            delivery_id,
            "mark retry",
            last_error=error[:LAST_ERROR_MAX_CHARS],
            next_attempt_at=next_attempt_at,
        )

    def mark_failed(self, delivery_id: int, error: str) -> None:
        """Give up on a delivery: it stays in the outbox as 'failed' with the last error."""
        self._finish_attempt(delivery_id, "mark failed", state="failed", last_error=error[:LAST_ERROR_MAX_CHARS])

    def mark_silenced(self, delivery_ids: Collection[int], silence_id: int) -> None:
        """Deliveries a silence caught: settled without a send, the silence named in last_error."""
        d = schema.deliveries
        with self._write("mark silenced") as conn:
            conn.execute(
                update(d)
                .where(d.c.id.in_(sorted(delivery_ids)), d.c.state == "pending")
                .values(state="silenced", last_error=f"silenced by silence {silence_id}")
            )

    # -- silences ---------------------------------------------------------------------------

    def add_silence(
        self,
        *,
        node: str,
        gpu: int | None,
        detector: str | None,
        starts_at: float,
        ends_at: float,
        comment: str,
        created_by: str,
        now: float,
    ) -> int:
        s = schema.silences
        with self._write("add silence") as conn:
            primary_key = conn.execute(
                insert(s).values(
                    node=node,
                    gpu=gpu,
                    detector=detector,
                    starts_at=starts_at,
                    ends_at=ends_at,
                    comment=comment,
                    created_by=created_by,
                    created_at=now,
                )
            ).inserted_primary_key
        assert primary_key is not None
        return int(primary_key[0])

    def silences(self, now: float, *, include_expired: bool = False) -> list[dict[str, Any]]:
        """Silences not ended by `now` (or all of them), newest first, each with its `state`."""
        s = schema.silences
        query = select(s).order_by(s.c.created_at.desc(), s.c.id.desc())
        if not include_expired:
            query = query.where(s.c.ends_at > now)
        with self._read("read silences") as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, "state": _silence_state(row, now)} for row in rows]

    def expire_silence(self, silence_id: int, now: float) -> dict[str, Any] | None:
        """End a silence now (one already ended stays as it is); the silence, or None when there is none."""
        s = schema.silences
        with self._write("expire silence") as conn:
            conn.execute(update(s).where(s.c.id == silence_id, s.c.ends_at > now).values(ends_at=now))
            row = conn.execute(select(s).where(s.c.id == silence_id)).mappings().first()
        return None if row is None else {**row, "state": _silence_state(row, now)}

    def _finish_attempt(self, delivery_id: int, what: str, **values: Any) -> None:
        """Count one attempt on a pending delivery; a delivery already settled stays as it is."""
        d = schema.deliveries
        with self._write(what) as conn:
            changed = conn.execute(
                update(d)
                .where(d.c.id == delivery_id, d.c.state == "pending")
                .values(attempts=d.c.attempts + 1, **values)
            ).rowcount
            if changed == 0 and conn.execute(select(d.c.id).where(d.c.id == delivery_id)).first() is None:
                raise KeyError(f"no delivery with id {delivery_id}")

    # -- retention --------------------------------------------------------------------------

    def purge(self, older_than: float, batch_rows: int = 5000) -> int:
        """Delete samples, events, steps and batch keys older than `older_than`; rows deleted.

        Each DELETE removes at most `batch_rows` rows in its own transaction, so ingest is never
        locked out for long and the WAL / PostgreSQL undo stays small.
        """
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        deleted_rows = 0
        for table, ts_column in schema.RETENTION_TABLES:
            chunk = select(table.c.id).where(table.c[ts_column] < older_than).limit(batch_rows)
            while True:
                with self._write(f"purge {table.name}") as conn:
                    deleted = conn.execute(delete(table).where(table.c.id.in_(chunk))).rowcount
                deleted_rows += deleted
                if deleted < batch_rows:
                    break
        return deleted_rows

    # -- readiness --------------------------------------------------------------------------

    def probe_write(self, now: float, timeout_seconds: float) -> None:
        """Commit one tiny write (a meta row), waiting at most about `timeout_seconds` for locks.

        Raises StoreError when the database cannot take it: unreachable, read-only, locked by
        another writer, or out of space. For /readyz: a read would succeed in most of those.
        """
        m = schema.meta
        with self._errors("write probe"), self._write_engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # Before the transaction begins: BEGIN IMMEDIATE would wait the writers' 10 s.
                _sqlite_busy_timeout(conn, timeout_seconds)
            try:
                with conn.begin():
                    if not sqlite:
                        milliseconds = max(1, int(timeout_seconds * 1000))
                        for setting_name in ("lock_timeout", "statement_timeout"):
                            conn.execute(select(func.set_config(setting_name, f"{milliseconds}ms", True)))
                    upsert = (pg_insert if not sqlite else sqlite_insert)(m).values(key=PROBE_KEY, value=repr(now))
                    conn.execute(upsert.on_conflict_do_update(index_elements=[m.c.key], set_={"value": repr(now)}))
            finally:
                if sqlite:
                    _sqlite_busy_timeout(conn, SQLITE_BUSY_TIMEOUT_MS / 1000)


# -- helpers (module level: they take the connection of the caller's transaction) -----------

_ALERT_KEYS = (
    "id",
    "fingerprint",
    "detector",
    "severity",
    "action",
    "node",
    "gpu",
    "job",
    "rank",
    "key",
    "summary",
    "evidence",
    "status",
    "starts_at",
    "ends_at",
    "uuid",
    "pci_bus_id",
    "serial",
    "model",
)
# The board's identity comes from the gpus table (where the alert names an index it has).
_BOARD_KEYS = ("uuid", "pci_bus_id", "serial", "model")


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to the "begin" hook below: pysqlite's own implicit BEGIN is
        # deferred, and a deferred writer can fail with SQLITE_BUSY without waiting busy_timeout.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # Takes effect only in a new, empty file: compaction then returns freed pages (release_free_pages).
        cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the ingest writer
        # A big compaction transaction must not leave a WAL of its size behind after the checkpoint.
        cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_busy_timeout(conn: Connection, seconds: float) -> None:
    """Set how long this SQLite connection waits for another writer's lock (a connection setting)."""
    conn.connection.driver_connection.execute(f"PRAGMA busy_timeout={max(1, int(seconds * 1000))}")  # type: ignore[union-attr]


def _reason(exc: BaseException) -> str:
    """The first line of what the database said, without the statement and parameters SQLAlchemy appends."""
    orig = getattr(exc, "orig", None)
    lines = str(orig if orig is not None else exc).strip().splitlines()
    return lines[0][:LAST_ERROR_MAX_CHARS] if lines else type(exc).__name__


def _compacted_keys(conn: Connection, keys: Sequence[tuple[str, str, int]]) -> set[tuple[str, str, int]]:
    """Which of these (node, boot_id, seq) keys lie in a compacted run of batch_ranges."""
    if not keys:
        return set()
    r = schema.batch_ranges
    nodes = sorted({node for node, _, _ in keys})
    runs: dict[tuple[str, str], list[tuple[int, int]]] = {}
    query = select(r.c.node, r.c.boot_id, r.c.first_seq, r.c.last_seq).where(
        r.c.node.in_(bindparam("nodes", expanding=True))
    )
    for node, boot_id, first, last in conn.execute(query, {"nodes": nodes}):
        runs.setdefault((node, boot_id), []).append((int(first), int(last)))
    if not runs:
        return set()
    return {
        (node, boot_id, seq)
        for node, boot_id, seq in keys
        if any(first <= seq <= last for first, last in runs.get((node, boot_id), ()))
    }


def _insert_batches(conn: Connection, items: Sequence[IngestBatch]) -> set[tuple[str, str, int]]:
    """The batch rows (bodies) of `items` and their events and steps; returns the keys that were new.

    A key already in `batches` (a resend, or another collector's copy) is skipped by the database
    itself (ON CONFLICT DO NOTHING), which also settles two collectors inserting the same key.
    """
    if not items:
        return set()
    b = schema.batches
    rows = [
        {
            "node": item.node,
            "boot_id": item.boot_id,
            "seq": int(item.seq),
            "received_at": item.received_at,
            "body": compress_body(item.body or batch_body(item)),
        }
        for item in items
    ]
    # Keys in one global order: two collectors inserting overlapping lists on PostgreSQL then
    # wait on each other's unique-index entries in the same order and cannot deadlock.
    rows.sort(key=lambda row: (row["node"], row["boot_id"], row["seq"]))
    upsert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(b)
    statement = upsert.on_conflict_do_nothing(index_elements=[b.c.node, b.c.boot_id, b.c.seq]).returning(
        b.c.node, b.c.boot_id, b.c.seq
    )
    new = {(node, boot_id, int(seq)) for node, boot_id, seq in conn.execute(statement, rows)}
    event_rows = [_event_row(ev) for item in items if item.key in new for ev in item.events]
    step_rows = [_step_row(st) for item in items if item.key in new for st in item.steps]
    if event_rows:
        conn.execute(insert(schema.events), event_rows)
    if step_rows:
        conn.execute(insert(schema.steps), step_rows)
    return new


def batch_body(item: IngestBatch) -> bytes:
    """A serialized pb.Batch of an IngestBatch's samples, for one made without the agent's bytes."""
    batch = pb.Batch(seq=int(item.seq), t=item.received_at, boot_id=item.boot_id)
    for s in item.gpu_samples:
        sample = batch.gpus.add(gpu=int(s.gpu), t=s.t, uuid=s.uuid or "", job=s.job or "")
        if s.rank is not None:
            sample.rank = int(s.rank)
        fill_metrics(sample.metrics, _storable(s.metrics, _GPU_FIELD_SET))
    host_t = item.host_samples[0].t if item.host_samples else None
    for h in item.host_samples[:1]:
        batch.host.t = h.t
        fill_metrics(batch.host.metrics, _storable(h.metrics, _HOST_FIELD_SET))
    for port in item.ib_ports:
        if host_t is None:
            host_t = batch.host.t = float(port["t"])
        entry = batch.host.ib_ports.add(device=str(port["device"]), port=int(port["port"]))
        if port.get("ib_state"):
            entry.ib_state = str(port["ib_state"])
        fill_metrics(entry, _storable(port, _IB_METRIC_SET))
    return batch.SerializeToString()


def _storable(metrics: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """The canonical fields of `metrics` that can be measurements (a newer agent's extra names dropped)."""
    out = {}
    for name, value in metrics.items():
        if name in names and value is not None:
            kept = storable_metric(name, value)
            if kept is not None:
                out[name] = kept
    return out


def _row_metrics(row: RowMapping, names: Sequence[str]) -> dict[str, float | int]:
    """The non-NULL metric columns of a row, as int for integer fields and float otherwise."""
    metrics: dict[str, float | int] = {}
    for name in names:
        value = row[name]
        if value is not None:
            metrics[name] = int(value) if name in INTEGER_FIELDS else float(value)
    return metrics


def _gpu_sample(row: RowMapping) -> GpuSample:
    return GpuSample(
        t=row["ts"],
        node=row["node"],
        gpu=row["gpu"],
        metrics=_row_metrics(row, GPU_FIELDS),
        uuid=row["uuid"],
        job=row["job"],
        rank=row["rank"],
    )


def _event_row(ev: Event) -> dict[str, Any]:
    return {
        "node": ev.node,
        "ts": ev.t,
        "kind": ev.kind,
        "gpu": ev.gpu,
        "xid": ev.xid,
        "pci_bus_id": ev.pci_bus_id or None,
        "uuid": ev.uuid or None,
        "message": ev.message or "",
        "source": ev.source or None,
    }


def _step_row(st: Step) -> dict[str, Any]:
    return {
        "node": st.node,
        "ts": st.t,
        "job": st.job,
        "rank": int(st.rank),
        "step": int(st.step),
        "seconds": float(st.seconds),
        "gpu": st.gpu,
        "dp_rank": st.dp_rank,
        "pp_stage": st.pp_stage,
        "tp_rank": st.tp_rank,
        "wall_seconds": st.wall_seconds,
    }


_GPU_INFO_TEXT = ("uuid", "name", "pci_bus_id", "serial", "driver_version", "cuda_version")
_GPU_INFO_FLOAT = ("power_limit_watts", "sm_clock_max_mhz", "mem_clock_max_mhz")


def _gpu_info_row(node: str, info: Mapping[str, Any], seen_at: float) -> dict[str, Any]:
    row: dict[str, Any] = {"node": node, "gpu": int(info["index"]), "updated_at": seen_at}
    # The wire's GpuInfo strings are "" when unknown; store NULL, as for absent metrics.
    row.update({key: (info.get(key) or None) for key in _GPU_INFO_TEXT})
    memory_total_bytes = info.get("memory_total_bytes")
    row["memory_total_bytes"] = None if memory_total_bytes is None else int(memory_total_bytes)
    for key in _GPU_INFO_FLOAT:
        value = info.get(key)
        row[key] = None if value is None else float(value)
    return row


def _firing_alert_id(conn: Connection, fingerprint: str, *, for_update: bool = False) -> int | None:
    a = schema.alerts
    query = select(a.c.id).where(a.c.status == "firing", a.c.fingerprint == fingerprint)
    if for_update:
        query = query.with_for_update()  # PostgreSQL: two collectors resolve it once
    value = conn.execute(query).scalar()
    return None if value is None else int(value)


def _add_deliveries(conn: Connection, alert_id: int, transition: str, targets: Targets, now: float) -> None:
    # A target listed twice would be notified twice; keep the first of each.
    waits = targets if isinstance(targets, Mapping) else dict.fromkeys(targets, 0.0)
    rows = [
        {
            "alert_id": alert_id,
            "target": target,
            "transition": transition,
            "state": "pending",
            "attempts": 0,
            "next_attempt_at": now + wait,
            "last_error": None,
            "created_at": now,
            "sent_at": None,
        }
        for target, wait in waits.items()
    ]
    if rows:
        conn.execute(insert(schema.deliveries), rows)


def _not_blocked(d: Table, a: Table) -> ColumnElement[bool]:
    """No older pending delivery exists for the same target and alert fingerprint (`a` joined to `d`).

    By fingerprint, not alert id: a re-opened alert is a new row, and its 'firing' must not pass
    the previous alert's 'resolved' (or 'firing') that is still being retried.
    """
    older = d.alias("older")
    older_alert = a.alias("older_alert")
    return ~exists().where(
        older.c.target == d.c.target,
        older.c.state == "pending",
        older.c.id < d.c.id,
        older_alert.c.id == older.c.alert_id,
        older_alert.c.fingerprint == a.c.fingerprint,
    )


def _skipping(d: Table, skip_ids: Collection[int], skip_targets: Collection[str]) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if skip_ids:
        conditions.append(d.c.id.not_in(sorted(skip_ids)))
    if skip_targets:
        conditions.append(d.c.target.not_in(sorted(skip_targets)))
    return conditions


def _alert_select() -> Select:
    """Alerts with their GPU's uuid, pci_bus_id, serial and model (None for a node's or a job's
    alert, or a GPU never seen)."""
    a, g = schema.alerts, schema.gpus
    return select(a, g.c.uuid, g.c.pci_bus_id, g.c.serial, g.c.name.label("model")).select_from(
        a.outerjoin(g, and_(g.c.node == a.c.node, g.c.gpu == a.c.gpu))
    )


def _delivery_select() -> Select:
    d, a, g = schema.deliveries, schema.alerts, schema.gpus
    return select(
        d.c.id,
        d.c.alert_id,
        d.c.target,
        d.c.transition,
        d.c.state,
        d.c.attempts,
        d.c.next_attempt_at,
        d.c.last_error,
        d.c.created_at,
        *(a.c[name] for name in _ALERT_KEYS if name != "id" and name not in _BOARD_KEYS),
        g.c.uuid,
        g.c.pci_bus_id,
        g.c.serial,
        g.c.name.label("model"),
    ).select_from(d.join(a, a.c.id == d.c.alert_id).outerjoin(g, and_(g.c.node == a.c.node, g.c.gpu == a.c.gpu)))


def _silence_state(row: RowMapping, now: float) -> str:
    if row["ends_at"] <= now:
        return "expired"
    return "active" if row["starts_at"] <= now else "pending"


def silence_matches(silence: Mapping[str, Any], alert: Mapping[str, Any]) -> bool:
    """Whether `silence` covers `alert`: the same node, and its GPU and detector where it names them."""
    return (
        silence["node"] == alert.get("node")
        and (silence["gpu"] is None or silence["gpu"] == alert.get("gpu"))
        and (silence["detector"] is None or silence["detector"] == alert.get("detector"))
    )


def _of_node(query: Select, table: Table, node: str | None) -> Select:
    """`query` narrowed to one node's rows, when `node` is given."""
    return query if node is None else query.where(table.c.node == node)


def _evidence_with_board(finding: Finding) -> dict[str, Any]:
    """The finding's evidence, with the board's uuid and PCI bus id where the finding knows them."""
    evidence = dict(finding.evidence)
    for key in ("uuid", "pci_bus_id"):
        value = getattr(finding, key)
        if value is not None:
            evidence.setdefault(key, value)
    return evidence


def _parse_evidence(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {"value": value}


def _alert_dict(row: RowMapping) -> dict[str, Any]:
    alert = {key: row[key] for key in _ALERT_KEYS}
    alert["evidence"] = evidence = _parse_evidence(alert["evidence"])
    # A board the gpus table cannot name (a kernel-log XID whose index was unknown) keeps the
    # identity its finding had, saved in the evidence.
    for key in ("uuid", "pci_bus_id"):
        if alert[key] is None and isinstance(evidence.get(key), str):
            alert[key] = evidence[key]
    return alert
