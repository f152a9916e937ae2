"""What a training job cost: its GPUs and nodes, duration, energy, utilisation, steps and alerts.

Every GPU sample names the job and rank its processes belong to (agent/sources/jobs.py), and
carries the GPU's energy counter (NVML total energy since the driver loaded, in joules). A job's
energy is the sum, over its GPUs, of the counter's increases between consecutive samples that
both name the job: the time before the job's first sample on a GPU and after its last is not
the job's. A counter that goes backwards (the driver reloaded, the GPU was reset) adds nothing
for that interval rather than a guess.

Two readers use the same accounting (`JobLedger`):
- `GET /api/v1/jobs` and `fleetwatchctl jobs` read the stored raw samples from `since` on
  (`job_reports`), so they are as complete as the store, late spooled batches included;
- the collector's `/metrics` counts each running job's joules as batches arrive (`LiveJobs`),
  and forgets a job once it has had no sample for `RUNNING_WITHIN_SECONDS`, so the series stay
  bounded by the jobs running now. A Prometheus counter that restarts with the collector is
  what `increase()` expects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetwatch.collector.storage.blocks import FIELD_NUMBERS
from fleetwatch.collector.storage.chunks import RAW, Block, column_id
from fleetwatch.collector.storage.store import GpuRows, Store
from fleetwatch.limits import BATCH_INTERVAL_MAX_SECONDS
from fleetwatch.records import GpuSample
from fleetwatch.wire import GPU_FIELDS

ENERGY_FIELD = "energy_joules"
UTIL_FIELD = "gpu_util_percent"
POWER_FIELD = "power_watts"
_FIELDS = (ENERGY_FIELD, UTIL_FIELD, POWER_FIELD)
_WIRE_COLUMN = {name: GPU_FIELDS.index(name) for name in _FIELDS}

# A job whose newest sample is at most this old is running: two of the longest batch intervals an
# agent may use (limits.BATCH_INTERVAL_MAX_SECONDS), so a job is not called ended between batches.
RUNNING_WITHIN_SECONDS = 2 * BATCH_INTERVAL_MAX_SECONDS
# At most this many jobs in the live ledger (and so in /metrics): far above what one fleet runs at
# once; beyond it the least recently seen are dropped.
MAX_LIVE_JOBS = 10_000
JOULES_PER_KWH = 3.6e6
DEFAULT_JOBS_SECONDS = 24 * 3600.0  # `since` when a request names none
# The detectors that name a job's slow ranks (detectors/straggler_*.py).
STRAGGLER_DETECTORS = frozenset({"straggler.telemetry", "straggler.steps", "straggler.stage"})
_MAX_ALERTS_READ = 5000


@dataclass
class GpuShare:
    """One GPU's part in a job: when it held it, the energy it used for it, its usage sums."""

    node: str
    gpu: int
    uuid: str | None = None
    ranks: set[int] = field(default_factory=set)
    first_seen: float = math.inf
    last_seen: float = -math.inf
    energy_joules: float = 0.0
    util_sum: float = 0.0
    util_count: int = 0
    power_sum: float = 0.0
    power_count: int = 0


Label = tuple[str | None, str | None, int | None]  # (uuid, job, rank) of a GPU sample


@dataclass
class _Cursor:
    """The last sample accounted on one GPU: where the next increase starts."""

    t: float
    energy: float  # the last energy reading (NaN: none yet)
    job: str | None  # the job that reading named


class JobLedger:
    """Per job and GPU: energy from counter increases, first and last sample, usage sums.

    Feed each GPU's samples in time order (`add_series`); a sample at or before one already
    accounted for that GPU is skipped, so overlapping reads never count twice. The energy between
    two consecutive readings of a GPU's counter is a job's when both readings name it.
    """

    def __init__(self) -> None:
        self.shares: dict[str, dict[tuple[str, int], GpuShare]] = {}
        self._cursors: dict[tuple[str, int], _Cursor] = {}

    def add_series(
        self,
        node: str,
        gpu: int,
        t: np.ndarray,
        labels: Sequence[Label],
        label_of_row: np.ndarray,
        values: Mapping[str, np.ndarray],
    ) -> None:
        """One GPU's samples at times `t` (ascending): row i names labels[label_of_row[i]], and
        `values` holds energy_joules, gpu_util_percent and power_watts (NaN where absent)."""
        key = (node, gpu)
        cursor = self._cursors.get(key)
        prev_t = -math.inf if cursor is None else cursor.t
        # Rows after the cursor, each later than the one before (a repeated time adds nothing).
        keep = t > prev_t
        if len(t) > 1:
            keep[1:] &= np.diff(t) > 0
        rows = np.flatnonzero(keep)
        if not len(rows):
            return
        times = t[rows]
        # Jobs as small integers: -1 for a row that names none.
        jobs = sorted({label[1] for label in labels if label[1] is not None})
        code_of = {job: i for i, job in enumerate(jobs)}
        label_codes = np.array(
            [-1 if label[1] is None else code_of[label[1]] for label in labels] or [-1], dtype=np.int64
        )
        codes = label_codes[label_of_row[rows]]
        nan = np.full(len(rows), np.nan)
        energy = values.get(ENERGY_FIELD, nan)[rows] if ENERGY_FIELD in values else nan
        util = values[UTIL_FIELD][rows] if UTIL_FIELD in values else nan
        power = values[POWER_FIELD][rows] if POWER_FIELD in values else nan

        # Energy: consecutive readings (the cursor's first), an increase counted where both name
        # one job; a counter that went back (driver reload, GPU reset) adds nothing.
        read = np.flatnonzero(~np.isnan(energy))
        read_energy, read_codes = energy[read], codes[read]
        if cursor is not None and cursor.energy == cursor.energy:
            read_energy = np.concatenate(([cursor.energy], read_energy))
            read_codes = np.concatenate(([code_of.get(cursor.job, -1) if cursor.job else -1], read_codes))
        increase = np.diff(read_energy)
        counted = (read_codes[1:] == read_codes[:-1]) & (read_codes[1:] >= 0) & (increase >= 0)
        joules = np.bincount(read_codes[1:][counted], weights=increase[counted], minlength=len(jobs))

        for code, job in enumerate(jobs):
            mine = codes == code
            if not mine.any():
                if joules[code] > 0:  # only the cursor's reading and later rows of no job: cannot be
                    self._share(job, node, gpu).energy_joules += float(joules[code])
                continue
            share = self._share(job, node, gpu)
            share.energy_joules += float(joules[code])
            job_times = times[mine]
            share.first_seen = min(share.first_seen, float(job_times[0]))
            share.last_seen = max(share.last_seen, float(job_times[-1]))
            for label_index in np.unique(label_of_row[rows][mine]).tolist():
                uuid, _, rank = labels[label_index]
                if uuid:
                    share.uuid = uuid
                if rank is not None:
                    share.ranks.add(rank)
            job_util, job_power = util[mine], power[mine]
            util_read, power_read = ~np.isnan(job_util), ~np.isnan(job_power)
            share.util_sum += float(job_util[util_read].sum())
            share.util_count += int(util_read.sum())
            share.power_sum += float(job_power[power_read].sum())
            share.power_count += int(power_read.sum())

        if len(read):
            last = read[-1]
            self._cursors[key] = _Cursor(
                float(times[-1]), float(energy[last]), labels[int(label_of_row[rows][last])][1]
            )
        else:
            self._cursors[key] = _Cursor(
                float(times[-1]), math.nan if cursor is None else cursor.energy, None if cursor is None else cursor.job
            )

    def _share(self, job: str, node: str, gpu: int) -> GpuShare:
        gpus = self.shares.setdefault(job, {})
        share = gpus.get((node, gpu))
        if share is None:
            share = gpus[(node, gpu)] = GpuShare(node, gpu)
        return share

    def energy_joules(self, job: str) -> float:
        return sum(share.energy_joules for share in self.shares.get(job, {}).values())

    def last_seen(self, job: str) -> float:
        return max((share.last_seen for share in self.shares.get(job, {}).values()), default=-math.inf)

    def forget(self, jobs: Iterable[str]) -> None:
        for job in jobs:
            self.shares.pop(job, None)


# -- reading the store ----------------------------------------------------------------------


def _block_series(node: str, block: Block, since: float, ledger: JobLedger) -> None:
    """Each GPU of one stored block into the ledger, from `since` on."""
    runs_by_slot: dict[str, list[list[Any]]] = block.text.get("runs", {})
    numbers = FIELD_NUMBERS["gpu"]
    for slot_text, runs in runs_by_slot.items():
        slot = int(slot_text)
        columns = {}
        present_any = np.zeros(len(block.t), dtype=bool)
        for name in _FIELDS:
            where = np.flatnonzero(block.ids == column_id(numbers[name], RAW, slot))
            if len(where):
                j = int(where[0])
                column = np.where(block.present[:, j], block.values[:, j], np.nan)
                columns[name] = column
                present_any |= block.present[:, j]
        rows = np.flatnonzero(present_any & (block.t >= since))
        if not len(rows):
            continue
        # A run [first_row, uuid, job, rank] holds from its first row to the next run's.
        firsts = np.array([run[0] for run in runs], dtype=np.int64)
        which = np.searchsorted(firsts, rows, side="right") - 1
        labels: list[Label] = [(run[1], run[2], run[3]) for run in runs] + [(None, None, None)]
        ledger.add_series(
            node,
            slot,
            block.t[rows],
            labels,
            np.where(which >= 0, which, len(runs)),
            {name: column[rows] for name, column in columns.items()},
        )


def job_reports(store: Store, since: float, now: float, *, job: str | None = None) -> list[dict[str, Any]]:
    """Every job with a GPU sample from `since` on (or just `job`), newest activity first."""
    ledger = JobLedger()
    for node, block in store.blocks("gpu", since):
        _block_series(node, block, since, ledger)
    names = [job] if job is not None else list(ledger.shares)
    names = [name for name in names if name in ledger.shares]
    steps: dict[str, set[int]] = {}
    for step in store.steps_since(since):
        if step.job in ledger.shares:
            steps.setdefault(step.job, set()).add(step.step)
    alerts = store.alerts(status=None, limit=_MAX_ALERTS_READ, active_since=since)
    reports = [_report(name, ledger.shares[name], steps.get(name), alerts, now) for name in names]
    reports.sort(key=lambda r: (-r["last_seen"], r["job"]))
    return reports


def _report(
    job: str, shares: Mapping[tuple[str, int], GpuShare], steps: set[int] | None, alerts: list[dict], now: float
) -> dict[str, Any]:
    first = min(share.first_seen for share in shares.values())
    last = max(share.last_seen for share in shares.values())
    energy = sum(share.energy_joules for share in shares.values())
    util_count = sum(share.util_count for share in shares.values())
    power_count = sum(share.power_count for share in shares.values())
    held = set(shares)
    mine: list[dict[str, Any]] = []
    stragglers: list[dict[str, Any]] = []
    for alert in alerts:
        ends = alert["ends_at"] if alert["ends_at"] is not None else now
        on_its_gpu = (alert["node"], alert["gpu"]) in held and alert["starts_at"] <= last and ends >= first
        slowed = [s for s in (alert.get("evidence") or {}).get("stragglers", []) if s.get("job") == job]
        if alert["job"] == job or on_its_gpu or slowed:
            mine.append(
                {
                    key: alert[key]
                    for key in ("id", "detector", "severity", "node", "gpu", "rank", "status", "starts_at", "ends_at")
                }
            )
        if alert["job"] == job and alert["detector"] in STRAGGLER_DETECTORS:
            stragglers.append(
                {"node": alert["node"], "gpu": alert["gpu"], "rank": alert["rank"], "detector": alert["detector"]}
            )
        for s in slowed:  # a hardware alert folded with the stragglers it causes (detectors/fold.py)
            stragglers.append(
                {"node": alert["node"], "gpu": alert["gpu"], "rank": s.get("rank"), "detector": alert["detector"]}
            )
    step_count = len(steps) if steps else None
    return {
        "job": job,
        "state": "running" if now - last <= RUNNING_WITHIN_SECONDS else "ended",
        "first_seen": first,
        "last_seen": last,
        "duration_seconds": round(last - first, 3),
        "nodes": sorted({node for node, _ in shares}),
        "gpus": [
            {"node": s.node, "gpu": s.gpu, "uuid": s.uuid, "ranks": sorted(s.ranks), "energy_joules": s.energy_joules}
            for _, s in sorted(shares.items())
        ],
        "gpu_count": len(shares),
        "energy_joules": energy,
        "energy_kwh": energy / JOULES_PER_KWH,
        "steps": step_count,
        "joules_per_step": energy / step_count if step_count else None,
        "mean_utilization_percent": (sum(s.util_sum for s in shares.values()) / util_count if util_count else None),
        "mean_power_watts": sum(s.power_sum for s in shares.values()) / power_count if power_count else None,
        "stragglers": stragglers,
        "alerts": mine,
    }


# -- the live ledger behind /metrics --------------------------------------------------------


class LiveJobs:
    """Running jobs' energy as batches arrive, for the collector's /metrics (event loop only).

    The same rule as JobLedger (an increase between consecutive readings of a GPU's counter that
    both name the job), counted over a whole batch in a few array operations: it runs for every
    batch on the event loop, where a loop per GPU would cost more than storing the batch.
    """

    def __init__(self) -> None:
        self.joules: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        # Per (node, gpu): the time, energy reading and job of its last reading.
        self._last: dict[tuple[str, int], tuple[float, float, str | None]] = {}

    def add_rows(self, node: str, rows: GpuRows) -> None:
        """A dense batch's GPU rows."""
        jobs = [label[1] for label in rows.labels]
        self._add(node, rows.t, rows.gpu, rows.values[:, _WIRE_COLUMN[ENERGY_FIELD]], jobs, rows.label)

    def add_samples(self, node: str, samples: Sequence[GpuSample]) -> None:
        """A batch's GPU samples in the per-sample form (agents before 0.2)."""
        if not samples:
            return
        self._add(
            node,
            np.array([s.t for s in samples], dtype=np.float64),
            np.array([s.gpu for s in samples], dtype=np.int64),
            np.array([float(s.metrics.get(ENERGY_FIELD, math.nan)) for s in samples], dtype=np.float64),
            [s.job for s in samples],
            np.arange(len(samples)),
        )

    def _add(
        self,
        node: str,
        t: np.ndarray,
        gpu: np.ndarray,
        energy: np.ndarray,
        jobs: Sequence[str | None],
        job_of_row: np.ndarray,
    ) -> None:
        names = sorted({job for job in jobs if job is not None})
        if not names:
            return
        code_of = {job: i for i, job in enumerate(names)}
        codes = np.array([code_of.get(job, -1) if job is not None else -1 for job in jobs], dtype=np.int64)[job_of_row]
        for code, job in enumerate(names):  # a job's newest sample, read or not
            seen = t[codes == code]
            if len(seen):
                self.last_seen[job] = max(self.last_seen.get(job, -math.inf), float(seen.max()))
        read = ~np.isnan(energy)
        t, gpu, energy, codes = t[read], gpu[read], energy[read], codes[read]
        # Each GPU's last reading before this batch goes in front of its rows (readings of a time
        # already accounted are dropped below).
        held = [(g, self._last[(node, g)]) for g in np.unique(gpu).tolist() if (node, g) in self._last]
        if held:
            t = np.concatenate((t, [last[0] for _, last in held]))
            gpu = np.concatenate((gpu, [g for g, _ in held]))
            energy = np.concatenate((energy, [last[1] for _, last in held]))
            codes = np.concatenate((codes, [code_of.get(last[2], -1) if last[2] else -1 for _, last in held]))
        order = np.lexsort((t, gpu))
        t, gpu, energy, codes = t[order], gpu[order], energy[order], codes[order]
        if not len(t):
            return
        pair = (gpu[1:] == gpu[:-1]) & (t[1:] > t[:-1])
        increase = np.diff(energy)
        counted = pair & (codes[1:] == codes[:-1]) & (codes[1:] >= 0) & (increase >= 0)
        joules = np.bincount(codes[1:][counted], weights=increase[counted], minlength=len(names))
        for code in np.flatnonzero(joules).tolist():
            self.joules[names[code]] = self.joules.get(names[code], 0.0) + float(joules[code])
        last_rows = np.flatnonzero(np.append(gpu[1:] != gpu[:-1], True))
        for row in last_rows.tolist():
            key = (node, int(gpu[row]))
            held_t = self._last.get(key, (-math.inf,))[0]
            if t[row] > held_t:
                self._last[key] = (float(t[row]), float(energy[row]), names[codes[row]] if codes[row] >= 0 else None)

    def running(self, now: float) -> dict[str, float]:
        """Joules counted per running job; jobs idle past RUNNING_WITHIN_SECONDS are forgotten."""
        idle = [job for job, seen in self.last_seen.items() if now - seen > RUNNING_WITHIN_SECONDS]
        if len(self.last_seen) - len(idle) > MAX_LIVE_JOBS:
            by_age = sorted(self.last_seen, key=self.last_seen.__getitem__)
            idle = by_age[: len(self.last_seen) - MAX_LIVE_JOBS]
        for job in idle:
            self.last_seen.pop(job, None)
            self.joules.pop(job, None)
        return {job: self.joules.get(job, 0.0) for job in self.last_seen}
