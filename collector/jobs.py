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
STRAGGLER_DETECTORS = frozenset({"straggler_telemetry", "straggler_steps", "straggler_stage"})
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


@dataclass
class _Cursor:
    """The last sample accounted on one GPU: where the next increase starts."""

    t: float
    energy: float  # NaN: that sample had no energy reading
    job: str | None


class JobLedger:
    """Per job and GPU: energy from counter increases, first and last sample, usage sums.

    Feed each GPU's samples in time order (`add_series`); a sample at or before one already
    accounted for that GPU is skipped, so overlapping reads never count twice.
    """

    def __init__(self) -> None:
        self.shares: dict[str, dict[tuple[str, int], GpuShare]] = {}
        self._cursors: dict[tuple[str, int], _Cursor] = {}

    def add_series(
        self,
        node: str,
        gpu: int,
        t: np.ndarray,
        jobs: Sequence[str | None],
        ranks: Sequence[int | None],
        uuids: Sequence[str | None],
        values: Mapping[str, np.ndarray],
    ) -> None:
        """One GPU's samples at times `t` (ascending), with the job, rank and uuid of each and the
        `values` of energy_joules, gpu_util_percent and power_watts (NaN where absent)."""
        key = (node, gpu)
        cursor = self._cursors.get(key)
        start = 0 if cursor is None else int(np.searchsorted(t, cursor.t, side="right"))
        if start >= len(t):
            return
        energy = values.get(ENERGY_FIELD)
        util = values.get(UTIL_FIELD)
        power = values.get(POWER_FIELD)
        prev_t = -math.inf if cursor is None else cursor.t
        prev_energy = math.nan if cursor is None else cursor.energy
        prev_job = None if cursor is None else cursor.job
        times = t[start:].tolist()
        energies = [math.nan] * len(times) if energy is None else energy[start:].tolist()
        utils = None if util is None else util[start:].tolist()
        powers = None if power is None else power[start:].tolist()
        for i, ts in enumerate(times):
            if ts <= prev_t:
                continue  # rows must ascend; a repeat of an accounted time adds nothing
            row = start + i
            job = jobs[row]
            e = energies[i]
            if job is not None:
                share = self._share(job, node, gpu)
                share.first_seen = min(share.first_seen, ts)
                share.last_seen = max(share.last_seen, ts)
                if uuids[row]:
                    share.uuid = uuids[row]
                rank = ranks[row]
                if rank is not None:
                    share.ranks.add(rank)
                # The increase since the previous energy reading is this job's only if that
                # reading was already the job's.
                if prev_job == job and e == e and prev_energy == prev_energy and e >= prev_energy:
                    share.energy_joules += e - prev_energy
                if utils is not None and utils[i] == utils[i]:
                    share.util_sum += utils[i]
                    share.util_count += 1
                if powers is not None and powers[i] == powers[i]:
                    share.power_sum += powers[i]
                    share.power_count += 1
            if e == e:
                prev_energy = e
                prev_job = job
            elif job != prev_job:
                prev_energy, prev_job = math.nan, job  # a new job without a reading: nothing carries over
            prev_t = ts
        self._cursors[key] = _Cursor(prev_t, prev_energy, prev_job)

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
        labels = [runs[w][1:] if w >= 0 else [None, None, None] for w in which.tolist()]
        ledger.add_series(
            node,
            slot,
            block.t[rows],
            [label[1] for label in labels],
            [label[2] for label in labels],
            [label[0] for label in labels],
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
    """Running jobs' energy as batches arrive, for the collector's /metrics (event loop only)."""

    def __init__(self) -> None:
        self.ledger = JobLedger()

    def add_rows(self, node: str, rows: GpuRows) -> None:
        """A dense batch's GPU rows."""
        gpus = rows.gpu
        for gpu in np.unique(gpus).tolist():
            picked = np.flatnonzero(gpus == gpu)
            picked = picked[np.argsort(rows.t[picked], kind="stable")]
            labels = [rows.labels[i] for i in rows.label[picked].tolist()]
            self.ledger.add_series(
                node,
                int(gpu),
                rows.t[picked],
                [label[1] for label in labels],
                [label[2] for label in labels],
                [label[0] for label in labels],
                {name: rows.values[picked, column] for name, column in _WIRE_COLUMN.items()},
            )

    def add_samples(self, node: str, samples: Sequence[GpuSample]) -> None:
        """A batch's GPU samples in the per-sample form (agents before 0.2)."""
        by_gpu: dict[int, list[GpuSample]] = {}
        for sample in samples:
            by_gpu.setdefault(sample.gpu, []).append(sample)
        for gpu, group in by_gpu.items():
            group.sort(key=lambda s: s.t)
            self.ledger.add_series(
                node,
                gpu,
                np.array([s.t for s in group], dtype=np.float64),
                [s.job for s in group],
                [s.rank for s in group],
                [s.uuid for s in group],
                {
                    name: np.array([float(s.metrics.get(name, math.nan)) for s in group], dtype=np.float64)
                    for name in _FIELDS
                },
            )

    def running(self, now: float) -> dict[str, float]:
        """Joules counted per running job; jobs idle past RUNNING_WITHIN_SECONDS are forgotten."""
        ledger = self.ledger
        idle = [job for job in ledger.shares if now - ledger.last_seen(job) > RUNNING_WITHIN_SECONDS]
        ledger.forget(idle)
        if len(ledger.shares) > MAX_LIVE_JOBS:
            oldest = sorted(ledger.shares, key=ledger.last_seen)[: len(ledger.shares) - MAX_LIVE_JOBS]
            ledger.forget(oldest)
        return {job: ledger.energy_joules(job) for job in ledger.shares}
