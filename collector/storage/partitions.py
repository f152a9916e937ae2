"""PostgreSQL range partitions of the block tables: made ahead of the rows that need them, dropped whole.

sample_blocks has a partition per day of t_start, rollup_blocks one per 30 days; a partition is
named after its table and the Unix second it starts at (sample_blocks_p1765065600). Nothing here
runs on SQLite, where retention deletes whole block rows instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from sqlalchemy import Connection, text

SPAN_SECONDS = {"sample_blocks": 86400.0, "rollup_blocks": 30 * 86400.0}


def partition_start(table: str, t: float) -> int:
    span = SPAN_SECONDS[table]
    return int(math.floor(t / span) * span)


def ensure_partitions(conn: Connection, table: str, times: Iterable[float]) -> None:
    """Create the partitions that rows starting at `times` go to (PostgreSQL; a no-op elsewhere).

    Called in the inserting transaction, under the compaction lock, so two collectors never race
    to create the same one.
    """
    if conn.dialect.name != "postgresql":
        return
    span = int(SPAN_SECONDS[table])
    for start in sorted({partition_start(table, t) for t in times}):
        conn.execute(
            text(
                f'CREATE TABLE IF NOT EXISTS "{table}_p{start}" PARTITION OF "{table}" '
                f"FOR VALUES FROM ({start}) TO ({start + span})"
            )
        )


def partitions(conn: Connection, table: str) -> list[tuple[str, int, int]]:
    """(name, first second, end second) of each partition of `table` in the current schema."""
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = CAST(:table AS regclass)"
        ),
        {"table": table},
    ).scalars()
    span = int(SPAN_SECONDS[table])
    out = []
    for name in rows:
        suffix = name.rsplit("_p", 1)[-1]
        if suffix.isdigit():
            out.append((name, int(suffix), int(suffix) + span))
    return sorted(out, key=lambda p: p[1])


def drop_partitions_before(conn: Connection, table: str, cutoff: float, *, keep_if: str | None = None) -> int:
    """Drop each partition of `table` wholly before `cutoff` whose rows all have `t_end` < cutoff.

    `keep_if` is an SQL condition; a partition holding a row that meets it stays (e.g. a block not
    rolled up yet). Returns the rows the dropped partitions held.
    """
    dropped = 0
    for name, _, end in partitions(conn, table):
        if end > cutoff:
            continue
        condition = f"t_end >= {float(cutoff)!r}" + (f" OR ({keep_if})" if keep_if else "")
        if conn.execute(text(f'SELECT EXISTS (SELECT 1 FROM "{name}" WHERE {condition})')).scalar():
            continue
        dropped += int(conn.execute(text(f'SELECT count(*) FROM "{name}"')).scalar() or 0)
        conn.execute(text(f'DROP TABLE "{name}"'))
    return dropped
