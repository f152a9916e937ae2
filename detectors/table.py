"""Recent GPU samples as fleet-wide numpy ring buffers, and the read-only table detectors judge.

The store (`GpuStore`) keeps one row of float64 per sample, in the column order of
`fleetwatch.wire.GPU_FIELDS` (NaN: the field is absent from that sample), split by retention into
column groups: a field is kept at full resolution only as long as the detectors that read it
declare (`gpu_fields`), e.g. the error counters for 180 s, row remapping for 30 s, and fields no
detector reads for the newest few samples only. Every GPU has one slot in each group's array of
shape (slots, capacity, fields), written as a ring: sample number `i` of a slot (its logical index,
counted from the slot's first sample) sits at `i % capacity`, so a group with a smaller capacity
simply remembers fewer of the newest samples. A time ring (times and the sample's uuid, job and
rank, interned: 12 bytes a sample) covers the longest group or `times_seconds`. A ring that would
overwrite a sample its group still needs (a node sampling faster than the capacity assumed) grows,
up to `max_samples`.

Per-sample tests that detectors judge over time (`Condition`: "in thermal slowdown", "HW power
brake", "an error count moved") are evaluated once per sample, in bulk when a table is taken, and
only the times of the samples that pass are kept, per GPU for as long as the condition asks (10
minutes for the sustained rule) and fleet-wide as the newest such time: a healthy GPU keeps
nothing, the 10-minute rule never reads 600 full samples, and a detector sees from one number
that no GPU of the fleet needs a look. A sample whose tested fields read as in the sample before
it is not tested again (it passes where that one passed).

A `GpuTable` is what one Window hands the detectors: the GPUs with a sample at or before `now`,
their visible range of logical indexes, and vectorised reads across GPUs (`values`, `times`),
plus, per GPU, a `TableSeries`: a Sequence[GpuSample] of that GPU's samples (materialised on
access) with numpy accessors, for the per-GPU rules of the few GPUs a vectorised test picks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from fleetwatch.records import GpuSample
from fleetwatch.wire import GPU_FIELDS, INTEGER_FIELDS

FIELDS: tuple[str, ...] = GPU_FIELDS
COLUMN: dict[str, int] = {name: i for i, name in enumerate(FIELDS)}
# Integer fields come back as int (as the agent and the wire give them), the others as float.
_INTEGER_COLUMNS: frozenset[int] = frozenset(COLUMN[name] for name in FIELDS if name in INTEGER_FIELDS)

Key = tuple[str, int]
Ident = tuple[str | None, str | None, int | None]  # (uuid, job, rank)

_NO_IDENT: Ident = (None, None, None)
# Samples kept beyond a group's retention before a ring counts as full: sampling jitter (ours).
_CAPACITY_MARGIN = 8
# Capacity of the group of fields no detector reads: the newest samples, whole, for readers of a
# Window's GpuSample views.
_LATEST_SAMPLES = 4
_INITIAL_SLOTS = 16
# Samples a TableSeries materialises at once when iterated.
_CHUNK = 16


class Rows:
    """Named columns (1-D float arrays, NaN: absent) of a block of sample rows, for a Condition;
    `prior(name)` is the same field of each row's GPU's sample before it (NaN for its first).
    `whole` is (the rows, the rows before them) as (rows, len(FIELDS)) arrays where the store
    has them at hand, for tests over many fields at once."""

    __slots__ = ("_cache", "_column", "_prior", "whole")

    def __init__(
        self,
        column: Callable[[str], np.ndarray],
        prior: Callable[[str], np.ndarray],
        whole: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self._column = column
        self._prior = prior
        self._cache: dict[str, np.ndarray] = {}
        self.whole = whole

    def __getitem__(self, name: str) -> np.ndarray:
        return self._column(name)

    def prior(self, name: str) -> np.ndarray:
        return self._prior(name)

    def derived(self, name: str, compute: Callable[[Rows], np.ndarray]) -> np.ndarray:
        """compute(self), once for all the conditions tested on these rows (e.g. a bit mask)."""
        value = self._cache.get(name)
        if value is None:
            value = self._cache[name] = compute(self)
        return value


def _moves(rows: Rows) -> np.ndarray:
    assert rows.whole is not None
    now, before = rows.whole
    return (now != before) & ((now == now) | (before == before))


def changed(rows: Rows, names: Iterable[str]) -> np.ndarray:
    """Per row, whether any of `names` reads otherwise than in the GPU's sample before it (a field
    that appears or goes missing counts; one absent from both does not)."""
    if rows.whole is not None:  # every field at once, shared by the conditions of these rows
        moves = rows.derived("moves", _moves)
        return np.logical_or.reduce(moves[:, [COLUMN[name] for name in names]], axis=1)
    out = np.zeros(0, dtype=bool)
    for name in names:
        now, before = rows[name], rows.prior(name)
        moved = (now != before) & ((now == now) | (before == before))
        out = moved if not len(out) else out | moved
    return out


def _reasons_mask(rows: Rows) -> np.ndarray:
    return np.fmax(rows["clock_event_reasons"], 0.0).astype(np.int64)  # fmax: NaN -> 0


def reasons_mask(rows: Rows) -> np.ndarray:
    """clock_event_reasons as int64 (0 where absent), for bit tests in conditions."""
    return rows.derived("reasons_mask", _reasons_mask)


@dataclass(frozen=True, slots=True)
class Condition:
    """A test of one sample that a detector judges over time; the store keeps the times of the
    samples that pass it for `seconds` (0: only the newest such sample's, per GPU and fleet-wide,
    which lets a detector see at once that nothing in the fleet needs a look). `name` identifies
    it (include every parameter of `test`): detectors that share a condition share its record."""

    name: str
    fields: tuple[str, ...]  # every field `test` reads
    test: Callable[[Rows], np.ndarray]  # rows -> bool per row
    seconds: float
    # Whether `test` reads the samples before (Rows.prior); else a sample whose `fields` read as in
    # the one before passes where that one did, and is not tested again.
    uses_prior: bool = False


class RowMetrics(Mapping[str, float | int]):
    """One sample's metrics: a read-only mapping over a copy of its row; absent fields are missing."""

    __slots__ = ("_row",)

    def __init__(self, row: list[float]) -> None:
        self._row = row

    def __getitem__(self, name: str) -> float | int:
        column = COLUMN[name]
        value = self._row[column]
        if value != value:  # NaN: absent
            raise KeyError(name)
        return int(value) if column in _INTEGER_COLUMNS else value

    def get(self, name: str, default: Any = None) -> Any:
        column = COLUMN.get(name)
        if column is None:
            return default
        value = self._row[column]
        if value != value:
            return default
        return int(value) if column in _INTEGER_COLUMNS else value

    def __contains__(self, name: object) -> bool:
        column = COLUMN.get(name) if isinstance(name, str) else None
        return column is not None and self._row[column] == self._row[column]

    def __iter__(self) -> Iterator[str]:
        return (FIELDS[i] for i, value in enumerate(self._row) if value == value)

    def __len__(self) -> int:
        return sum(1 for value in self._row if value == value)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


def row_of(metrics: Mapping[str, Any]) -> np.ndarray:
    """A sample's metrics as a row in FIELDS order (NaN where absent; other names are not kept)."""
    row = np.full(len(FIELDS), np.nan)
    for name, value in metrics.items():
        column = COLUMN.get(name)
        if column is not None and value is not None:
            row[column] = value
    return row


class _Group:
    """Fields kept for the same time: values[slot, logical index % capacity, field]."""

    __slots__ = ("capacity", "columns", "fields", "position", "retention_seconds", "values")

    def __init__(self, fields: tuple[str, ...], retention_seconds: float, capacity: int, slots: int) -> None:
        self.fields = fields
        self.columns = np.array([COLUMN[name] for name in fields], dtype=np.intp)
        self.position = {name: i for i, name in enumerate(fields)}
        self.retention_seconds = retention_seconds
        self.capacity = capacity
        self.values = np.full((slots, capacity, len(fields)), np.nan)


class _Hits:
    """The samples that passed one condition, per slot: (time, logical index), oldest first."""

    __slots__ = ("by_slot", "condition", "index", "latest_t", "seconds")

    def __init__(self, condition: Condition, index: int, seconds: float) -> None:
        self.condition = condition
        self.index = index
        self.seconds = seconds  # how long hits are kept (0: none, only latest_t and last hits)
        self.by_slot: dict[int, list[tuple[float, int]]] = {}
        self.latest_t = -math.inf  # the newest time of a sample that passed, fleet-wide


class GpuStore:
    """Ring buffers of recent GPU samples, fleet-wide arrays (see the module docstring).

    `retention` maps a field to the seconds it must be kept at full resolution; fields not named
    are kept for `_LATEST_SAMPLES` samples, the samples themselves (times, identity) for the
    longest field or `times_seconds`. `interval_seconds` sizes the rings at first (they grow when a
    node samples faster). Conditions keep their hits for their `seconds`, at most
    `max_condition_seconds` (a buffer that keeps every field as long as it keeps the samples shows
    no more than those). Not thread-safe.
    """

    def __init__(
        self,
        retention: Mapping[str, float],
        conditions: Iterable[Condition] = (),
        *,
        max_samples: int = 10_000,
        interval_seconds: float = 1.0,
        times_seconds: float = 0.0,
        max_condition_seconds: float = math.inf,
    ) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self.max_samples = max_samples
        self._max_condition_seconds = max_condition_seconds
        self._interval_seconds = interval_seconds if interval_seconds > 0 else 1.0
        by_seconds: dict[float, list[str]] = {}
        for name in FIELDS:
            by_seconds.setdefault(float(retention.get(name, 0.0)), []).append(name)
        slots = _INITIAL_SLOTS
        self._groups = [
            _Group(tuple(names), seconds, self._capacity_for(seconds), slots)
            for seconds, names in sorted(by_seconds.items(), reverse=True)
        ]
        self._field_group: dict[str, tuple[_Group, int]] = {
            name: (group, i) for group in self._groups for i, name in enumerate(group.fields)
        }
        # The samples themselves (times, identity) for the longest group, or times_seconds.
        self.retention_seconds = max(max(group.retention_seconds for group in self._groups), times_seconds)
        self._limits: tuple[np.ndarray, np.ndarray] | None = None
        self._time_capacity = max(max(group.capacity for group in self._groups), self._capacity_for(times_seconds))
        self._t = np.zeros((slots, self._time_capacity))
        self._ident = np.zeros((slots, self._time_capacity), dtype=np.int32)
        self._n = np.zeros(slots, dtype=np.int64)  # next logical index per slot
        self._latest = np.full((slots, len(FIELDS)), np.nan)  # each slot's newest row, whole
        self._prior = np.full((slots, len(FIELDS)), np.nan)  # and the row before it
        self._first = np.zeros(slots, dtype=np.int64)  # oldest retained logical index
        self._keys: list[Key | None] = [None] * slots
        self._slot: dict[Key, int] = {}
        self._free: list[int] = list(range(slots - 1, -1, -1))
        self._idents: list[Ident] = [_NO_IDENT]
        self._ident_code: dict[Ident, int] = {_NO_IDENT: 0}
        # Jobs interned apart, for grouping GPUs by job with numpy: ident code -> job code (-1: none).
        self._jobs: list[str] = []
        self._job_code: dict[str, int] = {}
        self._ident_job: list[int] = [-1]
        self._ident_job_array = np.full(1, -1, dtype=np.int64)
        self._conditions: list[_Hits] = []
        self._condition_by_name: dict[str, _Hits] = {}
        self._cond_done = np.zeros(slots, dtype=np.int64)  # rows up to here have been tested
        self._last_hit = np.full((slots, 0), -1, dtype=np.int64)
        self._condition_capacity = self._time_capacity
        for condition in conditions:
            self.condition(condition)
        self.version = 0  # bumped whenever the set of slots changes

    def _capacity_for(self, seconds: float) -> int:
        if seconds <= 0:
            return min(_LATEST_SAMPLES, self.max_samples)
        if math.isinf(seconds):
            return self.max_samples
        wanted = math.ceil(seconds / self._interval_seconds) + _CAPACITY_MARGIN
        return max(1, min(wanted, self.max_samples))

    # --- slots -------------------------------------------------------------------------------------

    @property
    def keys(self) -> list[Key]:
        return list(self._slot)

    def __len__(self) -> int:
        return len(self._slot)

    def _grow_slots(self) -> None:
        old = len(self._keys)
        new = old * 2

        def grown(array: np.ndarray, fill: float) -> np.ndarray:
            out = np.full((new, *array.shape[1:]), fill, dtype=array.dtype)
            out[:old] = array
            return out

        for group in self._groups:
            group.values = grown(group.values, np.nan)
        self._t = grown(self._t, 0.0)
        self._ident = grown(self._ident, 0)
        self._n = grown(self._n, 0)
        self._latest = grown(self._latest, np.nan)
        self._prior = grown(self._prior, np.nan)
        self._first = grown(self._first, 0)
        self._cond_done = grown(self._cond_done, 0)
        self._last_hit = grown(self._last_hit, -1)
        self._keys.extend([None] * (new - old))
        self._free.extend(range(new - 1, old - 1, -1))

    def _slot_for(self, key: Key) -> int:
        slot = self._slot.get(key)
        if slot is None:
            if not self._free:
                self._grow_slots()
            slot = self._free.pop()
            self._slot[key] = slot
            self._keys[slot] = key
            self._n[slot] = self._first[slot] = self._cond_done[slot] = 0
            self._last_hit[slot] = -1
            self.version += 1
        return slot

    def _release(self, slot: int) -> None:
        key = self._keys[slot]
        if key is not None:
            del self._slot[key]
        self._keys[slot] = None
        self._latest[slot] = np.nan
        self._prior[slot] = np.nan
        self._n[slot] = self._first[slot] = self._cond_done[slot] = 0
        self._last_hit[slot] = -1
        for hits in self._conditions:
            hits.by_slot.pop(slot, None)
        self._free.append(slot)
        self.version += 1

    def forget(self, node: str) -> None:
        """Drops every GPU of `node`."""
        for key in [key for key in self._slot if key[0] == node]:
            self._release(self._slot[key])

    def intern(self, uuid: str | None, job: str | None, rank: int | None) -> int:
        ident = (uuid, job, rank)
        code = self._ident_code.get(ident)
        if code is None:
            if len(self._idents) >= 2**20:
                self._compact_idents()
            code = self._ident_code[ident] = len(self._idents)
            self._idents.append(ident)
            self._ident_job.append(-1 if job is None else self._job_code.setdefault(job, len(self._job_code)))
            if job is not None and len(self._jobs) < len(self._job_code):
                self._jobs.append(job)
        return code

    def job_codes(self, idents: np.ndarray) -> np.ndarray:
        """The job code (an index into `jobs`) of each ident code, -1 where there is no job."""
        if len(self._ident_job_array) != len(self._ident_job):
            self._ident_job_array = np.array(self._ident_job, dtype=np.int64)
        return self._ident_job_array[idents]

    @property
    def jobs(self) -> list[str]:
        return self._jobs

    def _compact_idents(self) -> None:
        """Forgets the idents no retained sample uses (jobs come and go for ever)."""
        used = {0}
        for slot in self._slot.values():
            lo, hi = int(self._first[slot]), int(self._n[slot])
            if hi > lo:
                used.update(np.unique(self._ident[slot, np.arange(lo, hi) % self._time_capacity]).tolist())
        kept = sorted(used)
        remap = np.zeros(len(self._idents), dtype=np.int32)
        remap[kept] = np.arange(len(kept), dtype=np.int32)
        self._ident = remap[self._ident]
        self._idents = [self._idents[code] for code in kept]
        self._ident_code = {ident: code for code, ident in enumerate(self._idents)}
        self._ident_job = [self._ident_job[code] for code in kept]

    def ident(self, code: int) -> Ident:
        return self._idents[code]

    # --- conditions ------------------------------------------------------------------------------

    def condition(self, condition: Condition) -> _Hits:
        """The record of `condition`, registered (and tested on what is still kept) on first use."""
        seconds = min(condition.seconds, self._max_condition_seconds)
        hits = self._condition_by_name.get(condition.name)
        if hits is not None:
            hits.seconds = max(hits.seconds, seconds)
            return hits
        self._flush()  # the others are tested up to now: the new one catches up on its own
        hits = _Hits(condition, len(self._conditions), seconds)
        self._conditions.append(hits)
        self._condition_by_name[condition.name] = hits
        self._last_hit = np.concatenate([self._last_hit, np.full((len(self._keys), 1), -1, dtype=np.int64)], axis=1)
        # Rows kept before the condition was known (a plain buffer judged by a new detector).
        slots = np.array(list(self._slot.values()), dtype=np.int64)
        if len(slots):
            n = self._n[slots]
            lo = np.maximum(self._first[slots], n - self._smallest_capacity(condition.fields))
            self._test([hits], slots, lo, n)
            self._cond_done[slots] = n
        self._condition_capacity = min(
            [self._smallest_capacity(h.condition.fields) for h in self._conditions], default=self._time_capacity
        )
        return hits

    def _smallest_capacity(self, fields: Iterable[str]) -> int:
        return min((self._field_group[name][0].capacity for name in fields), default=self._time_capacity)

    def _test(self, conditions: Sequence[_Hits], slots: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Tests rows [lo, hi) of each of `slots` against `conditions`, recording the hits."""
        counts = np.maximum(hi - lo, 0)
        total = int(counts.sum())
        if not total or not conditions:
            return
        newest_only = total == len(slots) and np.array_equal(hi, self._n[slots])
        priors: dict[str, np.ndarray] = {}
        if newest_only:  # one new sample per GPU, its newest (the common case): whole rows at hand
            rep_slots, idx = slots, hi - 1
            latest = self._latest[slots]
            prior_rows = self._prior[slots]
            first = idx - 1 < self._first[slots]
            whole: tuple[np.ndarray, np.ndarray] | None = (latest, prior_rows)
            if np.count_nonzero(first):  # the sample before is gone (or there was none)
                prior_rows[first] = np.nan
                whole = None  # then nothing can be carried over from the samples before
            latest_columns, prior_columns = latest.T, prior_rows.T

            def column(name: str) -> np.ndarray:
                return latest_columns[COLUMN[name]]

            def prior(name: str) -> np.ndarray:
                return prior_columns[COLUMN[name]]
        else:
            whole = None  # the rows and the ones before are read field by field
            rep_slots = np.repeat(slots, counts)
            starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
            idx = starts + np.arange(total)
            columns: dict[str, np.ndarray] = {}

            def column(name: str) -> np.ndarray:
                values = columns.get(name)
                if values is None:
                    values = columns[name] = self._gather(name, rep_slots, idx)
                return values

            def prior(name: str) -> np.ndarray:
                values = priors.get(name)
                if values is None:
                    before = idx - 1
                    values = self._gather(name, rep_slots, before)
                    first = before < self._first[rep_slots]
                    if np.count_nonzero(first):
                        values = np.where(first, np.nan, values)
                    priors[name] = values
                return values

        rows = Rows(column, prior, whole)
        times: np.ndarray | None = None
        moved: set[int] | None = None
        if whole is not None:  # the fields that moved anywhere since each GPU's sample before
            moved = set(np.logical_or.reduce(rows.derived("moves", _moves), axis=0).nonzero()[0].tolist())
        for hits in conditions:
            condition = hits.condition
            if moved is not None and moved.isdisjoint(COLUMN[name] for name in condition.fields):
                # Every sample reads these fields as the one before: no change to see, and the
                # samples pass where the ones before passed.
                if condition.uses_prior or hits.latest_t == -math.inf:
                    continue  # (no sample ever passed: nor do these)
                passed = self._last_hit[rep_slots, hits.index] == idx - 1
            else:
                passed = np.asarray(condition.test(rows), dtype=bool)
            if not np.count_nonzero(passed):
                continue
            if times is None:
                times = self._t[rep_slots, idx % self._time_capacity]
            where = passed.nonzero()[0]
            hit_slots, hit_idx, hit_t = rep_slots[where], idx[where], times[where]
            hits.latest_t = max(hits.latest_t, float(hit_t.max()))
            if hits.seconds > 0:
                for slot, i, t in zip(hit_slots.tolist(), hit_idx.tolist(), hit_t.tolist()):
                    listed = hits.by_slot.setdefault(slot, [])
                    if listed and listed[-1][1] >= i:  # tested again or out of order (a late insert)
                        if (t, i) not in listed:
                            listed.append((t, i))
                            listed.sort(key=lambda hit: hit[1])
                    else:
                        listed.append((t, i))
            np.maximum.at(self._last_hit[:, hits.index], hit_slots, hit_idx)

    def _flush(self, slots: np.ndarray | None = None) -> None:
        """Tests every row not yet tested (of `slots`, default all) against every condition."""
        if not self._conditions:
            return
        if slots is None:
            slots = np.array(list(self._slot.values()), dtype=np.int64)
        if not len(slots):
            return
        lo, hi = self._cond_done[slots], self._n[slots]
        self._test(self._conditions, slots, np.maximum(lo, self._first[slots]), hi)
        self._cond_done[slots] = hi

    # --- reading one slot's arrays ---------------------------------------------------------------

    @staticmethod
    def _ring_range(ring: np.ndarray, lo: int, end: int) -> np.ndarray:
        """Logical indexes [lo, end) of one slot's ring (at most its capacity of them), oldest
        first: one or two slices, no index arrays (a series is read whole, for hundreds of GPUs
        a pass)."""
        capacity = len(ring)
        start, count = lo % capacity, end - lo
        if start + count <= capacity:
            return ring[start : start + count].copy()
        return np.concatenate((ring[start:], ring[: start + count - capacity]))

    def _slot_times(self, slot: int, lo: int, end: int) -> np.ndarray:
        """The times of logical indexes [lo, end) of `slot`."""
        return self._ring_range(self._t[slot], lo, end)

    def _slot_values(self, name: str, slot: int, lo: int, end: int) -> np.ndarray:
        """Field `name` at logical indexes [lo, end) of `slot` (NaN where no longer kept)."""
        group, j = self._field_group[name]
        kept_from = int(self._n[slot]) - group.capacity
        if lo >= kept_from:
            return self._ring_range(group.values[slot, :, j], lo, end)
        values = np.full(max(end - lo, 0), np.nan)
        if end > kept_from:
            values[kept_from - lo :] = self._ring_range(group.values[slot, :, j], kept_from, end)
        return values

    def _gather(self, name: str, slots: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Field `name` at logical indexes `idx` of `slots` (NaN where the group no longer has it)."""
        group, j = self._field_group[name]
        values = group.values[slots, idx % group.capacity, j]
        old = idx < self._n[slots] - group.capacity
        if np.count_nonzero(old):
            values = np.where(old, np.nan, values)
        return values

    def _row(self, slot: int, i: int) -> list[float]:
        row = [math.nan] * len(FIELDS)
        n = int(self._n[slot])
        for group in self._groups:
            if i >= n - group.capacity:
                for column, value in zip(group.columns.tolist(), group.values[slot, i % group.capacity].tolist()):
                    row[column] = value
        return row

    # --- writing ---------------------------------------------------------------------------------

    def add(self, key: Key, t: float, row: np.ndarray, ident: int = 0) -> int:
        """Adds one sample (row in FIELDS order); returns how many samples were dropped (0 or 1):
        a full ring that cannot grow drops its oldest, and a late sample older than all it keeps."""
        slot = self._slot_for(key)
        n = int(self._n[slot])
        tc = self._time_capacity
        if n > self._first[slot] and t < self._t[slot, (n - 1) % tc]:
            return self._insert(slot, t, row, ident)
        dropped = self._make_room(slot, n, t)
        tc = self._time_capacity
        self._t[slot, n % tc] = t
        self._ident[slot, n % tc] = ident
        for group in self._groups:
            group.values[slot, n % group.capacity] = row[group.columns]
        self._prior[slot] = self._latest[slot]
        self._latest[slot] = row
        self._n[slot] = n + 1
        return dropped

    def add_rows(self, keys: Sequence[Key], t: float | np.ndarray, rows: np.ndarray, idents: Sequence[int]) -> int:
        """Adds one sample per key, all at time `t` or each at its own (t: one per key), rows of
        shape (len(keys), len(FIELDS)); returns how many samples were dropped."""
        count = len(keys)
        if count == 0:
            return 0

        def t_of(i: int) -> float:
            return float(t[i]) if isinstance(t, np.ndarray) else t

        if count < 2:
            return self.add(keys[0], t_of(0), rows[0], idents[0])
        slot_of = self._slot
        slot_list = [slot_of.get(key) for key in keys]
        if None in slot_list:
            slot_list = [self._slot_for(key) for key in keys]
        slots = np.array(slot_list, dtype=np.int64)
        if len(set(slot_list)) != count:  # the same GPU twice in one batch: one at a time
            return sum(self.add(key, t_of(i), rows[i], idents[i]) for i, key in enumerate(keys))
        n = self._n[slots]
        tc = self._time_capacity
        late = (n > self._first[slots]) & (t < self._t[slots, (n - 1) % tc])
        if late.any():
            dropped = 0
            for i in np.flatnonzero(late).tolist():
                dropped += self.add(keys[i], t_of(i), rows[i], idents[i])
            keep = np.flatnonzero(~late).tolist()
            kept_t = t[keep] if isinstance(t, np.ndarray) else t
            return dropped + self.add_rows([keys[i] for i in keep], kept_t, rows[keep], [idents[i] for i in keep])
        dropped = self._make_room_rows(slots, n, t)
        tc = self._time_capacity
        self._t[slots, n % tc] = t
        self._ident[slots, n % tc] = idents
        for group in self._groups:
            group.values[slots, n % group.capacity] = rows[:, group.columns]
        self._prior[slots] = self._latest[slots]
        self._latest[slots] = rows
        self._n[slots] = n + 1
        return dropped

    def _make_room(self, slot: int, n: int, t: float) -> int:
        """Before writing logical index n of `slot` at time t: grows a ring that would overwrite a
        sample it must keep, tests rows the overwrite would lose; returns samples dropped."""
        if self._conditions and n - self._cond_done[slot] >= self._condition_capacity:
            self._flush(np.array([slot], dtype=np.int64))
        first = int(self._first[slot])
        tc = self._time_capacity
        dropped = 0
        for group in self._groups:
            old = n - group.capacity
            if old < first:
                continue
            old_t = self._t[slot, old % tc]
            if t - old_t < group.retention_seconds and group.capacity < self.max_samples:
                self._grow_group(group)
                tc = self._time_capacity
        if n - first >= tc:
            old_t = self._t[slot, first % tc]
            if t - old_t < self.retention_seconds and tc < self.max_samples:
                self._grow_time(min(tc * 2, self.max_samples))
            else:  # the time ring is full: its oldest sample goes (the groups no longer keep it)
                self._first[slot] = first + 1
                if t - old_t < self.retention_seconds:
                    dropped = 1
        return dropped

    def _make_room_rows(self, slots: np.ndarray, n: np.ndarray, t: float | np.ndarray) -> int:
        if self._conditions:
            behind = n - self._cond_done[slots] >= self._condition_capacity
            if np.count_nonzero(behind):
                self._flush(slots[behind])
        first = self._first[slots]
        # Every group's overwritten sample at once (groups x slots): one it still keeps, too new
        # to lose, makes it grow (a node sampling faster than the rings were sized for).
        capacities, retentions = self._group_limits()
        old = n[None, :] - capacities[:, None]
        kept = old >= first[None, :]
        if np.count_nonzero(kept):
            old_t = self._t[slots[None, :], old % self._time_capacity]
            short = (kept & (t - old_t < retentions[:, None])).any(axis=1)
            for group, grow in zip(self._groups, short.tolist()):
                if grow and group.capacity < self.max_samples:
                    self._grow_group(group)
        tc = self._time_capacity
        full = n - first >= tc
        if not full.any():
            return 0
        full_slots = slots[full]
        old_t = self._t[full_slots, self._first[full_slots] % tc]
        needed = (t[full] if isinstance(t, np.ndarray) else t) - old_t < self.retention_seconds
        if needed.any() and tc < self.max_samples:
            self._grow_time(min(tc * 2, self.max_samples))
            return self._make_room_rows(slots, n, t)
        self._first[full_slots] += 1
        return int(np.count_nonzero(needed))

    def _group_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """The groups' capacities and retentions, as arrays (rebuilt when a group grows)."""
        limits = self._limits
        if limits is None:
            limits = self._limits = (
                np.array([group.capacity for group in self._groups], dtype=np.int64),
                np.array([group.retention_seconds for group in self._groups]),
            )
        return limits

    def _grow_group(self, group: _Group) -> None:
        capacity = min(max(group.capacity * 2, _CAPACITY_MARGIN), self.max_samples)
        if capacity <= group.capacity:
            return
        slots = len(self._keys)
        values = np.full((slots, capacity, len(group.fields)), np.nan)
        old = group.capacity
        idx = self._n[:, None] - old + np.arange(old)[None, :]  # every slot's kept indexes
        rows, cols = np.nonzero(idx >= 0)
        kept = idx[rows, cols]
        values[rows, kept % capacity] = group.values[rows, kept % old]
        group.values, group.capacity = values, capacity
        self._limits = None
        if capacity > self._time_capacity:
            self._grow_time(capacity)
        if self._conditions:
            self._condition_capacity = min(self._smallest_capacity(h.condition.fields) for h in self._conditions)

    def _grow_time(self, capacity: int) -> None:
        slots = len(self._keys)
        old = self._time_capacity
        t = np.zeros((slots, capacity))
        ident = np.zeros((slots, capacity), dtype=np.int32)
        idx = self._n[:, None] - old + np.arange(old)[None, :]
        rows, cols = np.nonzero(idx >= np.maximum(self._first, 0)[:, None])
        kept = idx[rows, cols]
        t[rows, kept % capacity] = self._t[rows, kept % old]
        ident[rows, kept % capacity] = self._ident[rows, kept % old]
        self._t, self._ident, self._time_capacity = t, ident, capacity

    def _insert(self, slot: int, t: float, row: np.ndarray, ident: int) -> int:
        """A late sample: inserted in time order, the newer ones moved up by one."""
        n = int(self._n[slot])
        first = int(self._first[slot])
        tc = self._time_capacity
        position = n
        while position > first and self._t[slot, (position - 1) % tc] > t:
            position -= 1
        dropped = 0
        if n - first >= tc:
            if t < self._t[slot, first % tc]:
                return 1  # older than everything kept and no room: it would be dropped first
            if position == first:
                return 1
            first += 1
            self._first[slot] = first
            dropped = 1

        def shift(array: np.ndarray, capacity: int, lo: int) -> None:
            moved = np.arange(max(position, lo), n, dtype=np.int64)
            if len(moved):
                array[slot, (moved + 1) % capacity] = array[slot, moved % capacity]

        shift(self._t, tc, first)
        shift(self._ident, tc, first)
        self._t[slot, position % tc] = t
        self._ident[slot, position % tc] = ident
        for group in self._groups:
            lo = n - group.capacity
            shift(group.values, group.capacity, lo)
            if position >= n + 1 - group.capacity:
                group.values[slot, position % group.capacity] = row[group.columns]
        self._n[slot] = n + 1
        # Conditions: hits after the insert move up; the new row is tested now if its
        # neighbours already were.
        done = int(self._cond_done[slot])
        for hits in self._conditions:
            listed = hits.by_slot.get(slot)
            if listed:
                hits.by_slot[slot] = [(ht, i + 1 if i >= position else i) for ht, i in listed]
        if position < done:
            # The new row, and the one after it (whose sample before it is now the new one).
            self._cond_done[slot] = done + 1
            self._test(
                self._conditions,
                np.array([slot], dtype=np.int64),
                np.array([position], dtype=np.int64),
                np.array([min(position + 2, done + 1)], dtype=np.int64),
            )
        for hits in self._conditions:
            listed = hits.by_slot.get(slot)
            self._last_hit[slot, hits.index] = listed[-1][1] if listed else -1
        return dropped

    # --- the table -------------------------------------------------------------------------------

    def table(self, now: float, *, prune: bool = True) -> GpuTable:
        """Prunes what is older than the retention (unless not `prune`) and returns the table of
        the GPUs with a sample at or before `now`. Valid until the store is next changed."""
        used = np.array(list(self._slot.values()), dtype=np.int64)
        self._flush(used)
        if len(used) and prune:
            self._prune(used, now - self.retention_seconds)
            for hits in self._conditions:
                if hits.by_slot:
                    oldest = now - hits.seconds
                    for slot, listed in list(hits.by_slot.items()):
                        if listed[0][0] < oldest:
                            kept = [hit for hit in listed if hit[0] >= oldest]
                            if kept:
                                hits.by_slot[slot] = kept
                            else:
                                del hits.by_slot[slot]
                                self._last_hit[slot, hits.index] = -1
            empty = used[self._first[used] >= self._n[used]]
            for slot in empty.tolist():
                if not any(slot in hits.by_slot for hits in self._conditions):
                    self._release(slot)
            if len(empty):
                used = np.array(list(self._slot.values()), dtype=np.int64)
        end = self._n[used].copy()
        if len(used):
            tc = self._time_capacity
            ahead = (end > self._first[used]) & (self._t[used, (end - 1) % tc] > now)
            while ahead.any():  # samples from a clock ahead of ours stay out of the table
                end[ahead] -= 1
                ahead &= end > self._first[used]
                ahead[ahead] = self._t[used[ahead], (end[ahead] - 1) % tc] > now
        visible = end > self._first[used]
        if not visible.all():
            used, end = used[visible], end[visible]
        return GpuTable(self, now, used, self._first[used].copy(), end)

    def _prune(self, slots: np.ndarray, oldest_t: float) -> None:
        tc = self._time_capacity
        first, n = self._first[slots], self._n[slots]
        old = (first < n) & (self._t[slots, first % tc] < oldest_t)
        # Taken every second, a window usually finds one sample per GPU to drop: step first.
        for _ in range(3):
            if not np.count_nonzero(old):
                self._first[slots] = first
                return
            first = first + old
            old &= (first < n) & (self._t[slots, first % tc] < oldest_t)
        self._first[slots] = first
        # Binary search per slot for the first sample at or after oldest_t.
        lo, hi = first.copy(), n.copy()
        lo[~old] = first[~old]
        hi[~old] = first[~old]
        while (lo < hi).any():
            mid = (lo + hi) // 2
            active = lo < hi
            before = active & (self._t[slots, mid % tc] < oldest_t)
            lo = np.where(before, mid + 1, lo)
            hi = np.where(active & ~before, mid, hi)
        self._first[slots] = np.where(old, lo, first)


class GpuTable:
    """The GPU samples of one Window: per GPU (position p, in `keys` order) the logical indexes
    [first[p], end[p]) with t <= now, oldest first. Reads go to the store's arrays: valid until
    the store is next changed, like the Window."""

    def __init__(self, store: GpuStore, now: float, slots: np.ndarray, first: np.ndarray, end: np.ndarray) -> None:
        self.store = store
        self.now = now
        self.slots = slots
        self.first = first
        self.end = end
        self._keys: list[Key] | None = None
        self._position: dict[Key, int] | None = None
        self._cache: dict[Any, Any] = {}  # reads every detector shares: computed once per table
        # Set by RecentData: its node states' gpu_last_seen hold every sample's time already.
        self.last_seen_in_states = False

    def __len__(self) -> int:
        return len(self.slots)

    # --- the whole fleet's newest and oldest readings, shared by the detectors -------------------

    @property
    def newest_t(self) -> np.ndarray:
        """Per GPU, the time of its newest sample."""
        cached = self._cache.get("newest_t")
        if cached is None:
            cached = self._cache["newest_t"] = self.times(self.end - 1)
        return cached

    def fresh(self, max_age_seconds: float) -> np.ndarray:
        """Per GPU, whether its newest sample is at most `max_age_seconds` old (an older one says
        nothing about now)."""
        key = ("fresh", max_age_seconds)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self.newest_t >= self.now - max_age_seconds
        return cached

    @property
    def newest_rows(self) -> np.ndarray:
        """Per GPU, its newest sample as a row in FIELDS order, shape (GPUs, len(FIELDS))."""
        cached = self._cache.get("newest_rows")
        if cached is None:
            store = self.store
            if np.array_equal(self.end, store._n[self.slots]):
                cached = store._latest[self.slots]  # the store keeps each GPU's newest row whole
            else:  # a sample from a clock ahead of ours is the newest kept, not the newest visible
                cached = self.rows(self.end - 1)
            self._cache["newest_rows"] = cached
        return cached

    def field_first(self, names: Iterable[str], positions: np.ndarray | None = None) -> np.ndarray:
        """Per GPU, the oldest logical index at which every field of `names` is still kept."""
        capacity = self.store._smallest_capacity(names)
        key = ("field_first", capacity)
        first = self._cache.get(key)
        if first is None:
            first = self._cache[key] = np.maximum(self.first, self.store._n[self.slots] - capacity)
        return first if positions is None else first[positions]

    def first_column(self, name: str, names: Iterable[str]) -> np.ndarray:
        """Per GPU, field `name` at the oldest sample that keeps every field of `names` (the first
        sample of `series(p, names)`)."""
        capacity = self.store._smallest_capacity(names)
        group, j = self.store._field_group[name]
        key = ("first_block", id(group), capacity)
        block = self._cache.get(key)
        if block is None:  # the group keeps name at least as long as `names`: no NaN for age here
            block = self._cache[key] = group.values[self.slots, self.field_first(names) % group.capacity]
        return block[:, j]

    def first_rows(self, names: Iterable[str]) -> np.ndarray:
        """Per GPU, the row of the oldest sample that still keeps every field of `names` (the
        first sample of `series(p, names)`); fields kept less long are NaN there."""
        capacity = self.store._smallest_capacity(names)
        key = ("first_rows", capacity)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self.rows(self.field_first(names))
        return cached

    def tail(self, count: int, max_age_seconds: float) -> tuple[np.ndarray, np.ndarray]:
        """Per GPU its newest `count` samples, newest first: (logical indexes, shape (GPUs, count);
        whether each is one, at most `max_age_seconds` old)."""
        key = ("tail", count, max_age_seconds)
        cached = self._cache.get(key)
        if cached is None:
            idx = self.end[:, None] - 1 - np.arange(count)[None, :]
            first = self.first[:, None]
            current = (idx >= first) & (self.times(np.maximum(idx, first)) >= self.now - max_age_seconds)
            cached = self._cache[key] = (np.maximum(idx, first), current)
        return cached

    def tail_values(self, name: str, count: int, max_age_seconds: float) -> np.ndarray:
        """Field `name` of each GPU's tail(count, max_age_seconds) samples; NaN where absent or
        not a current sample. One read of the field's group serves every field of it."""
        idx, current = self.tail(count, max_age_seconds)
        group, j = self.store._field_group[name]
        key = ("tail_block", id(group), count, max_age_seconds)
        block = self._cache.get(key)
        if block is None:
            block = group.values[self.slots[:, None], idx % group.capacity]  # (GPUs, count, fields)
            gone = ~current | (idx < self.store._n[self.slots][:, None] - group.capacity)
            if np.count_nonzero(gone):
                block[gone] = np.nan
            self._cache[key] = block
        return block[:, :, j]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Per GPU, its sample at logical index idx[p] as a row (NaN where a field is absent or
        no longer kept)."""
        store = self.store
        slots = self.slots
        n = store._n[slots]
        out = np.empty((len(slots), len(FIELDS)))
        for group in store._groups:
            block = group.values[slots, idx % group.capacity]
            gone = idx < n - group.capacity
            if gone.any():
                block[gone] = np.nan
            out[:, group.columns] = block
        return out

    @property
    def keys(self) -> list[Key]:
        if self._keys is None:
            names = self.store._keys
            self._keys = [key for key in (names[slot] for slot in self.slots.tolist()) if key is not None]
        return self._keys

    def position(self, key: Key) -> int | None:
        """The position of GPU `key` in this table, or None."""
        if self._position is None:
            self._position = {key: p for p, key in enumerate(self.keys)}
        return self._position.get(key)

    # --- vectorised reads (positions: an index array into keys, default all) ---------------------

    def _slots(self, positions: np.ndarray | None) -> np.ndarray:
        return self.slots if positions is None else self.slots[positions]

    def times(self, idx: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """The times of logical indexes `idx` (one per position, or broadcastable)."""
        slots = self._slots(positions)
        if idx.ndim == 2 and slots.ndim == 1:
            slots = slots[:, None]
        return self.store._t[slots, idx % self.store._time_capacity]

    def values(self, name: str, idx: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Field `name` at logical indexes `idx` (NaN: absent, or no longer kept)."""
        slots = self._slots(positions)
        if idx.ndim == 2 and slots.ndim == 1:
            slots = slots[:, None]  # numpy broadcasts index arrays
        return self.store._gather(name, slots, idx)

    def idents(self, idx: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Ident codes (uuid, job, rank: `store.ident(code)`) at logical indexes `idx`."""
        slots = self._slots(positions)
        return self.store._ident[slots, idx % self.store._time_capacity]

    def newest(self, max_age_seconds: float) -> tuple[np.ndarray, np.ndarray]:
        """(positions, newest index) of the GPUs whose newest sample is at most `max_age_seconds`
        old (an older one says nothing about now)."""
        idx = self.end - 1
        fresh = np.flatnonzero(self.times(idx) >= self.now - max_age_seconds)
        return fresh, idx[fresh]

    def latest_hit_t(self, condition: Condition) -> float:
        """The time of the newest sample of any GPU that passed `condition` (-inf: none); samples
        later than now included, so `latest_hit_t(c) < t` says no visible one after t passed."""
        return self.store.condition(condition).latest_t

    def last_hit(self, condition: Condition, positions: np.ndarray | None = None) -> np.ndarray:
        """Per GPU, the logical index of its newest visible sample that passed `condition`, -1 for none."""
        hits = self.store.condition(condition)
        slots = self._slots(positions)
        last = self.store._last_hit[slots, hits.index]
        end = self.end if positions is None else self.end[positions]
        ahead = np.flatnonzero(last >= end)
        for i in ahead.tolist():  # a hit from a clock ahead of ours: the newest visible one
            visible = [j for _, j in hits.by_slot.get(int(slots[i]), ()) if j < end[i]]
            last[i] = visible[-1] if visible else -1
        return last

    def hits(self, condition: Condition, p: int, since: float = -math.inf) -> list[tuple[float, int]]:
        """(time, logical index) of GPU p's visible samples after `since` that passed `condition`,
        oldest first."""
        listed = self.store.condition(condition).by_slot.get(int(self.slots[p]), ())
        end = int(self.end[p])
        return [hit for hit in listed if hit[1] < end and hit[0] > since]

    # --- one GPU ---------------------------------------------------------------------------------

    def series(self, p: int, fields: Iterable[str] = ()) -> TableSeries:
        """GPU p's samples (those that still keep every field of `fields`), oldest first."""
        lo = int(self.first[p])
        if fields:
            lo = max(lo, int(self.store._n[self.slots[p]]) - self.store._smallest_capacity(fields))
        return TableSeries(self, p, lo, int(self.end[p]))

    def sample(self, p: int, i: int) -> GpuSample:
        """GPU p's sample at logical index i, materialised (its fields as kept now)."""
        store = self.store
        slot = int(self.slots[p])
        node, gpu = self.keys[p]
        uuid, job, rank = store._idents[int(store._ident[slot, i % store._time_capacity])]
        return GpuSample(
            t=float(store._t[slot, i % store._time_capacity]),
            node=node,
            gpu=gpu,
            metrics=RowMetrics(store._row(slot, i)),
            uuid=uuid,
            job=job,
            rank=rank,
        )

    def samples(self, p: int, idx: Sequence[int]) -> list[GpuSample]:
        """GPU p's samples at logical indexes idx, materialised together (as sample() each)."""
        store = self.store
        slot = int(self.slots[p])
        at = np.asarray(idx, dtype=np.int64)
        n = int(store._n[slot])
        rows = np.full((len(at), len(FIELDS)), np.nan)
        for group in store._groups:
            kept = at >= n - group.capacity
            if np.count_nonzero(kept) == len(at):
                rows[:, group.columns] = group.values[slot, at % group.capacity]
            elif np.count_nonzero(kept):
                rows[np.ix_(kept, group.columns)] = group.values[slot, at[kept] % group.capacity]
        tc = store._time_capacity
        times, codes = store._t[slot, at % tc].tolist(), store._ident[slot, at % tc].tolist()
        node, gpu = self.keys[p]
        idents = store._idents
        out = []
        for t, row, code in zip(times, rows.tolist(), codes):
            uuid, job, rank = idents[code]
            out.append(GpuSample(t=t, node=node, gpu=gpu, metrics=RowMetrics(row), uuid=uuid, job=job, rank=rank))
        return out

    def ident(self, p: int, i: int) -> Ident:
        store = self.store
        return store._idents[int(store._ident[int(self.slots[p]), i % store._time_capacity])]


class TableSeries(Sequence[GpuSample]):
    """One GPU's samples in a GpuTable, oldest first: logical indexes [lo, end). Items are
    GpuSamples materialised on access; `t` and `column(name)` give numpy arrays, `times()` and
    `values(name)` Python lists (read once per series) for rules that walk a series."""

    __slots__ = ("_cache", "_table", "end", "lo", "p")

    def __init__(self, table: GpuTable, p: int, lo: int, end: int) -> None:
        self._table = table
        self.p = p
        self.lo = lo
        self.end = end
        self._cache: dict[str, list[Any]] = {}

    def times(self) -> list[float]:
        """The samples' times, oldest first."""
        cached = self._cache.get("")
        if cached is None:
            cached = self._cache[""] = self.t.tolist()
        return cached

    def values(self, name: str) -> list[float | None]:
        """Field `name` of each sample as a float, oldest first; None where absent."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        column = self.column(name)
        absent = np.count_nonzero(np.isnan(column))
        values: list[float | None]
        if not absent:  # the common cases first: a field read at every sample, or never
            values = column.tolist()
        elif absent == len(column):
            values = [None for _ in range(absent)]
        else:
            values = [None if v != v else v for v in column.tolist()]
        self._cache[name] = values
        return values

    def __len__(self) -> int:
        return max(self.end - self.lo, 0)

    @overload
    def __getitem__(self, index: int) -> GpuSample: ...
    @overload
    def __getitem__(self, index: slice) -> list[GpuSample]: ...

    def __getitem__(self, index: int | slice) -> GpuSample | list[GpuSample]:
        length = len(self)
        if isinstance(index, slice):
            picked = range(*index.indices(length))
            return self._table.samples(self.p, [self.lo + i for i in picked]) if len(picked) else []
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError("series index out of range")
        return self._table.sample(self.p, self.lo + index)

    def __iter__(self) -> Iterator[GpuSample]:
        for start in range(self.lo, self.end, _CHUNK):  # materialised a few at a time
            yield from self._table.samples(self.p, range(start, min(start + _CHUNK, self.end)))

    def __reversed__(self) -> Iterator[GpuSample]:
        # Newest first, a few at a time: readers that walk back usually stop early.
        for stop in range(self.end, self.lo, -_CHUNK):
            chunk = self._table.samples(self.p, range(max(stop - _CHUNK, self.lo), stop))
            yield from reversed(chunk)

    def __repr__(self) -> str:
        return f"TableSeries(len={len(self)})"

    @property
    def key(self) -> Key:
        return self._table.keys[self.p]

    @property
    def idx(self) -> np.ndarray:
        return np.arange(self.lo, self.end, dtype=np.int64)

    @property
    def t(self) -> np.ndarray:
        """The samples' times, oldest first."""
        if self.end <= self.lo:
            return np.empty(0)
        return self._table.store._slot_times(int(self._table.slots[self.p]), self.lo, self.end)

    def column(self, name: str) -> np.ndarray:
        """Field `name` of each sample, oldest first (NaN: absent)."""
        if self.end <= self.lo:
            return np.empty(0)
        return self._table.store._slot_values(name, int(self._table.slots[self.p]), self.lo, self.end)

    def value(self, i: int, name: str) -> float | None:
        """Field `name` of sample i (negative from the end) as a float; None when absent."""
        if i < 0:
            i += len(self)
        v = self._table.values(name, np.array([self.lo + i]), np.array([self.p]))[0]
        return None if v != v else float(v)


def table_of(samples: Mapping[Key, Sequence[GpuSample]], now: float) -> GpuTable:
    """A table over samples handed in directly (a Window built by hand, a test): every field kept,
    nothing pruned, samples later than `now` left out as a RecentData window leaves them."""
    longest = max((len(series) for series in samples.values()), default=1)
    store = GpuStore({name: math.inf for name in FIELDS}, max_samples=max(longest, 1))
    for key, series in samples.items():
        for sample in series:
            store.add(key, sample.t, row_of(sample.metrics), store.intern(sample.uuid, sample.job, sample.rank))
    return store.table(now, prune=False)


class StepTable:
    """A Window's steps as columns, row i being window.steps[i] (time order): t, seconds, and job,
    rank, step, node, gpu and dp (data-parallel replica) as integers (job and node as indexes into
    `jobs` and `nodes`, gpu and dp -1 where unknown). Detectors that read every rank's steps each
    second read these.

    A job code names a group of peers: a job, or one pipeline stage of a job whose steps carry
    `pp_stage` (ranks of different stages do different work). `jobs[code]` is the job's name,
    `stages[code]` the stage (None for a whole job)."""

    __slots__ = (
        "_step_span",
        "dp",
        "gpu",
        "job",
        "jobs",
        "node",
        "nodes",
        "origin",
        "rank",
        "seconds",
        "shared",
        "stages",
        "step",
        "steps",
        "t",
    )

    def __init__(
        self,
        columns: Mapping[str, np.ndarray],
        jobs: Sequence[str],
        nodes: Sequence[str],
        steps: Sequence[Any],
        origin: tuple[int, int] = (0, 0),
        stages: Sequence[int | None] = (),
        shared: dict[Any, Any] | None = None,
    ) -> None:
        self.t: np.ndarray = columns["t"]
        self.seconds: np.ndarray = columns["seconds"]
        self.job: np.ndarray = columns["job"]
        self.rank: np.ndarray = columns["rank"]
        self.step: np.ndarray = columns["step"]
        self.node: np.ndarray = columns["node"]
        self.gpu: np.ndarray = columns["gpu"]
        self.dp: np.ndarray = columns["dp"]  # the rank's data-parallel replica, -1 where unknown
        self.jobs = jobs
        self.stages = stages or [None] * len(jobs)
        self.nodes = nodes
        self.steps = steps
        # (which columns, absolute number of row 0): row r of tables of the same columns is the
        # same step as row r + origin[1] - other.origin[1] of the other (steps never move).
        self.origin = origin
        self.shared: dict[Any, Any] = {} if shared is None else shared
        self._step_span: int | None = None

    def __len__(self) -> int:
        return len(self.t)

    def codes_of(self, job: str | None) -> list[int]:
        """The codes of `job`: one, or one per pipeline stage where its steps carry pp_stage."""
        return [code for code, name in enumerate(self.jobs) if name == job]

    @property
    def step_span(self) -> int:
        """Larger than every step number: (job, step) as one integer, job * step_span + step."""
        if self._step_span is None:
            self._step_span = int(self.step.max()) + 1 if len(self.step) else 1
        return self._step_span


_STEP_GENERATIONS = itertools.count(1)

STEP_COLUMNS: dict[str, type] = {
    "t": np.float64,
    "seconds": np.float64,
    "job": np.int64,
    "rank": np.int64,
    "step": np.int64,
    "node": np.int64,
    "gpu": np.int64,
    "dp": np.int64,
}


class StepColumns:
    """Steps as growing numpy columns, kept in step with a time-ordered sequence of Steps (the
    owner appends, prunes from the left, or marks a change it cannot mirror for a rebuild)."""

    def __init__(self) -> None:
        self._columns: dict[str, np.ndarray] = {
            name: np.empty(1024, dtype=dtype) for name, dtype in STEP_COLUMNS.items()
        }
        self._start = 0  # rows before this were pruned
        self._end = 0
        self._dropped = 0  # rows pruned since the last rebuild: the absolute number of row _start
        self._generation = next(_STEP_GENERATIONS)  # unique in the process, new at each rebuild
        self._shared: dict[Any, Any] = {}  # StepTable.shared of its tables, emptied at each rebuild
        self._pending: list[Any] = []  # Steps appended since the last sync
        self._job_code: dict[tuple[str, int | None], int] = {}  # (job, pp_stage) -> code
        self._node_code: dict[str, int] = {}
        self.jobs: list[str] = []
        self.stages: list[int | None] = []
        self.nodes: list[str] = []
        self.dirty = False  # the sequence changed in a way not mirrored: rebuild from it

    def append(self, step: Any) -> None:
        self._pending.append(step)

    def popleft(self, count: int) -> None:
        self._flush()
        self._start += count
        self._dropped += count

    def _codes(self, steps: Sequence[Any]) -> dict[str, list[Any]]:
        jobs, nodes = self._job_code, self._node_code
        job_codes = []
        node_codes = []
        for s in steps:
            group = (s.job, s.pp_stage)
            code = jobs.get(group)
            if code is None:
                code = jobs[group] = len(self.jobs)
                self.jobs.append(s.job)
                self.stages.append(s.pp_stage)
            job_codes.append(code)
            code = nodes.get(s.node)
            if code is None:
                code = nodes[s.node] = len(self.nodes)
                self.nodes.append(s.node)
            node_codes.append(code)
        return {
            "t": [s.t for s in steps],
            "seconds": [s.seconds for s in steps],
            "job": job_codes,
            "rank": [s.rank for s in steps],
            "step": [s.step for s in steps],
            "node": node_codes,
            "gpu": [-1 if s.gpu is None else s.gpu for s in steps],
            "dp": [-1 if s.dp_rank is None else s.dp_rank for s in steps],
        }

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        count = len(pending)
        end = self._end + count
        capacity = len(self._columns["t"])
        if end > capacity:
            live = self._end - self._start
            size = max(1024, 2 * (live + count))
            for name, column in self._columns.items():
                grown = np.empty(size, dtype=column.dtype)
                grown[:live] = column[self._start : self._end]
                self._columns[name] = grown
            self._start, self._end = 0, live
            end = live + count
        for name, values in self._codes(pending).items():
            self._columns[name][self._end : end] = values
        self._end = end

    def rebuild(self, steps: Sequence[Any]) -> None:
        self._pending = list(steps)
        self._start = self._end = self._dropped = 0
        self._generation = next(_STEP_GENERATIONS)
        self._shared = {}
        self._job_code, self._node_code, self.jobs, self.stages, self.nodes = {}, {}, [], [], []
        self.dirty = False
        self._flush()

    def table(self, visible: int, steps: Sequence[Any]) -> StepTable:
        """The first `visible` rows, for a window whose steps are `steps` (the same rows)."""
        self._flush()
        lo = self._start
        return StepTable(
            {name: column[lo : lo + visible] for name, column in self._columns.items()},
            self.jobs,
            self.nodes,
            steps,
            (self._generation, self._dropped),
            self.stages,
            self._shared,
        )


def step_table_of(steps: Sequence[Any]) -> StepTable:
    """The table of steps handed in directly (a Window built by hand)."""
    columns = StepColumns()
    columns.rebuild(steps)
    return columns.table(len(steps), steps)
