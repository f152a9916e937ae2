"""One node's (or one GPU's) fields over a time range, from raw blocks or 1-minute rollups: GET /api/v1/series."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from fleetwatch.collector.storage import schema
from fleetwatch.collector.storage.blocks import FIELD_NUMBERS, series_columns
from fleetwatch.collector.storage.chunks import (
    COUNT,
    MAX,
    MEAN,
    MIN,
    RAW,
    ROLLUP_SECONDS,
    Block,
    concat_blocks,
    decode_block,
    rollup,
)
from fleetwatch.collector.storage.store import Store

MAX_POINTS = 20_000  # per series in one answer: a longer range needs a coarser step


class SeriesQueryError(ValueError):
    """A query that cannot be answered as asked; the message names the parameter."""

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter}: {problem}")
        self.parameter = parameter


@dataclass(frozen=True)
class SeriesQuery:
    node: str
    gpu: int | None  # None: the node's host series
    fields: Sequence[str]  # empty: every field with data
    start: float
    end: float
    step: float | None  # None: raw samples where the range allows, else ROLLUP_SECONDS

    @property
    def kind(self) -> str:
        return "host" if self.gpu is None else "gpu"

    def check(self) -> None:
        if not math.isfinite(self.start) or not math.isfinite(self.end) or self.end < self.start:
            raise SeriesQueryError("start", "must be a time at or before end")
        if self.step is not None and (not math.isfinite(self.step) or self.step <= 0):
            raise SeriesQueryError("step", "must be a positive number of seconds")
        known = FIELD_NUMBERS[self.kind]
        unknown = [name for name in self.fields if name not in known]
        if unknown:
            raise SeriesQueryError("field", f"{', '.join(unknown)} is not a {self.kind} field")


def read_series(store: Store, query: SeriesQuery, now: float, raw_retention_seconds: float) -> dict[str, Any]:
    """The answer of GET /api/v1/series: points per field, raw or as step buckets (mean, min, max)."""
    query.check()
    step = query.step
    raw_reaches = now - raw_retention_seconds
    use_rollups = (step is not None and step >= ROLLUP_SECONDS) or query.start < raw_reaches
    if use_rollups and step is None:
        step = ROLLUP_SECONDS
    if step is not None and (query.end - query.start) / step > MAX_POINTS:
        raise SeriesQueryError("step", f"too fine for this range: at most {MAX_POINTS} points a series")
    slot = 0 if query.gpu is None else query.gpu
    wanted = series_columns(query.kind, slot, query.fields or None)
    if use_rollups:
        assert step is not None
        block = _rollup_block(store, query, wanted)
        block = rollup(block, step) if len(block) else block
        source = "rollup"
    else:
        block = _raw_block(store, query, wanted)
        if step is not None and len(block):
            block = rollup(block, step)
        source = "raw"
    series: list[dict[str, Any]] = []
    for cid, name in wanted.items():
        if step is None:
            points = block.column(cid + RAW) if len(block) else None
            if points is None or not len(points[0]):
                if query.fields:
                    series.append({"field": name, "points": []})
                continue
            times, values = points
            series.append({"field": name, "points": _points(times, values)})
            continue
        mean = block.column(cid + MEAN) if len(block) else None
        if mean is None or not len(mean[0]):
            if query.fields:
                series.append({"field": name, "points": []})
            continue
        mins, maxs = block.column(cid + MIN), block.column(cid + MAX)
        entry: dict[str, Any] = {"field": name, "points": _points(*mean)}
        if mins is not None and maxs is not None:
            entry["min"] = mins[1].tolist()
            entry["max"] = maxs[1].tolist()
        series.append(entry)
    return {
        "node": query.node,
        "gpu": query.gpu,
        "start": query.start,
        "end": query.end,
        "step": step,
        "source": source,
        "series": series,
    }


def _points(times: np.ndarray, values: np.ndarray) -> list[list[float]]:
    return [[t, v] for t, v in zip(times.tolist(), values.tolist())]


def _in_range(block: Block, start: float, end: float) -> Block:
    keep = (block.t >= start) & (block.t <= end)
    return Block(block.t[keep], block.ids, block.values[keep], block.present[keep], block.text)


def _columns(block: Block, wanted: set[int]) -> Block:
    base = block.ids - block.ids % 8
    return block.select(np.isin(base, list(wanted)))


def _raw_block(store: Store, query: SeriesQuery, wanted: dict[int, str], *, rolled_up: bool | None = None) -> Block:
    parts = [
        _columns(_in_range(block, query.start, query.end), set(wanted))
        for _, block in store.blocks(query.kind, query.start, query.end, node=query.node, rolled_up=rolled_up)
    ]
    return concat_blocks(parts)


def _rollup_block(store: Store, query: SeriesQuery, wanted: dict[int, str]) -> Block:
    """1-minute rollups of the range: stored ones, and those of raw blocks not rolled up yet."""
    rb = schema.rollup_blocks
    with store.reading("read rollups") as conn:
        rows = conn.execute(
            select(rb.c.data)
            .where(rb.c.node == query.node, rb.c.kind == query.kind, rb.c.t_end >= query.start)
            .where(rb.c.t_start <= query.end)
            .order_by(rb.c.t_start, rb.c.id)
        ).all()
    start = math.floor(query.start / ROLLUP_SECONDS) * ROLLUP_SECONDS
    stored = [_columns(_in_range(decode_block(data), start, query.end), set(wanted)) for (data,) in rows]
    fresh = _raw_block(store, query, wanted, rolled_up=False)
    parts = [*stored, rollup(fresh, ROLLUP_SECONDS)] if len(fresh) else stored
    return concat_blocks([p for p in parts if len(p) and (p.ids % 8 == COUNT).any()])
