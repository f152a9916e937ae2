"""A simulated fleet built from a scenario file (tests/scenarios/README.md), as detector records.

`SimFleet.from_scenario(scenario)` takes the parsed TOML; `records()` yields the fleet's
detectors.model records (GpuSample, HostSample, IbSample, Event, Step) in time order for the whole
`duration_seconds`, on a simulated clock (no sleeping, no wall clock): the same scenario gives the
same records, and records() can be called again for a fresh, identical pass.

GPU samples come from the agent's own NvmlSource over the fake NVML of one SimNode per node, so
the sampling code is the one the agent runs; GPU-lost events come from NvmlSource.sample() and
XID events from the nodes' XID schedule at their exact times. `batches()` gives the same records
with each node's GPU samples of a tick as one GpuRows, computed in bulk by the simulator's fast
path (fleetwatch.sim.rows) instead of through NVML: the corpus evaluation and the soak replay
those (tests/sim/test_rows.py holds the two paths to the same records). Jobs are synchronous data-parallel
jobs: each step lasts as long as the slowest rank's compute plus the exposed collectives, so a
throttled or slow rank stretches everyone's step while only its own `seconds` (compute time)
grows, and its peers wait in collectives (same utilisation, less power). The per-rank step noise
reproduces the Alibaba PAI traces (see STEP NOISE below).

Semantics of the scenario's kinds beyond fleetwatch.sim.scenario.Fault (times are seconds after start):

- ib_link_down / ib_flap / ib_rate_low (node, optional `port` = index of the node's port,
  mlx5_<port>): the port leaves ACTIVE (link_downed counts each drop; a flap also counts symbol
  errors and error recoveries) or trains at `rate_gbps` (default 200, 4X HDR on an NDR port).
  A job spanning that node stalls in its collectives while the link is down; if it stays down past
  NCCL's IB retries (IB_ABORT_SECONDS) the job aborts (its GPUs go idle). A slow port stretches the
  job's exposed collective time. ib_flap: `count` drops (default: every `period_seconds`, 30)
  over `duration_seconds` (default 180), each down for a few seconds.
- node_silent: the node emits nothing (samples, events, step reports) while it lasts; its GPUs
  keep working.
- gpu_missing: the driver no longer gives a handle for the GPU (NVML_ERROR_UNKNOWN, other indices
  unchanged); the node's agent re-initialises NVML at that moment and stops sampling it. No XID.
- retired_pages: ValueError on H100/H200 (they remap rows; no page retirement).
- A rank whose GPU is lost or missing leaves its job hung in collectives until NCCL's watchdog
  (NCCL_TIMEOUT_SECONDS), then the job is gone; a rank killed by an application-visible fatal XID
  (13, 31, 43, 48, 94, 95 or ecc_dbe) takes the job down within APP_ABORT_SECONDS.

Noise kinds: checkpoint_pause (the job's GPUs hold their memory but idle while every rank writes;
the step in progress takes the pause longer for every rank, in its own `seconds` too),
dataloader_hiccup (one rank, `count` steps (default 1, or those starting within
`duration_seconds`) take `factor` (default 2-4) times longer), single_sbe (one correctable ECC
error), idle_gpu (the GPU is in no job: idle during the window, with util 0, idle power, idle
clock and its PCIe link at Gen1; outside the window it runs an unnamed workload if its node hosts
a job, else it is idle too), job_restart (the job's processes exit, its GPUs idle for
`duration_seconds` (default 60), then it loads for LOAD_SECONDS and resumes from the step of its
last checkpoint with warm-up steps). Noise without a node applies to every job (or the `job`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np

from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.detectors.engine import GpuRows
from fleetwatch.records import Event, GpuSample, HostSample, IbSample, Step
from fleetwatch.sim import rows
from fleetwatch.sim.fake_nvml import make_fake_nvml
from fleetwatch.sim.node import (
    HUNG,
    IDLE,
    IDLE_ACTIVITY,
    NCCL_TIMEOUT_SECONDS,
    PAUSED,
    RUNNING,
    Activity,
    SimNode,
    compute_factor,
    synchronous_job_activity,
)
from fleetwatch.sim.profiles import profile_for
from fleetwatch.sim.scenario import FAULT_KINDS, Fault, node_names

Record = GpuSample | HostSample | IbSample | Event | Step

# Scenario time 0 on the simulated clock (Unix seconds; any fixed value keeps runs identical).
DEFAULT_START = 1_700_000_000.0

FLEET_KINDS: tuple[str, ...] = ("ib_link_down", "ib_flap", "ib_rate_low", "node_silent")
NOISE_KINDS: tuple[str, ...] = ("checkpoint_pause", "dataloader_hiccup", "single_sbe", "idle_gpu", "job_restart")

# ---- STEP NOISE ----------------------------------------------------------------------------------
# Measured on tests/fixtures/alibaba (cluster-trace-gpu-v2020, two 10-worker jobs; one
# point every 10 iterations): per-worker coefficient of variation of the mini-batch time 1.0-2.3 %
# (median 1.5 %) in job 2 and 2.0-3.9 % (median 3.1 %) in job 3 before its late slowdown; lag-1
# autocorrelation of those 10-iteration-apart points 0.53-0.88 (median 0.60) and 0.29-0.64 (median
# 0.41): a slow drift under white noise. Tails: 0.2 % / 0.8 % of points more than 8 % above the
# worker's median, the largest +10 % / +12 %, none above +20 %: occasional moderate spikes, no
# outliers. The workers' medians differ steadily by a CV of 8.4 % (job 2, 20 % GPU shares) and
# 4.2 % (job 3, 25 % shares) with no episode.
# Model: compute = nominal * (1 + offset) * (1 + drift + white + spike), with a drift of
# stationary sd 1.9 % that keeps 0.98 of itself per step (0.98**10 = 0.82) and white noise of sd
# 1.6 %: total CV 2.5 %, lag-10 autocorrelation 0.48; a spike of +6..12 % on 0.4 % of steps.
# Whole dedicated H100/H200 GPUs differ less than shared ones: the steady per-rank offset has sd
# 3 % (clipped at 2.5 sd). What comes out (16 ranks, 1,800 s): per-rank CV 2.4 %, lag-10
# autocorrelation 0.40, 0.26 % of steps > 8 % over the rank's median, the largest +15 %.
# The drift is clipped at 2.5 sd too: the traces' slow wander is bounded (no healthy worker's gap
# to its peers grows by more than 7 %, detectors/straggler_steps.py), while an unbounded Gaussian
# walk, run for 1,000 node-days, sends some healthy rank 5 sd (+9 %) off its own pace for a
# minute: a slowdown as large as a mild real straggler's, which no healthy trace shows.
STEP_DRIFT_SD = 0.019
STEP_DRIFT_KEEP = 0.98
STEP_DRIFT_LIMIT = 2.5 * STEP_DRIFT_SD
STEP_WHITE_SD = 0.016
STEP_SPIKE_PROBABILITY = 0.004
STEP_SPIKE_RANGE = (0.06, 0.12)
RANK_OFFSET_SD = 0.03
# Collectives not hidden behind compute, as a fraction of the compute time of a step.
EXPOSED_COMM_FRACTION = 0.10
# After a (re)start: processes load the checkpoint and set up NCCL before the first step, and the
# first steps are slow (allocator, autotuning, compilation): factor 1 + 2 * exp(-k / 1.5).
LOAD_SECONDS = 10.0
WARMUP_EXTRA = 2.0
WARMUP_STEPS_SCALE = 1.5
# NCCL over InfiniBand retries a lost link for NCCL_IB_RETRY_CNT (7) times 4.096 us * 2**NCCL_IB_TIMEOUT
# (20): ~30 s, then the collective fails and the job aborts.
IB_ABORT_SECONDS = 30.0
# A rank that dies of an application-visible error exits; the launcher tears the job down.
APP_ABORT_SECONDS = 10.0
FATAL_XIDS = frozenset({13, 31, 43, 48, 94, 95})

_IB_NOMINAL_GBPS = 400.0  # 4X NDR, the HCA of HGX H100/H200 nodes (ConnectX-7)
_IB_SLOW_RATE_GBPS = 200.0
_IB_FLAP_PERIOD_SECONDS = 30.0
_IB_FLAP_DURATION_SECONDS = 180.0
_JOB_RESTART_GAP_SECONDS = 60.0
_CHECKPOINT_SECONDS = 20.0
_U8, _U16 = 255, 65535  # PortCounters widths: link_downed/link_error_recovery 8 bits, errors 16

_HOST_MEMORY_BYTES = 2 * 1024**4  # HGX H100 nodes carry 2 TiB
_HOST_DISK_BYTES = 30 * 1000**4


class ScenarioValueError(ValueError):
    """A scenario value the simulator cannot use; the message starts with its key."""


def _fail(key: str, reason: str) -> ScenarioValueError:
    return ScenarioValueError(f"{key}: {reason}")


# ---- reading the scenario ------------------------------------------------------------------------


@overload
def _number(
    table: Mapping[str, Any], key: str, where: str, default: float, *, minimum: float | None = ..., positive: bool = ...
) -> float: ...
@overload
def _number(
    table: Mapping[str, Any],
    key: str,
    where: str,
    default: float | None = ...,
    *,
    minimum: float | None = ...,
    positive: bool = ...,
) -> float | None: ...
def _number(
    table: Mapping[str, Any],
    key: str,
    where: str,
    default: float | None = None,
    *,
    minimum: float | None = None,
    positive: bool = False,
) -> float | None:
    value = table.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, f"must be a number, got {value!r}")
    if positive and not value > 0:
        raise _fail(where, f"must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(where, f"must be >= {minimum:g}, got {value!r}")
    return float(value)


@overload
def _integer(
    table: Mapping[str, Any], key: str, where: str, default: int, *, minimum: int = ..., below: int | None = ...
) -> int: ...
@overload
def _integer(
    table: Mapping[str, Any],
    key: str,
    where: str,
    default: int | None = ...,
    *,
    minimum: int = ...,
    below: int | None = ...,
) -> int | None: ...
def _integer(
    table: Mapping[str, Any],
    key: str,
    where: str,
    default: int | None = None,
    *,
    minimum: int = 0,
    below: int | None = None,
) -> int | None:
    value = table.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"must be an integer, got {value!r}")
    if value < minimum or (below is not None and value >= below):
        bound = f"in {minimum}..{below - 1}" if below is not None else f">= {minimum}"
        raise _fail(where, f"must be {bound}, got {value!r}")
    return value


@overload
def _string(table: Mapping[str, Any], key: str, where: str, default: str) -> str: ...
@overload
def _string(table: Mapping[str, Any], key: str, where: str, default: str | None = ...) -> str | None: ...
def _string(table: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str | None:
    value = table.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise _fail(where, f"must be a non-empty string, got {value!r}")
    return value


def _tables(scenario: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = scenario.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise _fail(key, f"must be an array of tables ([[{key}]])")
    return value


def _flag(table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise _fail(where, f"must be true or false, got {value!r}")
    return value


def _parallelism(item: Mapping[str, Any], where: str, world: int) -> dict[str, Any]:
    """A job's pipeline_stages, tensor_parallel, stage_factors and what its steps report."""
    sizes = {}
    for key in ("pipeline_stages", "tensor_parallel"):
        value = item.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(where + key, f"must be a positive integer, got {value!r}")
        sizes[key] = value
    stages, tp = sizes["pipeline_stages"], sizes["tensor_parallel"]
    if world % (stages * tp):
        raise _fail(
            where + "pipeline_stages",
            f"{stages} stages x {tp} tensor-parallel ranks do not divide the job's {world} ranks",
        )
    factors = item.get("stage_factors", [1.0] * stages)
    if not isinstance(factors, list) or len(factors) != stages or not all(_is_positive_number(f) for f in factors):
        raise _fail(where + "stage_factors", f"must be {stages} positive numbers (one per stage), got {factors!r}")
    hybrid = stages > 1 or tp > 1
    return {
        "pipeline_stages": stages,
        "tensor_parallel": tp,
        "stage_factors": tuple(float(f) for f in factors),
        "report_coordinates": _flag(item, "report_coordinates", where + "report_coordinates", hybrid),
        "report_wall_seconds": _flag(item, "report_wall_seconds", where + "report_wall_seconds", False),
    }


def _is_positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ---- the model's parts ---------------------------------------------------------------------------


@dataclass
class _Job:
    id: str
    ranks: list[tuple[str, int]]  # (node, gpu) in rank order
    step_seconds: float
    report_steps: bool
    begin: float  # absolute; -inf when running since before the fleet's start
    end: float  # absolute; inf when it never ends
    nodes: list[str]
    pauses: list[tuple[float, float]] = field(default_factory=list)
    restarts: list[tuple[float, float]] = field(default_factory=list)  # (processes exit, first step)
    stalls: list[tuple[float, float]] = field(default_factory=list)  # collectives stuck, then resume
    stretches: list[tuple[float, float, float]] = field(default_factory=list)  # slow fabric
    # (rank, at, until, slow steps from `at` on or None for those starting before `until`, factor)
    hiccups: list[tuple[int, float, float, int | None, float]] = field(default_factory=list)
    factors: list[list[tuple[float, float, float]]] = field(default_factory=list)  # per rank
    abort: tuple[float, float] | None = None  # (time steps stop, seconds hung before the GPUs idle)
    # Hybrid parallelism, Megatron's rank order: pipeline stages in contiguous blocks of ranks,
    # tensor-parallel ranks consecutive within a replica. Each stage's compute is its nominal step
    # times its factor (an uneven split of the model).
    pipeline_stages: int = 1
    tensor_parallel: int = 1
    stage_factors: tuple[float, ...] = (1.0,)
    report_coordinates: bool = False  # steps carry dp_rank, pp_stage, tp_rank
    report_wall_seconds: bool = False  # steps carry the step's wall time

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, pp_stage, tp_rank) of `rank`."""
        per_stage = len(self.ranks) // self.pipeline_stages
        within = rank % per_stage
        return within // self.tensor_parallel, rank // per_stage, within % self.tensor_parallel

    def abort_at(self, t: float, hung_seconds: float) -> None:
        if self.abort is None or t < self.abort[0]:
            self.abort = (t, hung_seconds)


@dataclass
class _IbPort:
    device: str
    port: int
    base: dict[str, int]
    downs: list[tuple[float, float, bool]] = field(default_factory=list)  # (begin, end, flap)
    slow: list[tuple[float, float, float]] = field(default_factory=list)  # (begin, end, Gb/s)
    flap_symbol_errors: list[int] = field(default_factory=list)  # per down, for flaps

    def metrics(self, t: float) -> dict[str, Any]:
        down = False
        downed = recovered = 0
        symbols = self.base["ib_symbol_error_total"]
        for i, (begin, end, flap) in enumerate(self.downs):
            if begin <= t:
                downed += 1
                if flap:
                    recovered += 1
                    symbols += self.flap_symbol_errors[i]
                if t < end:
                    down = True
        values: dict[str, Any] = {"ib_state": "DOWN" if down else "ACTIVE"}
        if not down:  # the kernel answers EINVAL for the rate of a port with no link
            rate = _IB_NOMINAL_GBPS
            for begin, end, gbps in self.slow:
                if begin <= t < end:
                    rate = min(rate, gbps)
            values["ib_rate_gbps"] = rate
        values["ib_link_downed_total"] = min(_U8, self.base["ib_link_downed_total"] + downed)
        values["ib_symbol_error_total"] = min(_U16, symbols)
        values["ib_rcv_errors_total"] = min(_U16, self.base["ib_rcv_errors_total"] + 2 * recovered)
        values["ib_link_error_recovery_total"] = min(_U8, self.base["ib_link_error_recovery_total"] + recovered)
        return values


class _Clock:
    """The fleet's simulated clock: every node, fake NVML and NVML source reads it."""

    __slots__ = ("t",)

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _clip(value: float, limit: float) -> float:
    return min(max(value, -limit), limit)


def _pci_bus_id(raw: str) -> str:
    """NVML's "00000000:18:00.0" as the NVML source reports it ("0000:18:00.0")."""
    domain, _, rest = raw.partition(":")
    return f"{int(domain, 16):04x}:{rest.lower()}"


class SimFleet:
    """Nodes of simulated GPUs running synchronous jobs, with faults and noise; see the module doc."""

    def __init__(
        self,
        *,
        nodes: Sequence[str],
        gpus_per_node: int = 8,
        model: str = "H100",
        ib_ports_per_node: int = 1,
        duration_seconds: float = 600.0,
        sample_interval_seconds: float = 1.0,
        seed: int = 0,
        start: float = DEFAULT_START,
        name: str = "",
    ) -> None:
        """An empty fleet; from_scenario() is the usual way to build one."""
        profile_for(model)  # ValueError for an unknown model before anything else
        self.name = name
        self.node_names: list[str] = list(nodes)
        self.gpus_per_node = gpus_per_node
        self.model = model
        self.ib_ports_per_node = ib_ports_per_node
        self.duration_seconds = float(duration_seconds)
        self.sample_interval_seconds = float(sample_interval_seconds)
        self.seed = seed
        self.start = float(start)
        self.end = self.start + self.duration_seconds
        self.jobs: dict[str, _Job] = {}
        self.sims: dict[str, SimNode] = {}
        self._faults: dict[str, list[Fault]] = {n: [] for n in self.node_names}
        self._silent: dict[str, list[tuple[float, float]]] = {n: [] for n in self.node_names}
        self._ib: dict[str, list[_IbPort]] = {}
        self._idle_windows: dict[tuple[str, int], list[tuple[float, float]]] = {}
        self._sbe: list[Fault] = []
        self._steps: list[Step] = []
        self._attribution: dict[tuple[str, int], tuple[str, int]] = {}
        self._host_params: dict[str, tuple[float, float, int, int, float]] = {}

    # ---- building ------------------------------------------------------------------------------

    @classmethod
    def from_scenario(cls, scenario: Mapping[str, Any], *, start: float = DEFAULT_START) -> SimFleet:
        """The fleet a parsed scenario (tests/scenarios/README.md) describes; ValueError names the
        scenario key of the first value it cannot use."""
        if not isinstance(scenario, Mapping):
            raise _fail("scenario", "must be a table")
        fleet_table = scenario.get("fleet", {})
        if not isinstance(fleet_table, Mapping):
            raise _fail("fleet", "must be a table")
        node_count = _integer(fleet_table, "nodes", "fleet.nodes", 1, minimum=1)
        gpus = _integer(fleet_table, "gpus_per_node", "fleet.gpus_per_node", 8, minimum=1)
        model = _string(fleet_table, "model", "fleet.model", "H100")
        try:
            profile_for(model)
        except ValueError as exc:
            raise _fail("fleet.model", str(exc)) from None
        ports = _integer(fleet_table, "ib_ports_per_node", "fleet.ib_ports_per_node", 1)
        duration = _number(scenario, "duration_seconds", "duration_seconds", 600.0, positive=True)
        interval = _number(scenario, "sample_interval_seconds", "sample_interval_seconds", 1.0, positive=True)
        seed = _integer(scenario, "seed", "seed", 0)
        fleet = cls(
            nodes=node_names(node_count),
            gpus_per_node=gpus,
            model=model,
            ib_ports_per_node=ports,
            duration_seconds=duration,
            sample_interval_seconds=interval,
            seed=seed,
            start=start,
            name=str(scenario.get("name", "")),
        )
        fleet._build(scenario)
        return fleet

    def _rng(self, *parts: object) -> random.Random:
        return random.Random(":".join(["fleetwatch-fleet", str(self.seed), *map(str, parts)]))

    def _abs(self, seconds: float) -> float:
        return self.start + seconds

    @overload
    def _node(self, table: Mapping[str, Any], where: str, required: Literal[True] = ...) -> str: ...
    @overload
    def _node(self, table: Mapping[str, Any], where: str, required: bool) -> str | None: ...
    def _node(self, table: Mapping[str, Any], where: str, required: bool = True) -> str | None:
        name = _string(table, "node", where + "node")
        if name is None:
            if required:
                raise _fail(where + "node", "missing")
            return None
        if name not in self._faults:
            raise _fail(
                where + "node", f"unknown node {name!r}; the fleet has {self.node_names[0]}..{self.node_names[-1]}"
            )
        return name

    @overload
    def _gpu(self, table: Mapping[str, Any], where: str, required: Literal[True] = ...) -> int: ...
    @overload
    def _gpu(self, table: Mapping[str, Any], where: str, required: bool) -> int | None: ...
    def _gpu(self, table: Mapping[str, Any], where: str, required: bool = True) -> int | None:
        gpu = _integer(table, "gpu", where + "gpu", below=self.gpus_per_node)
        if gpu is None and required:
            raise _fail(where + "gpu", "missing")
        return gpu

    def _window(
        self, table: Mapping[str, Any], where: str, default_duration: float | None, at_required: bool = True
    ) -> tuple[float, float]:
        at = _number(table, "at_seconds", where + "at_seconds", None if at_required else 0.0, minimum=0)
        if at is None:
            raise _fail(where + "at_seconds", "missing")
        duration = _number(table, "duration_seconds", where + "duration_seconds", default_duration, positive=True)
        begin = self._abs(at)
        return begin, math.inf if duration is None else begin + duration

    def _target(self, table: Mapping[str, Any], where: str) -> tuple[str, int]:
        """(node, gpu) from node/gpu or from job/rank."""
        job_id = _string(table, "job", where + "job")
        rank = _integer(table, "rank", where + "rank")
        if job_id is not None and rank is not None and "node" not in table:
            job = self.jobs.get(job_id)
            if job is None:
                raise _fail(where + "job", f"unknown job {job_id!r}")
            if rank >= len(job.ranks):
                raise _fail(where + "rank", f"job {job_id!r} has ranks 0..{len(job.ranks) - 1}")
            return job.ranks[rank]
        return self._node(table, where), self._gpu(table, where)

    def _build(self, scenario: Mapping[str, Any]) -> None:
        noise = _tables(scenario, "noise")
        # Idle GPUs first: jobs leave them out.
        for i, item in enumerate(noise):
            if item.get("kind") == "idle_gpu":
                where = f"noise[{i}]."
                node = self._node(item, where)
                gpu = self._gpu(item, where, required=False)
                window = self._window(item, where, None, at_required=False)
                for g in range(self.gpus_per_node) if gpu is None else (gpu,):
                    self._idle_windows.setdefault((node, g), []).append(window)
        self._read_jobs(scenario)
        deaths: dict[tuple[str, int], list[tuple[float, float]]] = {}  # (node, gpu) -> (t, hung s)
        for i, item in enumerate(_tables(scenario, "faults")):
            self._read_fault(item, f"faults[{i}].", deaths)
        for i, item in enumerate(noise):
            self._read_noise(item, f"noise[{i}].")
        for job in self.jobs.values():
            for node, gpu in job.ranks:
                for t, hung in deaths.get((node, gpu), ()):
                    if t < job.end:
                        job.abort_at(t, hung)
        # Each job rank's own slowdown windows (throttles, slow_rank) from its node's faults.
        for job in self.jobs.values():
            job.factors = [
                [
                    (self._abs(f.at_seconds), self._abs(f.end_seconds), compute_factor(f))
                    for f in self._faults[node]
                    if f.gpu == gpu and compute_factor(f) != 1.0
                ]
                for node, gpu in job.ranks
            ]
        timelines = self._timelines()
        for name in self.node_names:
            self.sims[name] = SimNode(
                name,
                gpu_count=self.gpus_per_node,
                model=self.model,
                faults=self._faults[name],
                seed=self.seed,
                start=self.start,
                clock=_Clock(self.start),
                activity={
                    g: timelines.get((name, g), ((-math.inf, IDLE_ACTIVITY),)) for g in range(self.gpus_per_node)
                },
            )
        reporting = [steps for steps in (self._simulate_steps(job) for job in self.jobs.values()) if steps]
        for steps in reporting:
            self._steps.extend(steps)
        if len(reporting) > 1:  # one job's steps come in (t, rank) order already
            self._steps.sort(key=lambda s: (s.t, s.job, s.rank))
        for name in self.node_names:
            rng = self._rng("host", name)
            self._host_params[name] = (
                rng.uniform(18.0, 30.0),
                rng.uniform(1.0, 3.0),
                rng.randint(10**12, 10**14),
                rng.randint(10**12, 10**14),
                rng.uniform(0.2, 0.6),
            )

    def _read_jobs(self, scenario: Mapping[str, Any]) -> None:
        taken: dict[tuple[str, int], str] = {}
        for i, item in enumerate(_tables(scenario, "jobs")):
            where = f"jobs[{i}]."
            job_id = _string(item, "id", where + "id")
            if job_id is None:
                raise _fail(where + "id", "missing")
            if job_id in self.jobs:
                raise _fail(where + "id", f"job id {job_id!r} is used twice")
            nodes = item.get("nodes")
            if not isinstance(nodes, list) or not nodes:
                raise _fail(where + "nodes", "must be a non-empty array of node names")
            for n, name in enumerate(nodes):
                if name not in self._faults:
                    raise _fail(
                        f"{where}nodes[{n}]",
                        f"unknown node {name!r}; the fleet has {self.node_names[0]}..{self.node_names[-1]}",
                    )
            step = _number(item, "step_seconds", where + "step_seconds", 1.0, positive=True)
            report = _flag(item, "report_steps", where + "report_steps", True)
            begin_s = _number(item, "start_seconds", where + "start_seconds", 0.0, minimum=0)
            end_s = _number(item, "end_seconds", where + "end_seconds", None, minimum=0)
            if end_s is not None and end_s <= begin_s:
                raise _fail(where + "end_seconds", "must be after start_seconds")
            ranks = [(n, g) for n in nodes for g in range(self.gpus_per_node) if (n, g) not in self._idle_windows]
            for rank in ranks:
                if rank in taken:
                    raise _fail(where + "nodes", f"{rank[0]} GPU {rank[1]} is already in job {taken[rank]!r}")
                taken[rank] = job_id
            self.jobs[job_id] = _Job(
                id=job_id,
                ranks=ranks,
                step_seconds=step,
                report_steps=report,
                begin=-math.inf if not begin_s else self._abs(begin_s),
                end=math.inf if end_s is None else self._abs(end_s),
                nodes=list(dict.fromkeys(nodes)),
                **_parallelism(item, where, len(ranks)),
            )
            for rank_index, rank in enumerate(ranks):
                self._attribution[rank] = (job_id, rank_index)

    def _jobs_on(self, node: str) -> list[_Job]:
        return [job for job in self.jobs.values() if node in job.nodes]

    def _read_fault(self, item: Mapping[str, Any], where: str, deaths: dict) -> None:
        kind = _string(item, "kind", where + "kind")
        if kind is None:
            raise _fail(where + "kind", "missing")
        if kind in FLEET_KINDS:
            self._read_fleet_fault(kind, item, where)
            return
        if kind not in FAULT_KINDS:
            raise _fail(where + "kind", f"unknown fault kind {kind!r}; kinds: {', '.join(FAULT_KINDS + FLEET_KINDS)}")
        node, gpu = self._target(item, where)
        at = _number(item, "at_seconds", where + "at_seconds", minimum=0)
        if at is None:
            raise _fail(where + "at_seconds", "missing")
        try:
            fault = Fault(
                kind=kind,
                gpu=gpu,
                at_seconds=at,
                xid=_integer(item, "xid", where + "xid", minimum=1),
                duration_seconds=_number(item, "duration_seconds", where + "duration_seconds", positive=True),
                link=_integer(item, "link", where + "link", 0),
                rate_per_second=_number(item, "rate_per_second", where + "rate_per_second", positive=True),
                pcie_gen=_integer(item, "pcie_gen", where + "pcie_gen", 4, minimum=1),
                pcie_width=_integer(item, "pcie_width", where + "pcie_width", 8, minimum=1),
                factor=_number(item, "factor", where + "factor", minimum=1.0),
            )
        except ValueError as exc:
            raise _fail(where.rstrip("."), str(exc)) from None
        if kind == "retired_pages" and "nvmlDeviceGetRetiredPages" in profile_for(self.model).not_supported:
            raise _fail(
                where + "kind",
                f"retired_pages needs a board that retires pages (pre-Ampere); "
                f"{self.model} remaps rows instead: use row_remap_pending",
            )
        self._faults[node].append(fault)
        begin = self._abs(at)
        if kind in ("gpu_lost", "gpu_missing"):
            deaths.setdefault((node, gpu), []).append((begin, NCCL_TIMEOUT_SECONDS))
        elif (fault.effective_xid in FATAL_XIDS) or kind == "ecc_dbe":
            deaths.setdefault((node, gpu), []).append((begin, APP_ABORT_SECONDS))

    def _ib_port(self, node: str, item: Mapping[str, Any], where: str) -> _IbPort:
        ports = self._ib_ports(node)
        if not ports:
            raise _fail(where + "node", f"{node} has no InfiniBand ports (fleet.ib_ports_per_node = 0)")
        index = _integer(item, "port", where + "port", 0, below=len(ports))
        return ports[index]

    def _ib_ports(self, node: str) -> list[_IbPort]:
        if node not in self._ib:
            rng = self._rng("ib", node)
            self._ib[node] = [
                _IbPort(
                    f"mlx5_{i}",
                    1,
                    {
                        "ib_link_downed_total": rng.choice((0, 0, 1)),  # the link trained once at boot
                        "ib_symbol_error_total": rng.choice((0, 0, 0, 1, 3)),
                        "ib_rcv_errors_total": 0,
                        "ib_link_error_recovery_total": 0,
                    },
                )
                for i in range(self.ib_ports_per_node)
            ]
        return self._ib[node]

    def _read_fleet_fault(self, kind: str, item: Mapping[str, Any], where: str) -> None:
        node = self._node(item, where)
        assert node is not None
        if kind == "node_silent":
            self._silent[node].append(self._window(item, where, None))
            return
        port = self._ib_port(node, item, where)
        multi_node_jobs = [job for job in self._jobs_on(node) if len(job.nodes) > 1]
        if kind == "ib_rate_low":
            begin, end = self._window(item, where, None)
            gbps = _number(item, "rate_gbps", where + "rate_gbps", _IB_SLOW_RATE_GBPS, positive=True)
            port.slow.append((begin, end, gbps))
            # The collectives through this port move data at gbps instead of the nominal rate.
            stretch = 1.0 + EXPOSED_COMM_FRACTION * max(0.0, _IB_NOMINAL_GBPS / gbps - 1.0)
            for job in multi_node_jobs:
                job.stretches.append((begin, end, stretch))
            return
        if kind == "ib_link_down":
            begin, end = self._window(item, where, None)
            downs = [(begin, end)]
        else:  # ib_flap
            begin, end = self._window(item, where, _IB_FLAP_DURATION_SECONDS)
            period = _number(item, "period_seconds", where + "period_seconds", None, positive=True)
            count = _integer(item, "count", where + "count", None, minimum=1)
            span = min(end, self.end) - begin
            if count is None:
                count = max(1, int(span // (period or _IB_FLAP_PERIOD_SECONDS)))
            period = period or max(span / count, 1.0)
            rng = self._rng("flap", node, port.device, begin)
            downs = []
            for k in range(count):
                down_at = begin + k * period + rng.uniform(0.0, min(3.0, period / 4))
                downs.append((down_at, down_at + rng.uniform(2.0, min(6.0, period / 2))))
        for down_begin, down_end in downs:
            port.downs.append((down_begin, down_end, kind == "ib_flap"))
            port.flap_symbol_errors.append(
                self._rng("flap-symbols", node, down_begin).randint(20, 400) if kind == "ib_flap" else 0
            )
            for job in multi_node_jobs:
                if down_end - down_begin > IB_ABORT_SECONDS:
                    job.abort_at(down_begin, IB_ABORT_SECONDS)
                else:
                    job.stalls.append((down_begin, down_end))
        order = sorted(range(len(port.downs)), key=lambda i: port.downs[i][0])
        port.downs = [port.downs[i] for i in order]
        port.flap_symbol_errors = [port.flap_symbol_errors[i] for i in order]

    def _noise_jobs(self, item: Mapping[str, Any], where: str, node: str | None) -> list[_Job]:
        job_id = _string(item, "job", where + "job")
        if job_id is not None:
            if job_id not in self.jobs:
                raise _fail(where + "job", f"unknown job {job_id!r}")
            return [self.jobs[job_id]]
        return self._jobs_on(node) if node is not None else list(self.jobs.values())

    def _read_noise(self, item: Mapping[str, Any], where: str) -> None:
        kind = _string(item, "kind", where + "kind")
        if kind is None:
            raise _fail(where + "kind", "missing")
        if kind not in NOISE_KINDS:
            raise _fail(where + "kind", f"unknown noise kind {kind!r}; kinds: {', '.join(NOISE_KINDS)}")
        if kind == "idle_gpu":
            return  # read first, before the jobs
        node = self._node(item, where, required=False)
        if kind == "single_sbe":
            if node is None or "gpu" not in item:
                rng = self._rng("sbe", where)
                node = node or rng.choice(self.node_names)
                gpu = rng.randrange(self.gpus_per_node)
            else:
                gpu = self._gpu(item, where)
            at = _number(item, "at_seconds", where + "at_seconds", 0.0, minimum=0)
            self._faults[node].append(Fault("single_sbe", gpu, at))
            return
        jobs = self._noise_jobs(item, where, node)
        if kind == "checkpoint_pause":
            begin, end = self._window(item, where, _CHECKPOINT_SECONDS)
            for job in jobs:
                job.pauses.append((begin, end))
        elif kind == "job_restart":
            begin, end = self._window(item, where, _JOB_RESTART_GAP_SECONDS)
            for job in jobs:
                job.restarts.append((begin, end + LOAD_SECONDS))
        else:  # dataloader_hiccup
            hiccup_at = _number(item, "at_seconds", where + "at_seconds", minimum=0)
            if hiccup_at is None:
                raise _fail(where + "at_seconds", "missing")
            duration = _number(item, "duration_seconds", where + "duration_seconds", None, positive=True)
            count = _integer(item, "count", where + "count", None, minimum=1)
            rng = self._rng("hiccup", where)
            factor = _number(item, "factor", where + "factor", None, minimum=1.0) or rng.uniform(2.0, 4.0)
            targets: list[tuple[_Job, int]] = []
            if node is not None and "gpu" in item:
                gpu = self._gpu(item, where)
                targets = [(job, job.ranks.index((node, gpu))) for job in jobs if (node, gpu) in job.ranks]
            elif "rank" in item:
                only_rank = _integer(item, "rank", where + "rank")
                if only_rank is None:  # present but null
                    raise _fail(where + "rank", "missing")
                targets = [(job, only_rank) for job in jobs if only_rank < len(job.ranks)]
            else:
                targets = [(job, rng.randrange(len(job.ranks))) for job in jobs if job.ranks]
            begin = self._abs(hiccup_at)
            for job, rank in targets:
                # `count` slow steps from `at` on; or, given only a duration, those that start in it.
                steps: int | None
                if count is None and duration is not None:
                    steps, until = None, begin + duration
                else:
                    steps = count if count is not None else 1
                    until = begin + steps * job.step_seconds * factor * (1.0 + EXPOSED_COMM_FRACTION)
                job.hiccups.append((rank, begin, until, steps, factor))

    # ---- the jobs' timelines -------------------------------------------------------------------

    def _job_overrides(self, job: _Job) -> list[tuple[float, float, Activity]]:
        """Job-wide activity windows, later ones winning (see synchronous_job_activity)."""
        overrides: list[tuple[float, float, Activity]] = []
        if job.begin > -math.inf:
            overrides += [(-math.inf, job.begin, IDLE_ACTIVITY), (job.begin, job.begin + LOAD_SECONDS, PAUSED)]
        overrides += [(b, e, PAUSED) for b, e in job.pauses]
        overrides += [(b, e, HUNG) for b, e in job.stalls]
        for exit_at, first_step in job.restarts:
            loading = first_step - LOAD_SECONDS
            overrides += [(exit_at, loading, IDLE_ACTIVITY), (loading, first_step, PAUSED)]
        if job.abort is not None:
            died, hung = job.abort
            overrides += [(died, died + hung, HUNG), (died + hung, math.inf, IDLE_ACTIVITY)]
        if job.end < math.inf:
            overrides.append((job.end, math.inf, IDLE_ACTIVITY))
        return overrides

    def _timelines(self) -> dict[tuple[str, int], list[tuple[float, Activity]]]:
        timelines: dict[tuple[str, int], list[tuple[float, Activity]]] = {}
        for job in self.jobs.values():
            factors = [list(rank_factors) for rank_factors in job.factors]
            for rank, begin, until, _, factor in job.hiccups:
                factors[rank].append((begin, until, factor))
            per_rank = synchronous_job_activity(factors, self._job_overrides(job), job.stretches)
            timelines.update(zip(job.ranks, per_rank))
        for (node, gpu), windows in self._idle_windows.items():
            # Outside its idle windows the GPU runs someone's unnamed work if its node hosts a job.
            outside = RUNNING if self._jobs_on(node) else IDLE_ACTIVITY
            timeline: list[tuple[float, Activity]] = [(-math.inf, outside)]
            for begin, end in sorted(windows):
                timeline += [(begin, IDLE_ACTIVITY), (end, outside)]
            timelines[(node, gpu)] = [(t, a) for t, a in timeline if t < math.inf]
        return timelines

    # ---- steps ---------------------------------------------------------------------------------

    def _simulate_steps(self, job: _Job) -> list[Step]:
        """Every rank's step reports, step by step: each step lasts as long as the slowest rank's
        compute plus the exposed collectives; `seconds` is the rank's own compute time."""
        if not job.report_steps or not job.ranks:
            return []
        rng = self._rng("steps", job.id)
        count = len(job.ranks)
        offsets = [
            1.0 + min(max(rng.gauss(0.0, RANK_OFFSET_SD), -2.5 * RANK_OFFSET_SD), 2.5 * RANK_OFFSET_SD)
            for _ in range(count)
        ]
        drifts = [_clip(rng.gauss(0.0, STEP_DRIFT_SD), STEP_DRIFT_LIMIT) for _ in range(count)]
        drift_step_sd = STEP_DRIFT_SD * math.sqrt(1.0 - STEP_DRIFT_KEEP**2)
        if job.begin == -math.inf:  # running since before the fleet's start: warm, mid-training
            t = self.start - rng.uniform(0.0, job.step_seconds)
            step = rng.randrange(2_000, 40_000)
            warm = None
        else:
            t = job.begin + LOAD_SECONDS
            step, warm = 0, 0
        checkpoint_step = step
        limit = min(job.end, self.end)
        if job.abort is not None:
            limit = min(limit, job.abort[0])
        restarts = sorted(job.restarts)
        pauses = sorted(job.pauses)
        stalls = sorted(job.stalls)
        hiccups = [(rank, begin, until, factor) for rank, begin, until, _, factor in job.hiccups]
        steps_left = [left for _, _, _, left, _ in job.hiccups]  # None: slow by time, not by count
        nodes_gpus = job.ranks
        job_id = job.id
        silent = {node: self._silent[node] for node, _ in nodes_gpus if self._silent[node]}
        gauss, uniform, random_ = rng.gauss, rng.uniform, rng.random
        keep, drift_limit = STEP_DRIFT_KEEP, STEP_DRIFT_LIMIT
        spike_low, spike_high = STEP_SPIKE_RANGE
        # Each rank's nominal compute time (the product's first factor, as below it always was).
        nominal = [job.step_seconds * offset for offset in offsets]
        if job.pipeline_stages > 1:
            nominal = [n * job.stage_factors[job.coordinates(r)[1]] for r, n in enumerate(nominal)]
        places: list[tuple[int | None, int | None, int | None]] = [(None, None, None)] * count
        if job.report_coordinates:
            places = [job.coordinates(r) for r in range(count)]
        report_wall = job.report_wall_seconds
        slowed = [r for r in range(count) if job.factors[r]]  # ranks with slowdown windows
        out: list[Step] = []
        while t < limit:
            drifts = [min(max(keep * drift + gauss(0.0, drift_step_sd), -drift_limit), drift_limit) for drift in drifts]
            whites = [gauss(0.0, STEP_WHITE_SD) for _ in range(count)]
            spikes = [
                uniform(spike_low, spike_high) if random_() < STEP_SPIKE_PROBABILITY else 0.0 for _ in range(count)
            ]
            warmup = 1.0 if warm is None else 1.0 + WARMUP_EXTRA * math.exp(-warm / WARMUP_STEPS_SCALE)
            # A factor of 1.0 leaves a product as it is: only the slowed ranks multiply by theirs.
            own = [n * max(0.85, 1.0 + d + w + sp) * warmup for n, d, w, sp in zip(nominal, drifts, whites, spikes)]
            for r in slowed:
                factor = 1.0
                for begin, end, f in job.factors[r]:
                    if begin <= t < end:
                        factor *= f
                own[r] = nominal[r] * max(0.85, 1.0 + drifts[r] + whites[r] + spikes[r]) * factor * warmup
            for hiccup_index, (slow_rank, slow_from, slow_until, slow_factor) in enumerate(hiccups):
                left = steps_left[hiccup_index]
                if left is None:
                    if slow_from <= t < slow_until:
                        own[slow_rank] *= slow_factor
                elif left > 0 and t >= slow_from:
                    own[slow_rank] *= slow_factor
                    steps_left[hiccup_index] = left - 1
            wall = max(own) * (1.0 + EXPOSED_COMM_FRACTION)
            for begin, end, stretch in job.stretches:
                if begin <= t < end:
                    wall *= stretch
            checkpointed = False
            for begin, end in pauses:
                if t <= begin < t + wall:
                    extra = end - begin
                    own = [o + extra for o in own]
                    wall += extra
                    checkpointed = True
            for begin, end in stalls:
                if begin < t + wall and end > t:
                    wall += end - max(begin, t)
            done = t + wall
            restart = next(((b, first) for b, first in restarts if t <= b < done), None)
            if restart is not None:  # the processes exit mid-step: that step never completes
                t, step, warm = restart[1], checkpoint_step, 0
                continue
            if done > limit:
                break
            if done >= self.start:
                # A silent node's agent sends nothing, its step reports included.
                quiet = {node for node, windows in silent.items() if any(b <= done < e for b, e in windows)}
                # Steps by position (t, job, rank, node, step, seconds, gpu): a frozen dataclass
                # takes keywords a third slower, for every rank's every step.
                if report_wall or places[0][0] is not None:
                    wall_seconds = round(wall, 4) if report_wall else None
                    out += [
                        Step(done, job_id, r, node, step, round(own[r], 4), gpu, *places[r], wall_seconds)
                        for r, (node, gpu) in enumerate(nodes_gpus)
                        if node not in quiet
                    ]
                else:
                    out += [
                        Step(done, job_id, r, node, step, round(own[r], 4), gpu)
                        for r, (node, gpu) in enumerate(nodes_gpus)
                        if node not in quiet
                    ]
            if checkpointed:
                checkpoint_step = step + 1
            t = done
            step += 1
            if warm is not None:
                warm += 1
        return out

    # ---- records -------------------------------------------------------------------------------

    def ranks(self, job_id: str) -> list[tuple[str, int]]:
        """The (node, gpu) of each rank of `job_id`, in rank order."""
        return list(self.jobs[job_id].ranks)

    def silent(self, node: str, t: float) -> bool:
        return any(begin <= t < end for begin, end in self._silent[node])

    def _events(self) -> list[Event]:
        events = []
        for name, sim in self.sims.items():
            for xid in sim.xid_events:
                if self.start <= xid.time < self.end and not self.silent(name, xid.time):
                    gpu = sim.gpus[xid.gpu]
                    events.append(
                        Event(
                            t=xid.time,
                            node=name,
                            kind="xid",
                            gpu=xid.gpu,
                            xid=xid.xid,
                            pci_bus_id=_pci_bus_id(gpu.pci_bus_id),
                            uuid=gpu.uuid,
                            source="nvml",
                        )
                    )
        events.sort(key=lambda e: (e.t, e.node, e.gpu))
        return events

    def _host(self, name: str, t: float, busy: float | None = None) -> HostSample:
        """`busy`: the fraction of the node's GPUs not idle at t, where the caller knows it."""
        sim = self.sims[name]
        cpu_busy, cpu_idle, rx_base, tx_base, mem_fraction = self._host_params[name]
        if busy is None:
            busy = sum(1 for g in range(sim.gpu_count) if sim.mode(g, t) != IDLE) / sim.gpu_count
        elapsed = t - self.start
        wobble = math.sin(elapsed / 37.0 + cpu_busy) * 2.0
        net_rate = 2.0e8 * busy + 1.0e5  # bytes/s of the front-end network: data, logs, metrics
        return HostSample(
            t=t,
            node=name,
            metrics={
                "cpu_percent": round(cpu_idle + busy * cpu_busy + wobble * busy, 2),
                "load1": round(0.5 + busy * cpu_busy * 1.6, 2),
                "mem_used_bytes": int(_HOST_MEMORY_BYTES * (0.03 + busy * mem_fraction)),
                "mem_total_bytes": _HOST_MEMORY_BYTES,
                "disk_used_bytes": int(_HOST_DISK_BYTES * 0.41),
                "disk_total_bytes": _HOST_DISK_BYTES,
                "net_rx_bytes_total": rx_base + int(net_rate * elapsed),
                "net_tx_bytes_total": tx_base + int(net_rate * 0.3 * elapsed),
            },
        )

    def records(self) -> Iterator[Record]:
        """Every record of the run in time order (samples of one tick share its time)."""
        clock = _Clock(self.start)
        for sim in self.sims.values():
            sim.clock = clock
        sources: dict[str, NvmlSource] = {}
        restarts: dict[str, list[float]] = {}
        for name, sim in self.sims.items():
            source = NvmlSource(make_fake_nvml(sim), clock=clock)
            source.start()
            sources[name] = source
            # The agent re-initialises NVML when a GPU goes missing or comes back (driver reload).
            restarts[name] = sorted(
                {
                    t
                    for g in range(sim.gpu_count)
                    for b, e in sim.missing_windows(g)
                    for t in (b, e)
                    if self.start < t < self.end
                }
            )
        for name in self.node_names:
            self._ib_ports(name)
        pending: list[Event | Step] = sorted([*self._events(), *self._steps], key=lambda r: r.t)
        next_pending = 0
        ticks = max(1, math.ceil(self.duration_seconds / self.sample_interval_seconds - 1e-9))
        attribution = self._attribution
        try:
            for tick in range(ticks):
                now = self.start + tick * self.sample_interval_seconds
                clock.t = now
                while next_pending < len(pending) and pending[next_pending].t <= now:
                    yield pending[next_pending]
                    next_pending += 1
                for name in self.node_names:
                    if self._silent[name] and self.silent(name, now):
                        continue
                    sim = self.sims[name]
                    while restarts[name] and restarts[name][0] <= now:
                        restarts[name].pop(0)
                        sources[name].close()
                        sources[name] = NvmlSource(make_fake_nvml(sim), clock=clock)
                        sources[name].start()
                    yield self._host(name, now)
                    samples, events = sources[name].sample()
                    for event in events:
                        yield Event(
                            t=event["t"],
                            node=name,
                            kind=event["kind"],
                            gpu=event.get("gpu"),
                            xid=event.get("xid"),
                            pci_bus_id=event.get("pci_bus_id"),
                            uuid=event.get("uuid"),
                            message=event.get("message", ""),
                            source=event.get("source"),
                        )
                    for sample in samples:
                        gpu = sample["gpu"]
                        job, rank = attribution.get((name, gpu), (None, None))
                        if job is not None and sim.mode(gpu, now) == IDLE:
                            job = rank = None
                        yield GpuSample(
                            t=sample["t"],
                            node=name,
                            gpu=gpu,
                            metrics=sample["metrics"],
                            uuid=sample["uuid"],
                            job=job,
                            rank=rank,
                        )
                    for port in self._ib[name]:
                        yield IbSample(t=now, node=name, device=port.device, port=port.port, metrics=port.metrics(now))
            while next_pending < len(pending) and pending[next_pending].t < self.end:
                yield pending[next_pending]
                next_pending += 1
        finally:
            for source in sources.values():
                source.close()

    def batches(self) -> Iterator[Record | GpuRows]:
        """records() with each node's GPU samples of a tick as one GpuRows (rows in GPU_FIELDS
        order): the same samples and events, in the same order, computed in bulk by the
        simulator's fast path (fleetwatch.sim.rows) instead of through the NVML source. Falls back
        to records() where this pynvml sends the NVML source down routes the fast path does not
        model (rows.supported)."""
        if not all(rows.supported(sim) for sim in self.sims.values()):
            yield from self.records()
            return
        ticks = max(1, math.ceil(self.duration_seconds / self.sample_interval_seconds - 1e-9))
        times = self.start + np.arange(ticks) * self.sample_interval_seconds
        samplers: dict[str, rows.NodeRows] = {}
        restarts: dict[str, list[float]] = {}
        for name, sim in self.sims.items():
            attribution = [self._attribution.get((name, gpu), (None, None)) for gpu in range(sim.gpu_count)]
            samplers[name] = rows.NodeRows(name, sim, times, attribution)
            restarts[name] = sorted(
                {
                    t
                    for g in range(sim.gpu_count)
                    for b, e in sim.missing_windows(g)
                    for t in (b, e)
                    if self.start < t < self.end
                }
            )
        for name in self.node_names:
            self._ib_ports(name)
        pending: list[Event | Step] = sorted([*self._events(), *self._steps], key=lambda r: r.t)
        next_pending = 0
        for tick in range(ticks):
            # The same times as records(): start + tick * interval, added up the same way.
            now = self.start + tick * self.sample_interval_seconds
            while next_pending < len(pending) and pending[next_pending].t <= now:
                yield pending[next_pending]
                next_pending += 1
            for name in self.node_names:
                if self._silent[name] and self.silent(name, now):
                    continue
                sampler = samplers[name]
                node_restarts = restarts[name]
                if node_restarts and node_restarts[0] <= now:
                    while node_restarts and node_restarts[0] <= now:
                        node_restarts.pop(0)
                    sampler.restart(tick)
                yield self._host(name, now, sampler.busy_fraction(tick))
                events, gpu_rows = sampler.sample(tick)
                yield from events
                if gpu_rows is not None:
                    yield gpu_rows
                for port in self._ib[name]:
                    yield IbSample(t=now, node=name, device=port.device, port=port.port, metrics=port.metrics(now))
        while next_pending < len(pending) and pending[next_pending].t < self.end:
            yield pending[next_pending]
            next_pending += 1


def generate(scenario: Mapping[str, Any]) -> list[Record]:
    """All of a scenario's records as a list (convenience for tests and tools)."""
    return list(SimFleet.from_scenario(scenario).records())


__all__ = ["DEFAULT_START", "FLEET_KINDS", "NOISE_KINDS", "IbSample", "Record", "SimFleet", "generate", "node_names"]
