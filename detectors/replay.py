"""Offline replay: run the detectors over a JSON Lines recording (DESIGN.md's replay format)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from fleetwatch.detectors import default_detectors
from fleetwatch.detectors.engine import GpuRows, RecentData, Tracker
from fleetwatch.detectors.fold import folded_stragglers
from fleetwatch.detectors.model import Detector
from fleetwatch.inventory import normalize_pci_bus_id
from fleetwatch.records import Event, Finding, GpuSample, HostSample, IbSample, Step

Record = GpuSample | HostSample | IbSample | Event | Step
# What replay() takes: the records above, and GPU samples as rows (the simulator's batches).
ReplayRecord = Record | GpuRows

# IbSample fields that are text, not numbers (sysfs `state` names, e.g. "ACTIVE").
_IB_TEXT_METRICS = frozenset({"ib_state"})


class ReplayError(ValueError):
    """A replay line that cannot be read; says which line and why."""

    def __init__(self, line_number: int, reason: str) -> None:
        super().__init__(f"line {line_number}: {reason}")
        self.line_number = line_number
        self.reason = reason


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Fields:
    """Typed access to one record's JSON object; every failure names the field."""

    def __init__(self, obj: dict[str, Any], line_number: int) -> None:
        self.obj = obj
        self.line_number = line_number

    def fail(self, reason: str) -> ReplayError:
        return ReplayError(self.line_number, reason)

    def number(self, name: str) -> float:
        value = self.obj.get(name)
        if value is None:
            raise self.fail(f"missing {name!r}")
        if not _is_number(value) or not math.isfinite(value):
            raise self.fail(f"{name!r} must be a finite number, got {value!r}")
        return float(value)

    def optional_number(self, name: str) -> float | None:
        return None if self.obj.get(name) is None else self.number(name)

    def string(self, name: str) -> str:
        value = self.obj.get(name)
        if value is None:
            raise self.fail(f"missing {name!r}")
        if not isinstance(value, str) or not value:
            raise self.fail(f"{name!r} must be a non-empty string, got {value!r}")
        return value

    def optional_string(self, name: str) -> str | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(f"{name!r} must be a string, got {value!r}")
        return value

    def integer(self, name: str) -> int:
        value = self.obj.get(name)
        if value is None:
            raise self.fail(f"missing {name!r}")
        return self._integer(name, value)

    def optional_integer(self, name: str) -> int | None:
        value = self.obj.get(name)
        return None if value is None else self._integer(name, value)

    def _integer(self, name: str, value: Any) -> int:
        if not _is_number(value) or not math.isfinite(value) or value != int(value):
            raise self.fail(f"{name!r} must be an integer, got {value!r}")
        if value < 0:
            raise self.fail(f"{name!r} must not be negative, got {value!r}")
        return int(value)

    def metrics(self, text: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The 'metrics' object; names in `text` are strings, everything else numbers."""
        value = self.obj.get("metrics")
        if not isinstance(value, dict):
            raise self.fail(f"'metrics' must be an object, got {value!r}")
        metrics: dict[str, Any] = {}
        for name, metric in value.items():
            if metric is None:
                continue  # null reads as "not supported": absent, never 0
            if name in text:
                if not isinstance(metric, str):
                    raise self.fail(f"metric {name!r} must be a string, got {metric!r}")
                if metric:
                    metrics[name] = metric
                continue
            if isinstance(metric, bool):
                metric = int(metric)
            if not isinstance(metric, (int, float)) or not math.isfinite(metric):
                raise self.fail(f"metric {name!r} must be a finite number, got {metric!r}")
            metrics[name] = metric
        return metrics

    def job(self) -> str | None:
        value = self.obj.get("job")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.fail(f"'job' must be a string, got {value!r}")
        return str(value)  # Slurm job ids are often written as numbers


def _bus_id(text: str | None) -> str | None:
    """A PCI bus id in the one spelling the agents send ("0000:9b:00.0"); kept as written when it is none."""
    if text is None:
        return None
    try:
        return normalize_pci_bus_id(text)
    except ValueError:
        return text


def _event(fields: _Fields, t: float, kind: str) -> Event:
    xid = fields.integer("xid") if kind == "xid" else fields.optional_integer("xid")
    message = fields.optional_string("message") or ""
    return Event(
        t=t,
        node=fields.string("node"),
        kind=kind,
        gpu=fields.optional_integer("gpu"),
        xid=xid,
        pci_bus_id=_bus_id(fields.optional_string("pci_bus_id")),
        uuid=fields.optional_string("uuid"),
        message=message,
        source=fields.optional_string("source") or "replay",
    )


def _record(obj: dict[str, Any], line_number: int) -> Record:
    fields = _Fields(obj, line_number)
    t = fields.number("t")
    kind = fields.string("kind")
    if kind == "gpu":
        return GpuSample(
            t=t,
            node=fields.string("node"),
            gpu=fields.integer("gpu"),
            metrics=fields.metrics(),
            uuid=fields.optional_string("uuid"),
            job=fields.job(),
            rank=fields.optional_integer("rank"),
        )
    if kind == "host":
        return HostSample(t=t, node=fields.string("node"), metrics=fields.metrics())
    if kind == "ib":
        port = fields.integer("port")
        return IbSample(
            t=t,
            node=fields.string("node"),
            device=fields.string("device"),
            port=port,
            metrics=fields.metrics(text=_IB_TEXT_METRICS),
        )
    if kind == "step":
        seconds = fields.number("seconds")
        if seconds < 0:
            raise fields.fail(f"'seconds' must not be negative, got {seconds!r}")
        job = fields.job()
        if job is None:
            raise fields.fail("missing 'job'")
        wall_seconds = fields.optional_number("wall_seconds")
        if wall_seconds is not None and wall_seconds <= 0:
            raise fields.fail(f"'wall_seconds' must be positive, got {wall_seconds!r}")
        return Step(
            t=t,
            job=job,
            rank=fields.integer("rank"),
            node=fields.string("node"),
            step=fields.integer("step"),
            seconds=seconds,
            gpu=fields.optional_integer("gpu"),
            dp_rank=fields.optional_integer("dp_rank"),
            pp_stage=fields.optional_integer("pp_stage"),
            tp_rank=fields.optional_integer("tp_rank"),
            wall_seconds=wall_seconds,
        )
    if kind == "event":
        # A generic event names its own type: {"kind": "event", "type": "gpu_lost", ...}.
        event_kind = fields.optional_string("type") or fields.optional_string("event")
        if not event_kind:
            raise fields.fail("an 'event' record needs a 'type' (e.g. \"gpu_lost\")")
        return _event(fields, t, event_kind)
    if kind in ("xid", "gpu_lost"):
        return _event(fields, t, kind)
    raise fields.fail(f"unknown kind {kind!r} (expected gpu, host, ib, xid, step, gpu_lost or event)")


def read_records(lines: Iterable[str]) -> Iterator[Record]:
    """Parses replay JSON Lines; blank lines are skipped, anything else bad raises ReplayError."""
    for line_number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReplayError(line_number, f"not JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(obj, dict):
            raise ReplayError(line_number, f"expected a JSON object, got {type(obj).__name__}")
        yield _record(obj, line_number)


def infer_sampling_intervals(records: Iterable[ReplayRecord]) -> dict[str, float]:
    """Per node, the median gap between consecutive samples of each of its GPU and host series."""
    return _intervals(sorted(records, key=lambda r: r.t))


def _intervals(ordered: Sequence[ReplayRecord]) -> dict[str, float]:
    """infer_sampling_intervals() of records already in time order."""
    last_t: dict[tuple[str, int | None], float] = {}
    gaps: dict[str, dict[float, int]] = {}  # node -> gap -> how many times
    # Per node, the GPUs of its last GpuRows and their common time: the next batch of the same
    # GPUs adds one gap per GPU without a look at each.
    batches: dict[str, tuple[tuple[int, ...], float]] = {}

    def flush(node: str) -> None:
        """The node's last GpuRows into last_t, before its GPUs are looked at one by one."""
        last = batches.pop(node, None)
        if last is not None:
            for gpu in last[0]:
                last_t[(node, gpu)] = last[1]

    def seen(node: str, gpu: int | None, t: float) -> None:
        previous = last_t.get((node, gpu))
        if previous is not None and t > previous:
            counts = gaps.setdefault(node, {})
            counts[t - previous] = counts.get(t - previous, 0) + 1
        last_t[(node, gpu)] = t

    for record in ordered:
        if type(record) is Step:  # most records of a simulated run: no sampling cadence
            continue
        if isinstance(record, GpuRows):
            node, t = record.node, record.t
            gpus = tuple(int(gpu) for gpu in record.gpus)
            last = batches.get(node)
            if last is not None and last[0] == gpus and t > last[1]:
                counts = gaps.setdefault(node, {})
                counts[t - last[1]] = counts.get(t - last[1], 0) + len(gpus)
            else:
                flush(node)
                for gpu in gpus:
                    seen(node, gpu, t)
            batches[node] = (gpus, t)
        elif isinstance(record, GpuSample):
            flush(record.node)
            seen(record.node, record.gpu, record.t)
        elif isinstance(record, HostSample):
            seen(record.node, None, record.t)
    return {node: _median_of_counts(counts) for node, counts in gaps.items()}


def _median_of_counts(counts: dict[float, int]) -> float:
    """statistics.median of a multiset given as value -> count."""
    values = sorted(counts)
    total = sum(counts.values())
    running = 0
    low = high = None
    for value in values:
        running += counts[value]
        if low is None and running > (total - 1) // 2:
            low = value
        if running > total // 2:
            high = value
            break
    assert low is not None and high is not None
    return low if total % 2 else (low + high) / 2


@dataclass(frozen=True, slots=True)
class Episode:
    """One finding episode from a replay and the data time at which the tracker opened it.

    `finding.start` is what the detector says the condition began at (e.g. the first hot sample);
    `opened_at` is when the engine, evaluating at that data time, first reported it: what an alert
    would have waited for. Detection latency is `opened_at` minus the fault's time.
    """

    finding: Finding
    opened_at: float


def replay(
    records: Iterable[ReplayRecord],
    detectors: Sequence[Detector] | None = None,
    step_seconds: float = 1.0,
    *,
    skip_idle: bool = False,
) -> list[Finding]:
    """Runs `detectors` (default: the registry) over `records` as the collector would live.

    Records are fed in time order; the detectors run every `step_seconds` of data time and at once
    after each event. Returns every finding episode once, ordered by start: `end` is when it
    closed, or None when it still held at the last record.

    `skip_idle` is for sparse event-only input (a kernel log spanning months) read by detectors
    that only open findings on new data: it jumps over stretches where no finding is open, and
    bisects those where some are for the ticks at which they close.
    """
    episodes = replay_episodes(records, detectors, step_seconds, skip_idle=skip_idle)
    return [episode.finding for episode in episodes]


def replay_episodes(
    records: Iterable[ReplayRecord],
    detectors: Sequence[Detector] | None = None,
    step_seconds: float = 1.0,
    *,
    skip_idle: bool = False,
) -> list[Episode]:
    """As replay(), with the data time at which each episode opened (for latency scoring)."""
    if not step_seconds > 0:
        raise ValueError(f"step_seconds must be positive, got {step_seconds!r}")
    ordered = sorted(records, key=lambda r: r.t)  # stable: same-time records keep file order
    if not ordered:
        return []
    if detectors is None:
        detectors = default_detectors()
    intervals = _intervals(ordered)
    data = RecentData.for_detectors(detectors)
    tracker = Tracker(detectors)
    first_t = ordered[0].t
    episodes: list[Episode] = []
    open_episode: dict[str, int] = {}  # fingerprint -> index in episodes

    def evaluate(now: float) -> None:
        opened, closed = tracker.evaluate(data.window(now, watching_since=first_t))
        for finding in closed:
            index = open_episode.pop(finding.fingerprint)
            episodes[index] = Episode(finding, episodes[index].opened_at)
        for finding in opened:
            open_episode[finding.fingerprint] = len(episodes)
            episodes.append(Episode(finding, now))

    known_nodes: set[str] = set()
    add_step = data.add_step
    sampled_nodes = {r.node for r in ordered if isinstance(r, (GpuSample, GpuRows, HostSample, IbSample))}
    tick = 0  # grid times are first_t + tick * step_seconds (no drift from repeated addition)
    last_evaluated: float | None = None

    def reported(k: int) -> set[str] | None:
        """The fingerprints the detectors report at grid tick k, the tracker untouched (None: one failed)."""
        window = data.window(first_t + k * step_seconds, watching_since=first_t, prune=False)
        try:
            return {f.fingerprint for d in tracker.detectors for f in d.detect(window)}
        except Exception:
            return None

    def first_change(lo: int, hi: int) -> int:
        """With no record before tick hi: the first tick in [lo, hi) at which the open findings would
        change, else hi. Event-only detectors close a finding once its hold runs out and open none
        without new data, so the open set changes at most monotonically and can be bisected: a
        held XID then costs about 17 evaluations instead of one a second for a day."""
        held = set(tracker.open)
        if lo >= hi or reported(hi - 1) == held:
            return hi
        while lo < hi - 1:
            mid = (lo + hi - 1) // 2
            if reported(mid) == held:
                lo = mid + 1
            else:
                hi = mid + 1
        return lo

    for t, group in groupby(ordered, key=lambda r: r.t):
        while first_t + tick * step_seconds < t:
            if skip_idle:
                next_tick = math.ceil((t - first_t) / step_seconds)  # the first grid tick at or after t
                tick = max(tick, next_tick) if not tracker.open else first_change(tick, next_tick)
                if tick >= next_tick:
                    break
            evaluate(first_t + tick * step_seconds)
            tick += 1
        has_event = False
        rows: list[GpuRows] = []  # one write for the tick's GPU rows of every node
        for record in group:
            if record.node not in known_nodes:
                known_nodes.add(record.node)
                interval_seconds = intervals.get(record.node)
                if record.node not in sampled_nodes:
                    # Only steps or events from this node: it has no sampling cadence to fall
                    # silent against (node_silent would read every gap between steps as silence).
                    interval_seconds = math.inf
                data.note_node(record.node, t, sampling_interval_seconds=interval_seconds)
            kind = type(record)
            if kind is Step:  # the commonest record of a simulated run: first
                add_step(record)  # type: ignore[arg-type]
            elif kind is GpuRows:
                rows.append(record)  # type: ignore[arg-type]
            elif isinstance(record, GpuSample):
                data.add_gpu(record)
            elif isinstance(record, HostSample):
                data.add_host(record)
            elif isinstance(record, IbSample):
                data.add_ib(record)
            elif isinstance(record, Event):
                data.add_event(record)
                has_event = True
            elif isinstance(record, GpuRows):
                rows.append(record)
            else:
                add_step(record)
        if rows:
            data.add_rows_batch(rows)
        on_grid = first_t + tick * step_seconds == t
        if has_event or on_grid:
            evaluate(t)
            last_evaluated = t
            if on_grid:
                tick += 1
    if last_evaluated != ordered[-1].t:
        evaluate(ordered[-1].t)

    for fingerprint, index in open_episode.items():
        # The newest evidence, end still None.
        episodes[index] = Episode(tracker.open[fingerprint], episodes[index].opened_at)
    episodes.sort(key=lambda episode: _episode_order(episode.finding))
    return episodes


def unfolded(episodes: Sequence[Episode]) -> list[Episode]:
    """The episodes, plus one for each straggler a hardware finding carries (detectors.fold), as
    its own detector's episode opened when it was folded in: what scoring by detector needs."""
    out = list(episodes)
    for episode in episodes:
        out.extend(Episode(straggler, since) for straggler, since in folded_stragglers(episode.finding))
    return out


def _episode_order(f: Finding) -> tuple[float, str, str, int, str]:
    return (f.start, f.detector, f.node or "", -1 if f.gpu is None else f.gpu, f.key)
