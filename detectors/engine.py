"""The detection engine shared by the live collector and offline replay: data in, findings out."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, TypeVar, overload

import numpy as np

from fleetwatch.detectors.fold import StragglerFolding
from fleetwatch.detectors.model import Detector, NodeState, Window
from fleetwatch.detectors.table import (
    FIELDS,
    Condition,
    GpuStore,
    GpuTable,
    Key,
    RowMetrics,
    StepColumns,
    TableSeries,
    row_of,
)
from fleetwatch.records import Event, Finding, GpuSample, HostSample, IbSample, Step

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_EVENT_RETENTION_SECONDS = 86400.0  # s; the longest XID / GPU-lost hold (detectors/xid.py)
DEFAULT_MAX_SAMPLES_PER_SERIES = 10_000  # samples; 2.7 h at 1 s, far beyond any sample window
DEFAULT_MAX_EVENTS = 100_000  # events; an XID storm must not grow memory without bound
DEFAULT_MAX_STEPS = 1_000_000  # step reports; e.g. 1,000 ranks x 1,000 steps
DEFAULT_SAMPLING_INTERVAL_SECONDS = 1.0  # s; assumed until a node states its own (as replay does)


class SeriesView(Sequence[T]):
    """A read-only, oldest-first view of the first `length` items of a deque; no copy.

    Valid until the RecentData it came from is next changed (add_*, note_node, window): those may
    drop items from the left. Indexing and slicing near either end are cheap.
    """

    __slots__ = ("_items", "_length")

    def __init__(self, items: deque[T], length: int | None = None) -> None:
        self._items = items
        self._length = len(items) if length is None else length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            start, stop, stride = index.indices(self._length)
            if stride != 1:
                return [self[i] for i in range(start, stop, stride)]
            if stop <= start:
                return []
            if start >= self._length // 2:
                # Tail slices (the common `series[-3:]`) walk in from the right end.
                end = len(self._items)  # items past self._length are hidden, newer than now
                picked = list(itertools.islice(reversed(self._items), end - stop, end - start))
                picked.reverse()
                return picked
            return list(itertools.islice(self._items, start, stop))
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("series index out of range")
        return self._items[index]

    def __iter__(self) -> Iterator[T]:
        return itertools.islice(self._items, self._length)

    def __reversed__(self) -> Iterator[T]:
        return itertools.islice(reversed(self._items), len(self._items) - self._length, None)

    def __repr__(self) -> str:
        return f"SeriesView(len={self._length})"


def _insert_in_time_order(items: deque[Any], item: Any) -> bool:
    """Appends `item` keeping `items` sorted by t; returns False when it was dropped (full, oldest).

    Data normally arrives in time order (an append); late data (a spool replay after an outage)
    is inserted from the right, where it usually belongs.
    """
    if not items or items[-1].t <= item.t:
        items.append(item)  # a full deque with maxlen drops its oldest item
        return True
    if items.maxlen is not None and len(items) == items.maxlen:
        if item.t < items[0].t:
            return False  # older than everything we keep and no room: it would be dropped first
        items.popleft()
    position = len(items)
    for existing in reversed(items):
        if existing.t <= item.t:
            break
        position -= 1
    items.insert(position, item)
    return True


def _prune(items: deque[Any], oldest_t: float) -> None:
    while items and items[0].t < oldest_t:
        items.popleft()


def _visible_length(items: deque[Any], now: float) -> int:
    """How many items are at or before `now` (items from a clock ahead of ours stay hidden)."""
    length = len(items)
    while length and items[length - 1].t > now:
        length -= 1
    return length


@dataclass(frozen=True, slots=True, eq=False)
class GpuRows:
    """GPU samples of one node taken at one time, as rows (RecentData.add_gpu_rows' arguments):
    the batch form of GpuSample, for replay and the simulator."""

    t: float
    node: str
    gpus: Sequence[int]
    values: np.ndarray  # shape (len(gpus), len(GPU_FIELDS)), float64, NaN: absent
    uuids: Sequence[str | None]
    jobs: Sequence[str | None]
    ranks: Sequence[int | None]

    def samples(self) -> list[GpuSample]:
        """The same samples as GpuSamples (integer fields as int, the others as float)."""
        rows = self.values.tolist()
        return [
            GpuSample(
                t=self.t,
                node=self.node,
                gpu=int(gpu),
                metrics=dict(RowMetrics(row).items()),
                uuid=uuid,
                job=job,
                rank=rank,
            )
            for gpu, row, uuid, job, rank in zip(self.gpus, rows, self.uuids, self.jobs, self.ranks)
        ]


class GpuSeriesMap(Mapping[Key, Sequence[GpuSample]]):
    """A Window's `gpu`: (node, gpu) -> that GPU's samples, read from the table (TableSeries,
    GpuSamples materialised on access). Valid until the RecentData is next changed."""

    __slots__ = ("_table",)

    def __init__(self, table: GpuTable) -> None:
        self._table = table

    def __getitem__(self, key: Key) -> TableSeries:
        position = self._table.position(key)
        if position is None:
            raise KeyError(key)
        return self._table.series(position)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and self._table.position(key) is not None

    def __iter__(self) -> Iterator[Key]:
        return iter(self._table.keys)

    def __len__(self) -> int:
        return len(self._table)


class _NodeRecord:
    __slots__ = (
        "_gpu_last_seen_view",
        "_ib_last_active_view",
        "_state",
        "boot_id",
        "boot_last_t",
        "boot_seen_at",
        "gpu_count",
        "gpu_last_seen",
        "ib_last_active",
        "last_seen",
        "node",
        "sampling_interval_seconds",
    )

    def __init__(self, node: str, sampling_interval_seconds: float) -> None:
        self.node = node
        self.last_seen: float | None = None
        self.sampling_interval_seconds = sampling_interval_seconds
        self.gpu_count: int | None = None
        self.boot_id: str | None = None
        self.boot_seen_at: float | None = None
        self.boot_last_t: float | None = None  # newest time that carried the current boot_id
        # GPU index -> newest sample time; outlives the samples (pruned by retention) so that a
        # GPU that stopped reporting is still known to have existed. At most one entry per GPU.
        self.gpu_last_seen: dict[int, float] = {}
        self._gpu_last_seen_view = MappingProxyType(self.gpu_last_seen)
        # (device, port) -> newest time the port was ACTIVE; outlives the samples likewise.
        self.ib_last_active: dict[tuple[str, int], float] = {}
        self._ib_last_active_view = MappingProxyType(self.ib_last_active)
        self._state: NodeState | None = None

    def seen(self, t: float) -> None:
        if self.last_seen is None or t > self.last_seen:
            self.last_seen = t
            self._state = None

    def gpus_seen(self, gpus: Iterable[int], t: float) -> None:
        """A batch of samples of `gpus`, all taken at `t`: seen() and gpu_seen() of each."""
        if self.last_seen is not None and t >= self.last_seen:
            # Newer than anything of this node: no GPU's time goes backwards.
            self.gpu_last_seen.update(dict.fromkeys(map(int, gpus), t))
            if t > self.last_seen:
                self.seen(t)
            return
        self.seen(t)
        for gpu in gpus:
            self.gpu_seen(int(gpu), t)

    def gpu_seen(self, gpu: int, t: float) -> None:
        # The NodeState holds a live read-only view of this dict: no rebuild needed.
        previous = self.gpu_last_seen.get(gpu)
        if previous is None or t > previous:
            self.gpu_last_seen[gpu] = t

    def ib_seen(self, s: IbSample) -> None:
        if s.active:
            key = (s.device, s.port)
            previous = self.ib_last_active.get(key)
            if previous is None or s.t > previous:
                self.ib_last_active[key] = s.t

    def state(self) -> NodeState:
        # Rebuilt only after a change: most nodes change once per sampling interval, not per call.
        if self._state is None:
            self._state = NodeState(
                node=self.node,
                last_seen=self.last_seen,
                sampling_interval_seconds=self.sampling_interval_seconds,
                gpu_count=self.gpu_count,
                boot_id=self.boot_id,
                boot_seen_at=self.boot_seen_at,
                gpu_last_seen=self._gpu_last_seen_view,
                ib_last_active=self._ib_last_active_view,
            )
        return self._state


class RecentData:
    """A bounded buffer of recent samples, events and steps that hands out Windows without copying.

    GPU samples live in numpy ring buffers (detectors.table.GpuStore): each field for as long as
    `gpu_retention` says (RecentData.for_detectors: as long as the detectors that read it need;
    default: every field for `retention_seconds`), the samples themselves for the longest of those
    or `gpu_times_seconds`, and per-sample conditions (`gpu_conditions`) as the times of the
    samples that pass them. Host and InfiniBand samples are kept for `retention_seconds`, steps
    for `step_retention_seconds` (default the same), events for `event_retention_seconds`, each
    at most `max_steps` / `max_events`; each series holds at most
    `max_samples_per_series`. Not thread-safe: feed it and take windows from one thread or event
    loop.
    """

    def __init__(
        self,
        retention_seconds: float,
        event_retention_seconds: float = DEFAULT_EVENT_RETENTION_SECONDS,
        max_samples_per_series: int = DEFAULT_MAX_SAMPLES_PER_SERIES,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_steps: int = DEFAULT_MAX_STEPS,
        default_sampling_interval_seconds: float = DEFAULT_SAMPLING_INTERVAL_SECONDS,
        gpu_retention: Mapping[str, float] | None = None,
        gpu_times_seconds: float = 0.0,
        gpu_conditions: Iterable[Condition] = (),
        step_retention_seconds: float | None = None,
    ) -> None:
        if retention_seconds < 0 or event_retention_seconds < 0:
            raise ValueError("retention must not be negative")
        if step_retention_seconds is not None and step_retention_seconds < retention_seconds:
            raise ValueError("step_retention_seconds must not be shorter than retention_seconds")
        if max_samples_per_series < 1 or max_events < 1 or max_steps < 1:
            raise ValueError("buffer limits must be at least 1")
        self.retention_seconds = float(retention_seconds)
        self.event_retention_seconds = float(event_retention_seconds)
        self.step_retention_seconds = (
            self.retention_seconds if step_retention_seconds is None else float(step_retention_seconds)
        )
        self.max_samples_per_series = max_samples_per_series
        self.default_sampling_interval_seconds = default_sampling_interval_seconds
        plain = gpu_retention is None
        if gpu_retention is None:
            gpu_retention = dict.fromkeys(FIELDS, self.retention_seconds)
        self._gpus = GpuStore(
            gpu_retention,
            gpu_conditions,
            max_samples=max_samples_per_series,
            interval_seconds=default_sampling_interval_seconds,
            times_seconds=gpu_times_seconds,
            # Every field for retention_seconds: a condition sees that far back, as the samples do.
            max_condition_seconds=self.retention_seconds if plain else math.inf,
        )
        self._host: dict[str, deque[HostSample]] = {}
        self._ib: dict[tuple[str, str, int], deque[IbSample]] = {}
        self._events: deque[Event] = deque(maxlen=max_events)
        self._steps: deque[Step] = deque(maxlen=max_steps)
        self._max_steps = max_steps
        self._step_columns = StepColumns()  # the same steps as numpy columns, for the detectors
        self._nodes: dict[str, _NodeRecord] = {}
        # What hit a bound, by kind ("gpu", "host", "ib", "event", "step"): exported as a metric.
        self.dropped: dict[str, int] = {"gpu": 0, "host": 0, "ib": 0, "event": 0, "step": 0}
        # node -> its last GpuRows' (gpus, uuids, jobs, ranks) lists and their keys and ident codes
        self._batch_cache: dict[str, tuple[Any, Any, Any, Any, list[Key], list[int]]] = {}

    @classmethod
    def for_detectors(cls, detectors: Iterable[Detector], **kwargs: Any) -> RecentData:
        """A buffer that keeps as much as `detectors` need: each GPU field for as long as the
        detectors that read it say (`gpu_fields`; a detector that does not say needs every field
        for its window), their per-sample conditions (`gpu_conditions`), max window_seconds of
        everything else, events for at least the longest `event_window_seconds` and steps for the
        longest `step_window_seconds` a detector declares."""
        detectors = list(detectors)
        retention_seconds = max((float(d.window_seconds) for d in detectors), default=0.0)
        kwargs.setdefault(
            "step_retention_seconds",
            max([retention_seconds] + [float(getattr(d, "step_window_seconds", 0.0)) for d in detectors]),
        )
        event_retention_seconds = max(
            [kwargs.pop("event_retention_seconds", DEFAULT_EVENT_RETENTION_SECONDS)]
            + [float(getattr(d, "event_window_seconds", 0.0)) for d in detectors]
        )
        fields: dict[str, float] = {}
        times_seconds = 0.0
        conditions: list[Condition] = []
        for d in detectors:
            gpu_seconds = float(getattr(d, "gpu_window_seconds", d.window_seconds))
            times_seconds = max(times_seconds, gpu_seconds)
            declared: Mapping[str, float] | None = getattr(d, "gpu_fields", None)
            if declared is None:
                declared = dict.fromkeys(FIELDS, gpu_seconds)
            for name, seconds in declared.items():
                fields[name] = max(fields.get(name, 0.0), float(seconds))
            conditions.extend(getattr(d, "gpu_conditions", ()))
        kwargs.setdefault("gpu_retention", fields)
        # The samples themselves (time, uuid, job, rank: 12 bytes each) for the whole window, as
        # everything else: a GPU that stopped reporting keeps its identity in the window.
        kwargs.setdefault("gpu_times_seconds", max(times_seconds, retention_seconds))
        kwargs.setdefault("gpu_conditions", conditions)
        return cls(retention_seconds, event_retention_seconds, **kwargs)

    # --- feeding ---------------------------------------------------------------------------------

    def _node(self, node: str) -> _NodeRecord:
        record = self._nodes.get(node)
        if record is None:
            record = self._nodes[node] = _NodeRecord(node, self.default_sampling_interval_seconds)
        return record

    def _add(self, kind: str, items: deque[Any], item: Any) -> None:
        full = items.maxlen is not None and len(items) == items.maxlen
        if not _insert_in_time_order(items, item) or full:
            self.dropped[kind] += 1

    def add_gpu(self, s: GpuSample) -> None:
        store = self._gpus
        self.dropped["gpu"] += store.add((s.node, s.gpu), s.t, row_of(s.metrics), store.intern(s.uuid, s.job, s.rank))
        record = self._node(s.node)
        record.seen(s.t)
        record.gpu_seen(s.gpu, s.t)

    def add_gpu_rows(
        self,
        node: str,
        t: float,
        gpus: Sequence[int],
        values: np.ndarray,
        uuids: Sequence[str | None],
        jobs: Sequence[str | None],
        ranks: Sequence[int | None],
    ) -> None:
        """One decoded batch of GPU samples of `node`, all taken at `t`, without GpuSamples.

        Row i is GPU `gpus[i]`: `values[i]` holds its fields in the column order of
        `fleetwatch.wire.GPU_FIELDS` (values has shape (len(gpus), len(GPU_FIELDS)), float64),
        NaN where the sample does not carry the field (absent, never 0); integer fields are whole
        numbers (exact up to 2**53). `uuids[i]`, `jobs[i]` and `ranks[i]` are the GPU's identity
        and attribution as GpuSample has them (None where unknown). The same as add_gpu() of the
        equivalent GpuSamples, one call per batch; `values` is copied, the caller may reuse it.
        """
        count = len(gpus)
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (count, len(FIELDS)):
            raise ValueError(f"values must have shape ({count}, {len(FIELDS)}), got {array.shape}")
        if not len(uuids) == len(jobs) == len(ranks) == count:
            raise ValueError("gpus, uuids, jobs and ranks must have one entry per row")
        if not count:
            return
        store = self._gpus
        intern = store.intern
        keys = [(node, int(gpu)) for gpu in gpus]
        idents = [intern(uuid, job, rank) for uuid, job, rank in zip(uuids, jobs, ranks)]
        self.dropped["gpu"] += store.add_rows(keys, float(t), array, idents)
        self._node(node).gpus_seen([gpu for _, gpu in keys], t)

    def add_gpu_rows_timed(
        self,
        nodes: Sequence[str],
        times: np.ndarray,
        gpus: Sequence[int],
        values: np.ndarray,
        uuids: Sequence[str | None],
        jobs: Sequence[str | None],
        ranks: Sequence[int | None],
    ) -> None:
        """Rows of any nodes at any times, one sample each (row i: GPU `gpus[i]` of `nodes[i]` at
        `times[i]`), otherwise as add_gpu_rows: several agents' batches of several sampling
        cycles each in a few writes (one per sample of the series with the most), not one per
        node and time."""
        count = len(times)
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (count, len(FIELDS)):
            raise ValueError(f"values must have shape ({count}, {len(FIELDS)}), got {array.shape}")
        if not len(nodes) == len(gpus) == len(uuids) == len(jobs) == len(ranks) == count:
            raise ValueError("nodes, gpus, uuids, jobs and ranks must have one entry per row")
        if not count:
            return
        order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
        t = np.asarray(times, dtype=np.float64)[order]
        array = array[order]
        picked = order.tolist()
        keys = [(nodes[i], int(gpus[i])) for i in picked]
        store = self._gpus
        intern = store.intern
        idents = [intern(uuids[i], jobs[i], ranks[i]) for i in picked]
        # Layer k holds each series' k-th sample: within a layer every series once, in time order.
        seen: dict[Key, int] = {}
        layer = np.empty(count, dtype=np.int64)
        for i, key in enumerate(keys):
            layer[i] = seen.get(key, 0)
            seen[key] = layer[i] + 1
        for k in range(int(layer.max()) + 1):
            rows = np.flatnonzero(layer == k).tolist()
            self.dropped["gpu"] += store.add_rows(
                [keys[i] for i in rows], t[rows], array[rows], [idents[i] for i in rows]
            )
        at: dict[tuple[str, float], list[int]] = {}
        for (node, gpu), ti in zip(keys, t.tolist()):
            at.setdefault((node, ti), []).append(gpu)
        for (node, ti), node_gpus in at.items():  # in time order: keys were sorted by time
            self._node(node).gpus_seen(node_gpus, ti)

    def add_rows(self, rows: GpuRows) -> None:
        """add_gpu_rows() of a GpuRows record."""
        self.add_gpu_rows(rows.node, rows.t, rows.gpus, rows.values, rows.uuids, rows.jobs, rows.ranks)

    def add_rows_batch(self, batch: Sequence[GpuRows]) -> None:
        """Several GpuRows records of one time (the nodes of one replay tick) in one write."""
        if len(batch) == 1:
            self.add_rows(batch[0])
            return
        t = batch[0].t
        if any(rows.t != t for rows in batch):
            for rows in batch:
                self.add_rows(rows)
            return
        keys: list[Key] = []
        idents: list[int] = []
        for rows in batch:
            node_keys, node_idents = self._batch_keys(rows)
            keys.extend(node_keys)
            idents.extend(node_idents)
        values = np.concatenate([np.asarray(rows.values, dtype=np.float64) for rows in batch])
        if values.shape != (len(keys), len(FIELDS)):
            raise ValueError(f"values must have shape ({len(keys)}, {len(FIELDS)}), got {values.shape}")
        self.dropped["gpu"] += self._gpus.add_rows(keys, float(t), values, idents)
        for rows in batch:
            self._node(rows.node).gpus_seen(rows.gpus, t)

    def _batch_keys(self, rows: GpuRows) -> tuple[list[Key], list[int]]:
        """The store keys and ident codes of a GpuRows record; the same lists as the node's
        previous record's when it names the same GPUs, uuids, jobs and ranks (list objects the
        simulator reuses while they do not change)."""
        cached = self._batch_cache.get(rows.node)
        if (
            cached is not None
            and cached[0] is rows.gpus
            and cached[1] is rows.uuids
            and cached[2] is rows.jobs
            and cached[3] is rows.ranks
        ):
            return cached[4], cached[5]
        intern = self._gpus.intern
        keys = [(rows.node, int(gpu)) for gpu in rows.gpus]
        idents = [intern(uuid, job, rank) for uuid, job, rank in zip(rows.uuids, rows.jobs, rows.ranks)]
        self._batch_cache[rows.node] = (rows.gpus, rows.uuids, rows.jobs, rows.ranks, keys, idents)
        return keys, idents

    def add_host(self, s: HostSample) -> None:
        series = self._host.get(s.node)
        if series is None:
            series = self._host[s.node] = deque(maxlen=self.max_samples_per_series)
        self._add("host", series, s)
        self._node(s.node).seen(s.t)

    def add_ib(self, s: IbSample) -> None:
        """One InfiniBand port sample (the agent sends them with the host sample)."""
        key = (s.node, s.device, s.port)
        series = self._ib.get(key)
        if series is None:
            series = self._ib[key] = deque(maxlen=self.max_samples_per_series)
        self._add("ib", series, s)
        record = self._node(s.node)
        record.seen(s.t)
        record.ib_seen(s)

    def add_event(self, e: Event) -> None:
        self._add("event", self._events, e)
        self._node(e.node).seen(e.t)

    def add_step(self, s: Step) -> None:
        steps = self._steps
        if not steps or steps[-1].t <= s.t:  # the common case: in time order
            if len(steps) == self._max_steps:
                # Full (a busy fleet): the oldest goes, from the columns too, not a rebuild of
                # a million rows at every step.
                steps.popleft()
                self._step_columns.popleft(1)
                self.dropped["step"] += 1
            steps.append(s)
            self._step_columns.append(s)
        else:
            self._add("step", steps, s)
            self._step_columns.dirty = True
        record = self._nodes.get(s.node)
        if record is None:
            record = self._node(s.node)
        if record.last_seen is None or s.t > record.last_seen:
            record.seen(s.t)

    def note_node(
        self,
        node: str,
        t: float,
        *,
        boot_id: str | None = None,
        sampling_interval_seconds: float | None = None,
        gpu_count: int | None = None,
    ) -> None:
        """Records that `node` sent something at `t` (last_seen is the max), and what it said.

        boot_seen_at becomes `t` when the node reports a boot_id different from the one it had.
        The first boot_id we learn is not a change (we cannot tell when that boot began, and a
        collector restart must not look like every node rebooting): to carry boot knowledge over a
        restart, note the inventory's last boot_id first. Late data from an older boot (t before
        the newest data of the current boot) does not count as a change back.
        """
        record = self._node(node)
        record.seen(t)
        if (
            sampling_interval_seconds is not None
            and sampling_interval_seconds > 0
            and sampling_interval_seconds != record.sampling_interval_seconds
        ):
            record.sampling_interval_seconds = float(sampling_interval_seconds)
            record._state = None
        if gpu_count is not None and gpu_count != record.gpu_count:
            record.gpu_count = gpu_count
            record._state = None
        if boot_id is not None:
            if record.boot_id is None:
                record.boot_id, record.boot_last_t = boot_id, t
                record._state = None
            elif boot_id == record.boot_id:
                if record.boot_last_t is None or t > record.boot_last_t:
                    record.boot_last_t = t
            elif record.boot_last_t is None or t >= record.boot_last_t:
                record.boot_id, record.boot_seen_at, record.boot_last_t = boot_id, t, t
                record._state = None

    def forget_node(self, node: str) -> None:
        """Drops a decommissioned node and its series (node_silent would otherwise fire forever)."""
        self._nodes.pop(node, None)
        self._host.pop(node, None)
        self._gpus.forget(node)
        for ib_key in [ib_key for ib_key in self._ib if ib_key[0] == node]:
            del self._ib[ib_key]

    # --- reading ---------------------------------------------------------------------------------

    def window(self, now: float, watching_since: float, *, prune: bool = True) -> Window:
        """Prunes what is older than retention and returns views of the rest as of `now`.

        The views share storage with this buffer: use the Window before feeding more data. With
        `prune` False nothing is dropped, so a later `now` may be looked at before an earlier one
        (replay's probes); what lies beyond retention then stays visible.
        """
        oldest_sample_t = now - self.retention_seconds if prune else -math.inf
        table = self._gpus.table(now, prune=prune)
        table.last_seen_in_states = True  # add_gpu*() note every sample's time in gpu_last_seen
        host: dict[str, SeriesView[HostSample]] = {}
        for node, host_series in list(self._host.items()):
            _prune(host_series, oldest_sample_t)
            if not host_series:
                del self._host[node]
                continue
            length = _visible_length(host_series, now)
            if length:
                host[node] = SeriesView(host_series, length)
        ib: dict[tuple[str, str, int], SeriesView[IbSample]] = {}
        for ib_key, ib_series in list(self._ib.items()):
            _prune(ib_series, oldest_sample_t)
            if not ib_series:
                del self._ib[ib_key]
                continue
            length = _visible_length(ib_series, now)
            if length:
                ib[ib_key] = SeriesView(ib_series, length)
        _prune(self._events, now - self.event_retention_seconds if prune else -math.inf)
        steps_before = len(self._steps)
        _prune(self._steps, now - self.step_retention_seconds if prune else -math.inf)
        if self._step_columns.dirty:
            self._step_columns.rebuild(self._steps)
        else:
            self._step_columns.popleft(steps_before - len(self._steps))
        steps = SeriesView(self._steps, _visible_length(self._steps, now))
        return Window(
            now=now,
            gpu=GpuSeriesMap(table),
            host=host,
            events=SeriesView(self._events, _visible_length(self._events, now)),
            steps=steps,
            nodes={node: record.state() for node, record in self._nodes.items()},
            watching_since=watching_since,
            ib=ib,
            table=table,
            step_table=self._step_columns.table(len(steps), steps),
        )

    @property
    def series_count(self) -> int:
        return len(self._gpus) + len(self._host) + len(self._ib)


@dataclass(slots=True)
class DetectorStats:
    """Per-detector run accounting for /metrics, like node_exporter's per-collector duration."""

    runs: int = 0
    errors: int = 0
    last_duration_seconds: float = 0.0
    last_ok: bool = True
    last_error: str | None = None  # repr of the last exception, for the API and logs


class Tracker:
    """Runs the detectors over each Window and keeps the open findings: the alert lifecycle diff.

    A finding opens the first time its fingerprint appears, stays open (updated with the newest
    summary and evidence, its start kept) while it keeps appearing, and closes with end=window.now
    the first evaluation it does not. A detector that raises keeps its open findings open.
    """

    def __init__(self, detectors: Sequence[Detector]) -> None:
        self.detectors: tuple[Detector, ...] = tuple(detectors)
        ids = [d.id for d in self.detectors]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"detector ids must be unique, repeated: {duplicated}")
        self.open: dict[str, Finding] = {}
        self._owner: dict[str, str] = {}  # fingerprint -> id of the detector that raised it
        self._hold_until: dict[str, float] = {}  # restored fingerprint -> not closed before (restore)
        # One page per fault: stragglers ride on their GPU's firing hardware finding (fold.py).
        self._folding = StragglerFolding()
        self.stats: dict[str, DetectorStats] = {d.id: DetectorStats() for d in self.detectors}

    def restore(self, findings: Iterable[Finding], *, hold_until: float | None = None) -> None:
        """Re-opens findings that were open before (e.g. firing alerts reloaded after a restart).

        They are not reported as opened again when their detector still finds them; they close
        normally when it does not, but not before `hold_until` (data time): a collector that takes
        over a node or the fleet's detection may lack the newest samples for a while (the agents
        are still moving and resending), and closing then would only open the alert again.
        """
        for finding in findings:
            if finding.end is not None:
                continue
            self.open[finding.fingerprint] = finding
            self._owner[finding.fingerprint] = finding.detector
            if hold_until is not None:
                self._hold_until[finding.fingerprint] = hold_until

    def _run(self, detector: Detector, window: Window) -> dict[str, Finding] | None:
        stats = self.stats[detector.id]
        started = time.perf_counter()
        try:
            found: dict[str, Finding] = {}
            for finding in detector.detect(window):
                found.setdefault(finding.fingerprint, finding)
        except Exception as exc:  # one broken detector must not hide the others
            stats.errors += 1
            stats.last_error = repr(exc)
            if stats.last_ok:
                log.exception("detector %s failed; its open findings stay open", detector.id)
            else:
                log.debug("detector %s still failing: %r", detector.id, exc)
            stats.last_ok = False
            return None
        finally:
            stats.runs += 1
            stats.last_duration_seconds = time.perf_counter() - started
        if not stats.last_ok:
            log.info("detector %s recovered", detector.id)
        stats.last_ok = True
        stats.last_error = None
        return found

    def evaluate(self, window: Window) -> tuple[list[Finding], list[Finding]]:
        """Runs every detector; returns (opened, closed) findings, closed ones with end=now."""
        seen: dict[str, Finding] = {}
        failed: set[str] = set()
        for detector in self.detectors:
            found = self._run(detector, window)
            if found is None:
                failed.add(detector.id)
                continue
            for fingerprint, finding in found.items():
                if fingerprint not in seen:
                    seen[fingerprint] = finding
                    self._owner.setdefault(fingerprint, detector.id)
        seen = self._folding.apply(seen, window.now, self.open)

        opened: list[Finding] = []
        for fingerprint, finding in seen.items():
            previous = self.open.get(fingerprint)
            if previous is None:
                if finding.end is not None:
                    finding = replace(finding, end=None)
                opened.append(finding)
            elif finding.start != previous.start or finding.end is not None:
                # The episode began when it first opened, whatever the detector now sees.
                finding = replace(finding, start=previous.start, end=None)
            self.open[fingerprint] = finding

        closed: list[Finding] = []
        if self._hold_until:
            self._hold_until = {fp: t for fp, t in self._hold_until.items() if t > window.now and fp in self.open}
        for fingerprint in [fp for fp in self.open if fp not in seen]:
            if self._owner.get(fingerprint) in failed:
                continue  # a crash says nothing about whether the condition still holds
            if fingerprint in self._hold_until:
                continue  # restored moments ago: the data may not have caught up yet
            closed.append(replace(self.open.pop(fingerprint), end=window.now))
            self._owner.pop(fingerprint, None)
        return opened, closed

    def forget(self, node: str | None = None) -> list[Finding]:
        """Drops the open findings (of one node, or all) without closing them: another collector
        carries them on (the node streams there now, or the fleet-wide lease moved). Returns them."""
        dropped = [f for f in self.open.values() if node is None or f.node == node]
        for finding in dropped:
            self.open.pop(finding.fingerprint, None)
            self._owner.pop(finding.fingerprint, None)
            self._hold_until.pop(finding.fingerprint, None)
        return dropped

    def open_findings(self) -> list[Finding]:
        """The open findings, ordered by start."""
        return sorted(self.open.values(), key=lambda f: (f.start, f.fingerprint))
