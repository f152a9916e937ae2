"""Background storage work: batches into blocks, blocks into 1-minute rollups, old blocks out.

Each step reads and encodes outside any write transaction, then commits its change in one short
transaction that also removes what it replaced, so a collector killed at any moment leaves every
sample stored exactly once: in its batch row or in a block, never both, never neither. On
PostgreSQL a transaction-scoped advisory lock keeps two collectors sharing the database from
compacting the same rows; the loser of a race finds its rows gone, rolls back and moves on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from fleetwatch.collector.storage import schema
from fleetwatch.collector.storage.blocks import blocks_from_bodies
from fleetwatch.collector.storage.chunks import ROLLUP_SECONDS, Block, concat_blocks, decode_block, encode_block, rollup
from fleetwatch.collector.storage.partitions import drop_partitions_before, ensure_partitions
from fleetwatch.collector.storage.store import Store

log = logging.getLogger(__name__)

# s; a batch is compacted once it is this old: resends of recent batches meet their row's unique
# key, and a block then spans about this much time per node.
COMPACT_AFTER_SECONDS = 60.0
NODES_PER_TRANSACTION = 64  # a transaction's blocks: ~64 nodes x a minute, a few MB of bodies
ROLLUP_SPAN_SECONDS = 3600.0  # one rollup block per node, kind and hour, made once the hour is over
BLOCKS_PER_ROLLUP_PASS = 20_000
_IDS_PER_STATEMENT = 500  # bound parameters per IN list, well inside SQLite's limit
# PostgreSQL advisory lock key of compaction and rollups ("fwcompac" in ASCII).
_COMPACTION_LOCK_ID = 0x6677636F6D706163


class _Raced(Exception):
    """Another collector changed the rows this step read; its transaction is rolled back."""


@dataclass
class CompactionResult:
    batches: int = 0  # batch rows turned into blocks
    blocks: int = 0
    undecodable: int = 0  # batch bodies that could not be read (kept out of blocks, logged)


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _lock(conn: Connection) -> bool:
    """On PostgreSQL: whether this transaction got the compaction lock (another collector holds it)."""
    if conn.dialect.name != "postgresql":
        return True
    return bool(conn.execute(select(func.pg_try_advisory_xact_lock(_COMPACTION_LOCK_ID))).scalar())


def _delete_ids(conn: Connection, table: schema.Table, ids: Sequence[int], **where: object) -> int:
    deleted = 0
    for part in _chunks(sorted(ids), _IDS_PER_STATEMENT):
        statement = delete(table).where(table.c.id.in_(part))
        for column, value in where.items():
            statement = statement.where(table.c[column] == value)
        deleted += conn.execute(statement).rowcount
    return deleted


def _block_row(node: str, kind: str, block: Block, **extra: object) -> dict[str, object]:
    return {
        "node": node,
        "kind": kind,
        "t_start": float(block.t[0]),
        "t_end": float(block.t[-1]),
        "rows": len(block),
        "data": encode_block(block),
        **extra,
    }


def _runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted, distinct seqs: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def _add_ranges(conn: Connection, keys: dict[tuple[str, str], tuple[list[int], float]]) -> None:
    """Record compacted seqs per (node, boot_id) as runs, extending a run that ends just before."""
    r = schema.batch_ranges
    for (node, boot_id), (seqs, received_at) in keys.items():
        existing = {
            int(last): (row_id, float(seen))
            for row_id, last, seen in conn.execute(
                select(r.c.id, r.c.last_seq, r.c.last_received_at).where(r.c.node == node, r.c.boot_id == boot_id)
            )
        }
        for first, last in _runs(sorted(set(seqs))):
            before = existing.pop(first - 1, None)
            if before is not None:
                row_id, seen = before
                conn.execute(
                    update(r).where(r.c.id == row_id).values(last_seq=last, last_received_at=max(seen, received_at))
                )
                existing[last] = (row_id, max(seen, received_at))
            else:
                inserted = conn.execute(
                    insert(r).values(
                        node=node, boot_id=boot_id, first_seq=first, last_seq=last, last_received_at=received_at
                    )
                ).inserted_primary_key
                assert inserted is not None
                row_id = inserted[0]
                existing[last] = (row_id, received_at)


def compact(store: Store, now: float, *, after_seconds: float = COMPACT_AFTER_SECONDS) -> CompactionResult:
    """Turn every batch received before now - after_seconds into blocks, a group of nodes per transaction."""
    b = schema.batches
    cutoff = now - after_seconds
    result = CompactionResult()
    with store.reading("find batches to compact") as conn:
        nodes = [
            row[0]
            for row in conn.execute(
                select(b.c.node).where(b.c.body.is_not(None), b.c.received_at <= cutoff).distinct().order_by(b.c.node)
            )
        ]
    for group in _chunks(nodes, NODES_PER_TRANSACTION):
        try:
            _compact_nodes(store, group, cutoff, result)
        except _Raced:
            log.info("compaction: another collector compacted these batches first; skipped")
    return result


def _compact_nodes(store: Store, nodes: Sequence[str], cutoff: float, result: CompactionResult) -> None:
    b = schema.batches
    query = (
        select(b.c.id, b.c.node, b.c.boot_id, b.c.seq, b.c.received_at, b.c.body)
        .where(b.c.node.in_(bindparam("nodes", expanding=True)), b.c.body.is_not(None), b.c.received_at <= cutoff)
        .order_by(b.c.node, b.c.id)
    )
    with store.reading("read batches to compact") as conn:
        rows = conn.execute(query, {"nodes": list(nodes)}).all()
    by_node: dict[str, list[bytes]] = {}
    keys: dict[tuple[str, str], tuple[list[int], float]] = {}
    ids: list[int] = []
    undecodable = 0
    for row_id, node, boot_id, seq, received_at, body in rows:
        ids.append(row_id)
        seqs, seen = keys.get((node, boot_id), ([], received_at))
        seqs.append(int(seq))
        keys[(node, boot_id)] = (seqs, max(seen, received_at))
        by_node.setdefault(node, []).append(body)
    block_rows = []
    for node, bodies in by_node.items():
        try:
            blocks = blocks_from_bodies(node, bodies)
        except Exception:  # a body this version cannot parse: keep the rest, say which node
            log.exception("compaction: cannot decode a batch of node %s; its batches are dropped", node)
            undecodable += len(bodies)
            continue
        block_rows += [_block_row(node, kind, block, rolled_up=False) for kind, block in blocks.items()]
    with store.writing("compact batches") as conn:
        if not _lock(conn):
            return
        if _delete_ids(conn, b, ids) != len(ids):
            raise _Raced
        if block_rows:
            ensure_partitions(conn, "sample_blocks", [float(row["t_start"]) for row in block_rows])  # type: ignore[arg-type]
            conn.execute(insert(schema.sample_blocks), block_rows)
        _add_ranges(conn, keys)
    result.batches += len(ids)
    result.blocks += len(block_rows)
    result.undecodable += undecodable
    store.release_free_pages()


def roll_up(store: Store, now: float) -> int:
    """Roll up the blocks of every hour that is over into one rollup block per node, kind and hour.

    Returns the rollup blocks made. Late data for an hour already rolled up makes a second rollup
    block for that hour; readers merge them.
    """
    sb = schema.sample_blocks
    hour_over = math.floor(now / ROLLUP_SPAN_SECONDS) * ROLLUP_SPAN_SECONDS
    with store.reading("find blocks to roll up") as conn:
        rows = conn.execute(
            select(sb.c.id, sb.c.node, sb.c.kind, sb.c.t_start, sb.c.data)
            .where(sb.c.rolled_up.is_(False), sb.c.t_end < hour_over)
            .order_by(sb.c.node, sb.c.kind, sb.c.t_start)
            .limit(BLOCKS_PER_ROLLUP_PASS)
        ).all()
    groups: dict[tuple[str, str, float], list[tuple[int, bytes]]] = {}
    for row_id, node, kind, t_start, data in rows:
        hour = math.floor(t_start / ROLLUP_SPAN_SECONDS) * ROLLUP_SPAN_SECONDS
        groups.setdefault((node, kind, hour), []).append((row_id, data))
    made = 0
    for part in _chunks(list(groups.items()), NODES_PER_TRANSACTION):
        rollup_rows, ids = [], []
        for (node, kind, _hour), members in part:
            block = rollup(concat_blocks([decode_block(data) for _, data in members]), ROLLUP_SECONDS)
            ids += [row_id for row_id, _ in members]
            if len(block):
                row = _block_row(node, kind, block)
                row["t_end"] = float(block.t[-1]) + ROLLUP_SECONDS
                rollup_rows.append(row)
        try:
            with store.writing("roll up blocks") as conn:
                if not _lock(conn):
                    return made
                flagged = 0
                for chunk in _chunks(ids, _IDS_PER_STATEMENT):
                    flagged += conn.execute(
                        update(sb).where(sb.c.id.in_(chunk), sb.c.rolled_up.is_(False)).values(rolled_up=True)
                    ).rowcount
                if flagged != len(ids):
                    raise _Raced
                if rollup_rows:
                    ensure_partitions(conn, "rollup_blocks", [float(row["t_start"]) for row in rollup_rows])  # type: ignore[arg-type]
                    conn.execute(insert(schema.rollup_blocks), rollup_rows)
        except _Raced:
            log.info("rollup: another collector rolled these blocks up first; skipped")
            continue
        made += len(rollup_rows)
    return made


def expire(store: Store, now: float, raw_retention_seconds: float, rollup_retention_seconds: float) -> int:
    """Drop whole blocks past retention: rolled-up sample blocks, and rollup blocks. Returns blocks dropped.

    A sample block not rolled up yet stays until it is (roll_up runs first), so no minute is lost.
    """
    sb, rb = schema.sample_blocks, schema.rollup_blocks
    raw_cutoff, rollup_cutoff = now - raw_retention_seconds, now - rollup_retention_seconds
    with store.writing("expire blocks") as conn:
        dropped = 0
        if conn.dialect.name == "postgresql":
            # Whole partitions first: no row-by-row delete for a day that is entirely past.
            dropped += drop_partitions_before(conn, "sample_blocks", raw_cutoff, keep_if="NOT rolled_up")
            dropped += drop_partitions_before(conn, "rollup_blocks", rollup_cutoff)
        # What is left past retention shares a partition (or, on SQLite, the table) with newer
        # blocks: whole blocks go, found by the t_end index.
        dropped += conn.execute(delete(sb).where(sb.c.rolled_up.is_(True), sb.c.t_end < raw_cutoff)).rowcount
        dropped += conn.execute(delete(rb).where(rb.c.t_end < rollup_cutoff)).rowcount
    store.release_free_pages()
    return dropped
