"""A simulated GPU node running synchronous training jobs, with typed faults, as a function of time.

Nothing runs in the background: every reading is computed from `clock()` at query time, so a
given seed, fault list, workload and time always give the same values. The fake NVML
(fake_nvml.py) turns these readings into pynvml's shapes and units.

The workload model: what each GPU does is a piecewise-constant `Activity` over time. Busy GPUs run
training steps at ~95-100 % utilisation; their power is a base near the capture's load draw plus
slow swings (a few sinusoids, so energy integrates exactly and stays monotone); the SM clock sits
at its boost maximum unless the power cap trims it; the core temperature is the power passed
through a first-order thermal filter (time constant ~1 minute). A data-parallel job is
synchronous: every rank waits for the slowest at every step. A GPU that slows down (thermal
slowdown, power brake, HW slowdown) or a rank that computes slower (slow_rank) drags its peers,
which then wait in collectives: same utilisation (NCCL kernels keep the GPU busy), full clock,
less power. A job's PCIe input follows its pace, as a smooth rate whose exact integral is the
cumulative byte counter. Idle GPUs (no process) draw the capture's idle power at the idle clock
with the GpuIdle clock event reason, and their PCIe link drops to Gen1 to save power.

By default a node runs one job on all its GPUs for ever (`synchronous_job_activity` over its own
faults); fleetwatch.sim.fleet passes each GPU's activity for jobs that span nodes. Each GPU runs one
training worker process by default (SimNode(processes=...) or place_processes() changes that),
for job attribution; an idle GPU lists none.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from fleetwatch.nvml_bits import GPU_IDLE, HW_POWER_BRAKE_SLOWDOWN, HW_SLOWDOWN, HW_THERMAL_SLOWDOWN, SW_POWER_CAP
from fleetwatch.sim.profiles import GpuProfile, profile_for
from fleetwatch.sim.scenario import (
    DEFAULT_NVLINK_CRC_FLITS_PER_SECOND,
    DEFAULT_PCIE_REPLAYS_PER_SECOND,
    DEFAULT_SBE_PER_SECOND,
    DEFAULT_SLOW_RANK_FACTOR,
    Fault,
)

# PCI buses of the eight GPUs on an HGX H100/H200 baseboard, in NVML index order.
HGX_PCI_BUSES: tuple[int, ...] = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)

# The job started this long before the node's start, so temperatures have mostly settled.
_WARM_SECONDS = 180.0
# Hopper moves the SM clock in 15 MHz bins (1980, 1965, 1950, ... in nvidia-smi output).
_CLOCK_BIN_MHZ = 15
# Power draw above this fraction of the limit makes the firmware trim the clock (SW power cap).
_POWER_CAP_FRACTION = 0.955
# A synchronous peer of a slowed GPU waits in collectives: its power scales towards this floor.
_PEER_WAIT_POWER_FLOOR = 0.55
# Seconds over which the core heats up to the slowdown threshold before a thermal fault trips.
_THERMAL_RAMP_SECONDS = 30.0
_THERMAL_COOL_SECONDS = 20.0
# A GPU whose job's processes hold it without work (checkpoint): a little above idle draw.
_PAUSE_POWER_OVER_IDLE = 1.5
# A job whose rank died hangs in its collectives until NCCL's watchdog kills it (PyTorch's
# default process-group timeout is 10 minutes); its GPUs then go idle.
NCCL_TIMEOUT_SECONDS = 600.0
# Idle boards let their PCIe link fall to Gen1 (2.5 GT/s) to save power; it retrains to its
# maximum under load.
_IDLE_PCIE_GEN = 1

# Per-kind effect of the slowdown faults: (SM clock ratio, power ratio, clock event reason bits).
# NVML sets HW slowdown together with its cause where the GPU knows it (HW thermal slowdown, HW
# power brake); hw_slowdown is HW slowdown alone (the board's external slowdown input, e.g. a PSU
# or baseboard alarm).
_SLOWDOWN_EFFECT: dict[str, tuple[float, float, int]] = {
    "thermal_slowdown": (0.5, 0.5, HW_SLOWDOWN | HW_THERMAL_SLOWDOWN),
    "power_brake": (0.45, 0.4, HW_SLOWDOWN | HW_POWER_BRAKE_SLOWDOWN),
    "hw_slowdown": (0.55, 0.5, HW_SLOWDOWN),
}

# NVLink error counters, in the order of pynvml's NVML_NVLINK_ERROR_DL_* constants.
NVLINK_COUNTERS: tuple[str, ...] = ("replay", "recovery", "crc_flit", "crc_data")
# How fast each counter climbs relative to the fault's CRC flit rate.
_NVLINK_COUNTER_SHARE = {"crc_flit": 1.0, "crc_data": 0.25, "replay": 0.5, "recovery": 0.01}

_MASK64 = (1 << 64) - 1

# PCIe traffic of a training job (input batches in, a little out) swings with the data pipeline;
# the swing is smooth so the byte counters integrate exactly and never run backwards.
_PCIE_SWING_FRACTION = 0.4
_BYTES_PER_KB = 1024  # NVML's PCIe throughput unit is KB of 1024 bytes

# Linux pids of the training processes: torchrun / srun start one worker per GPU in rank order,
# so the workers' pids are close together; default pid_max on 64-bit systemd hosts is 4194304.
_PID_MIN = 10_000
_PID_SPAN = 3_000_000


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread hash for deterministic per-step noise."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _unit(key: int, i: int) -> float:
    """Deterministic noise in [0, 1) for stream `key` at integer step `i`."""
    return _mix64(key ^ ((i * 0xD1B54A32D192ED03) & _MASK64)) / 18446744073709551616.0


# ---- workload ------------------------------------------------------------------------------------

BUSY = "busy"  # running its job's steps: computing, or waiting in collectives for a slower peer
HANG = "hang"  # its job is stuck in a collective (a rank died, the fabric is down): NCCL spins
PAUSE = "pause"  # the job's processes hold the GPU but give it no work (a checkpoint being written)
IDLE = "idle"  # no process on the GPU
MODES = (BUSY, HANG, PAUSE, IDLE)


@dataclass(frozen=True, slots=True)
class Activity:
    """What a GPU does over an interval.

    `busy`: the fraction of each step the GPU computes; the rest of the step it waits in
    collectives for the slowest rank (1.0 for the slowest rank itself). `pace`: the job's step
    rate relative to a healthy job (0.5: steps take twice as long); its input over PCIe follows it.
    """

    mode: str = BUSY
    busy: float = 1.0
    pace: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"activity mode {self.mode!r} not in {MODES}")


RUNNING = Activity()
IDLE_ACTIVITY = Activity(IDLE, 0.0, 0.0)
PAUSED = Activity(PAUSE, 0.0, 0.3)  # a checkpoint copies the model out over PCIe
HUNG = Activity(HANG, 0.0, 0.0)

# One GPU's activity over time: (time it begins, activity), sorted; the first holds from the start
# of time, each holds until the next.
Timeline = Sequence[tuple[float, Activity]]


def fault_effect(fault: Fault) -> tuple[float, float, int]:
    """(SM clock ratio, power ratio, clock event reason bits) of a slowdown fault."""
    clock, power, reasons = _SLOWDOWN_EFFECT[fault.kind]
    if fault.factor is not None:
        new_clock = 1.0 / fault.factor
        power = min(1.0, max(0.2, power * new_clock / clock))
        clock = new_clock
    return clock, power, reasons


def compute_factor(fault: Fault) -> float:
    """How many times longer a rank's own compute takes while `fault` holds (1: not at all)."""
    if fault.kind in _SLOWDOWN_EFFECT:
        return 1.0 / fault_effect(fault)[0]
    if fault.kind == "slow_rank":
        return fault.factor if fault.factor is not None else DEFAULT_SLOW_RANK_FACTOR
    return 1.0


def _windows_edges(windows: Iterable[tuple[float, float]]) -> set[float]:
    return {edge for begin, end in windows for edge in (begin, end) if math.isfinite(edge)}


def synchronous_job_activity(
    factors: Sequence[Sequence[tuple[float, float, float]]],
    overrides: Sequence[tuple[float, float, Activity]] = (),
    step_multipliers: Sequence[tuple[float, float, float]] = (),
) -> list[list[tuple[float, Activity]]]:
    """Each rank's timeline in one synchronous data-parallel job.

    `factors`: per rank, windows (begin, end, f) where its own compute takes f times longer (a
    throttled clock, a slow data loader); overlapping windows multiply. Every step lasts as long as
    the slowest rank's compute (times the product of the job-wide `step_multipliers` holding then,
    e.g. a slow fabric stretching the collectives), so a rank with factor f computes for f / (F * m)
    of each step and waits the rest. `overrides` (begin, end, activity) replace that for the whole
    job (a pause, a hang, the job not running); a later override wins over an earlier one.
    """
    edges = _windows_edges((b, e) for rank in factors for b, e, _ in rank)
    edges |= _windows_edges((b, e) for b, e, _ in overrides)
    edges |= _windows_edges((b, e) for b, e, _ in step_multipliers)
    ordered = sorted(edges)
    if ordered:
        probes = [ordered[0] - 1.0, *((a + b) / 2 for a, b in zip(ordered, ordered[1:])), ordered[-1] + 1.0]
        starts = [-math.inf, *ordered]
    else:
        probes, starts = [0.0], [-math.inf]
    timelines: list[list[tuple[float, Activity]]] = [[] for _ in factors]
    for start, probe in zip(starts, probes):
        override = None
        for begin, end, activity in overrides:
            if begin <= probe < end:
                override = activity
        if override is not None:
            per_rank = [override] * len(factors)
        else:
            own = [math.prod(f for b, e, f in rank if b <= probe < e) for rank in factors]
            stretch = math.prod(m for b, e, m in step_multipliers if b <= probe < e)
            slowest = max(own, default=1.0) * stretch
            per_rank = [
                Activity(BUSY, busy=min(1.0, f / slowest), pace=1.0 / slowest) if slowest != 1.0 else RUNNING
                for f in own
            ]
        for timeline, activity in zip(timelines, per_rank):
            if not timeline or timeline[-1][1] != activity:
                timeline.append((start, activity))
    return timelines


def activity_at(timeline: Timeline, t: float) -> Activity:
    """The activity a timeline gives at time `t`."""
    current = timeline[0][1] if timeline else RUNNING
    for begin, activity in timeline:
        if begin > t:
            break
        current = activity
    return current


@dataclass(frozen=True)
class SimGpu:
    """Identity of one simulated GPU, as NVML reports it."""

    index: int
    uuid: str  # GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx
    serial: str  # 13 digits, like the board serials nvidia-smi prints
    pci_domain: int
    pci_bus: int

    @property
    def pci_bus_id(self) -> str:
        """NVML's busId format: 8-digit domain, upper-case hex ("00000000:18:00.0")."""
        return f"{self.pci_domain:08X}:{self.pci_bus:02X}:00.0"


@dataclass(frozen=True, slots=True)
class GpuReading:
    """The workload-driven values of one GPU at one instant, in NVML's units."""

    gpu_util_percent: int
    mem_util_percent: int
    power_milliwatts: int
    energy_millijoules: int
    temp_gpu_celsius: int
    temp_mem_celsius: int
    sm_clock_mhz: int
    mem_clock_mhz: int
    video_clock_mhz: int
    clock_event_reasons: int
    pcie_tx_kilobytes_per_second: int  # instantaneous rate; the byte counters are its integral
    pcie_rx_kilobytes_per_second: int
    mem_used_bytes: int  # allocated, without the driver's reserved memory (nvmlMemory_v2 `used`)


@dataclass(frozen=True, slots=True)
class XidEvent:
    time: float  # absolute, on the node's clock
    gpu: int
    xid: int
    fault: Fault


@dataclass(frozen=True)
class _GpuParams:
    """Per-GPU constants drawn once from the seed: how this board in this chassis behaves."""

    key: int  # noise stream
    power_base_watts: float
    swing_amplitudes_watts: tuple[float, ...]
    swing_omegas: tuple[float, ...]  # rad/s
    swing_phases: tuple[float, ...]
    thermal_tau_seconds: float
    ambient_celsius: float
    celsius_per_watt: float
    mem_temp_offset_celsius: float
    step_seconds: float
    pcie_rx_kilobytes_per_second: float
    pcie_tx_fraction: float
    mem_job_bytes: int
    mem_util_base_percent: int
    pcie_replay_base: int
    energy_offset_millijoules: int
    pcie_swing_omega: float = 0.0  # rad/s
    pcie_swing_phase: float = 0.0
    pcie_rx_base_bytes: int = 0  # counter values when the node starts (bytes since driver load)
    pcie_tx_base_bytes: int = 0


class _PcieDraw(TypedDict):
    """The PCIe fields of _GpuParams, drawn from their own stream."""

    pcie_swing_omega: float
    pcie_swing_phase: float
    pcie_rx_base_bytes: int
    pcie_tx_base_bytes: int


@dataclass(frozen=True, slots=True)
class _Segment:
    """One stretch of a GPU's time over which its workload and hardware state are constant.

    Its smooth power is `scale * (base + swing) + watts`; the prefix values are at `begin`."""

    begin: float
    mode: str
    scale: float
    watts: float
    busy: float
    pace: float
    clock_ratio: float
    power_ratio: float
    reasons: int
    joules_before: float  # smooth-power energy from the first segment's begin to `begin`
    rx_kilobytes_before: float  # PCIe input (KB) likewise
    filtered_watts: float  # the thermal filter's constant-input state at `begin`


class SimNode:
    """One node of `gpu_count` GPUs of `model`, with faults; readings are functions of clock()."""

    def __init__(
        self,
        name: str,
        gpu_count: int = 8,
        model: str = "H100",
        faults: Sequence[Fault] = (),
        seed: int = 0,
        start: float | None = None,
        clock: Callable[[], float] = time.time,
        processes: Mapping[int, Sequence[int]] | None = None,
        activity: Mapping[int, Timeline] | None = None,
    ) -> None:
        """`processes` maps a GPU index to the pids running on it (GPUs left out run none); by
        default each GPU runs one training worker, with nearby pids in rank order.

        `activity` maps a GPU index to its timeline of Activity (absolute times; GPUs left out are
        idle); by default the node's GPUs run one synchronous job for ever, slowed by their own
        faults, and hang then go idle after one of them is lost.
        """
        if gpu_count < 1:
            raise ValueError(f"gpu_count must be >= 1, got {gpu_count}")
        self.name = name
        self.gpu_count = gpu_count
        self.profile: GpuProfile = profile_for(model)
        self.model = self.profile.model
        self.seed = seed
        self.clock = clock
        self.start = float(clock() if start is None else start)
        self.faults: tuple[Fault, ...] = tuple(faults)
        for fault in self.faults:
            if fault.gpu >= gpu_count:
                raise ValueError(f"fault {fault} targets GPU {fault.gpu}; node {name} has {gpu_count}")
            if fault.kind in ("nvlink_errors", "nvlink_down") and fault.link >= self.profile.nvlink_links:
                raise ValueError(
                    f"fault {fault} targets NVLink {fault.link}; {self.profile.name} has "
                    f"{self.profile.nvlink_links} links"
                )
            if fault.kind == "retired_pages" and "nvmlDeviceGetRetiredPages" in self.profile.not_supported:
                raise ValueError(
                    f"fault {fault}: {self.profile.name} does not retire pages (page retirement is "
                    "pre-Ampere; Ampere and Hopper remap rows instead: use row_remap_pending)"
                )
        self.gpus: tuple[SimGpu, ...] = tuple(self._identity(i) for i in range(gpu_count))
        self._params = tuple(self._draw_params(i) for i in range(gpu_count))
        # Faults per GPU and kind as (absolute start, absolute end, fault).
        self._windows: list[dict[str, list[tuple[float, float, Fault]]]] = [{} for _ in range(gpu_count)]
        for fault in self.faults:
            begin = self.fault_time(fault)
            end = math.inf if fault.duration_seconds is None else begin + fault.duration_seconds
            self._windows[fault.gpu].setdefault(fault.kind, []).append((begin, end, fault))
        self._lost_at: tuple[float | None, ...] = tuple(
            min((w[0] for w in self._windows[g].get("gpu_lost", ())), default=None) for g in range(gpu_count)
        )
        self._missing: tuple[tuple[tuple[float, float], ...], ...] = tuple(
            tuple((begin, end) for begin, end, _ in self._windows[g].get("gpu_missing", ())) for g in range(gpu_count)
        )
        self.xid_events: tuple[XidEvent, ...] = tuple(
            sorted(
                (
                    XidEvent(self.fault_time(f), f.gpu, f.effective_xid, f)
                    for f in self.faults
                    if f.effective_xid is not None
                ),
                key=lambda e: (e.time, e.gpu),
            )
        )
        if activity is None:
            timelines: dict[int, Timeline] = dict(enumerate(self._default_activity()))
        else:
            bad = [g for g in activity if not 0 <= g < gpu_count]
            if bad:
                raise ValueError(f"activity for GPU {bad[0]}; node {name} has {gpu_count}")
            timelines = {g: tuple(activity.get(g, ())) or ((-math.inf, IDLE_ACTIVITY),) for g in range(gpu_count)}
        self._timelines: tuple[Timeline, ...] = tuple(timelines[g] for g in range(gpu_count))
        # Swing terms after the thermal filter: (amplitude passed, phase lag) per sinusoid.
        self._filtered_swings = tuple(
            tuple(
                (amplitude / math.hypot(1.0, omega * q.thermal_tau_seconds), math.atan(omega * q.thermal_tau_seconds))
                for amplitude, omega in zip(q.swing_amplitudes_watts, q.swing_omegas)
            )
            for q in self._params
        )
        self._segments: tuple[tuple[_Segment, ...], ...] = tuple(self._build_segments(g) for g in range(gpu_count))
        self._segment_begins: tuple[tuple[float, ...], ...] = tuple(
            tuple(s.begin for s in segments) for segments in self._segments
        )
        self._joules_at_start = tuple(self._joules(g, self.start) for g in range(gpu_count))
        self._rx_kilobytes_at_start = tuple(self._rx_kilobytes(g, self.start) for g in range(gpu_count))
        self._cache: list[tuple[int, GpuReading] | None] = [None] * gpu_count
        self._segment_cache: list[dict[str, np.ndarray] | None] = [None] * gpu_count
        self._processes: list[tuple[int, ...]] = [() for _ in range(gpu_count)]
        if processes is None:
            base = random.Random(f"fleetwatch-sim:{name}:{seed}:pids").randrange(_PID_MIN, _PID_MIN + _PID_SPAN)
            processes = {g: (base + g,) for g in range(gpu_count)}
        for gpu, pids in processes.items():
            self.place_processes(gpu, pids)

    # ---- identity and static draws -------------------------------------------------------------

    def _identity(self, index: int) -> SimGpu:
        digest = hashlib.sha256(f"fleetwatch-sim:{self.name}:{self.seed}:{index}".encode()).hexdigest()
        uuid = f"GPU-{digest[0:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        serial = "16" + str(int(digest[32:48], 16) % 10**11).rjust(11, "0")
        # Past eight GPUs, repeat the HGX bus layout in the next PCI domain.
        domain, slot = divmod(index, len(HGX_PCI_BUSES))
        return SimGpu(index, uuid, serial, domain, HGX_PCI_BUSES[slot])

    def _draw_params(self, index: int) -> _GpuParams:
        p = self.profile
        rng = random.Random(f"fleetwatch-sim:{self.name}:{self.seed}:{index}:params")
        # Swings of a few percent on periods from seconds (step mix) to many minutes (data mix,
        # sequence lengths); only the slow ones get through the thermal filter.
        periods = (
            rng.uniform(6.0, 9.0),
            rng.uniform(25.0, 40.0),
            rng.uniform(140.0, 220.0),
            rng.uniform(600.0, 1200.0),
        )
        amplitudes = (rng.uniform(5.0, 8.0), rng.uniform(6.0, 9.0), rng.uniform(8.0, 12.0), rng.uniform(10.0, 14.0))
        # 87-90 % of the limit: the captures' gpu-burn drew 627-632 W of 700 W.
        power_base = p.power_limit_watts * rng.uniform(0.87, 0.905)
        # Anchored on the capture's idle point. Its load reading came 15 s into the burn, before
        # the heatsink settled, so the settled rise per watt is taken 30-60 % steeper than that
        # line (HGX boards settle in the 60s-70s C under training); slots differ by a few C.
        capture_per_watt = (p.temp_load_celsius - p.temp_idle_celsius) / (p.power_load_watts - p.power_idle_watts)
        per_watt = capture_per_watt * rng.uniform(1.3, 1.6)
        ambient = p.temp_idle_celsius - per_watt * p.power_idle_watts + rng.uniform(-2.0, 3.0)
        job_fraction = rng.uniform(0.86, 0.93)
        return _GpuParams(
            key=rng.getrandbits(64),
            power_base_watts=power_base,
            swing_amplitudes_watts=amplitudes,
            swing_omegas=tuple(2 * math.pi / period for period in periods),
            swing_phases=tuple(rng.uniform(0, 2 * math.pi) for _ in periods),
            thermal_tau_seconds=rng.uniform(40.0, 70.0),
            ambient_celsius=ambient,
            celsius_per_watt=per_watt,
            mem_temp_offset_celsius=rng.uniform(-1.5, 1.5),
            step_seconds=rng.uniform(0.85, 1.15),
            pcie_rx_kilobytes_per_second=rng.uniform(30_000.0, 150_000.0),
            pcie_tx_fraction=rng.uniform(0.1, 0.3),
            mem_job_bytes=(int(p.memory_total_bytes * job_fraction) // (2 << 20)) * (2 << 20),
            mem_util_base_percent=p.mem_util_load_percent + rng.randint(-2, 3),
            # The H100 capture shows 9 replays since reset on a healthy board, the H200 0.
            pcie_replay_base=rng.choice((0, 0, 0, 1, 2, 9)),
            # NVML's energy counter runs since the driver loaded: days of mostly-loaded hours.
            energy_offset_millijoules=rng.randint(2 * 10**10, 2 * 10**11),
            # A separate stream, so adding these left every earlier draw (and seed) unchanged.
            **self._draw_pcie(index),
        )

    def _draw_pcie(self, index: int) -> _PcieDraw:
        rng = random.Random(f"fleetwatch-sim:{self.name}:{self.seed}:{index}:pcie")
        return {
            "pcie_swing_omega": 2 * math.pi / rng.uniform(20.0, 90.0),
            "pcie_swing_phase": rng.uniform(0, 2 * math.pi),
            # Days of input traffic since the driver loaded: terabytes, far past 32 bits.
            "pcie_rx_base_bytes": rng.randint(10**12, 10**14),
            "pcie_tx_base_bytes": rng.randint(10**11, 10**13),
        }

    # ---- faults --------------------------------------------------------------------------------

    def fault_time(self, fault: Fault) -> float:
        """Absolute time (on the node's clock) when `fault` happens."""
        return self.start + fault.at_seconds

    def lost_at(self, gpu: int) -> float | None:
        """When GPU `gpu` falls off the bus, or None if it never does."""
        return self._lost_at[gpu]

    def is_lost(self, gpu: int, t: float | None = None) -> bool:
        lost = self._lost_at[gpu]
        return lost is not None and (self.clock() if t is None else t) >= lost

    def missing_windows(self, gpu: int) -> tuple[tuple[float, float], ...]:
        """(begin, end) absolute times when GPU `gpu` is not enumerated (gpu_missing faults)."""
        return self._missing[gpu]

    def is_missing(self, gpu: int, t: float | None = None) -> bool:
        """Whether the driver has lost track of GPU `gpu` (its handle fails; no XID, not "lost")."""
        windows = self._missing[gpu]
        if not windows:
            return False
        now = self.clock() if t is None else t
        return any(begin <= now < end for begin, end in windows)

    def _active(self, gpu: int, kind: str, t: float) -> list[Fault]:
        return [f for begin, end, f in self._windows[gpu].get(kind, ()) if begin <= t < end]

    def _started(self, gpu: int, kind: str, t: float) -> int:
        return sum(1 for begin, _, _ in self._windows[gpu].get(kind, ()) if begin <= t)

    def _slowdown(self, gpu: int, t: float) -> tuple[float, float, int]:
        """(clock ratio, power ratio, reason bits) of the slowdown faults active on `gpu`."""
        clock_ratio, power_ratio, reasons = 1.0, 1.0, 0
        windows = self._windows[gpu]
        for kind in _SLOWDOWN_EFFECT:
            for begin, end, fault in windows.get(kind, ()):
                if begin <= t < end:
                    kind_clock, kind_power, kind_reasons = fault_effect(fault)
                    clock_ratio = min(clock_ratio, kind_clock)
                    power_ratio = min(power_ratio, kind_power)
                    reasons |= kind_reasons
        return clock_ratio, power_ratio, reasons

    def rank_factors(self, gpu: int) -> list[tuple[float, float, float]]:
        """(begin, end, compute-time factor) windows of the faults that slow `gpu`'s own steps."""
        windows = self._windows[gpu]
        return [
            (begin, end, compute_factor(fault))
            for kind in (*_SLOWDOWN_EFFECT, "slow_rank")
            for begin, end, fault in windows.get(kind, ())
        ]

    def death_time(self, gpu: int) -> float | None:
        """When GPU `gpu`'s worker dies with it (lost or missing), or None."""
        times = [t for t in (self._lost_at[gpu], *(b for b, _ in self._missing[gpu])) if t is not None]
        return min(times, default=None)

    def _default_activity(self) -> list[list[tuple[float, Activity]]]:
        """One job on all GPUs since before the start; if a GPU dies the job hangs, then ends."""
        overrides: list[tuple[float, float, Activity]] = []
        deaths = [t for t in (self.death_time(g) for g in range(self.gpu_count)) if t is not None]
        if deaths:
            died = min(deaths)
            gone = died + NCCL_TIMEOUT_SECONDS
            overrides = [(died, gone, HUNG), (gone, math.inf, IDLE_ACTIVITY)]
        return synchronous_job_activity([self.rank_factors(g) for g in range(self.gpu_count)], overrides)

    # ---- workload ------------------------------------------------------------------------------

    def activity(self, gpu: int, t: float | None = None) -> Activity:
        """What GPU `gpu` does at `t` (default: now)."""
        return activity_at(self._timelines[gpu], self.clock() if t is None else t)

    def mode(self, gpu: int, t: float | None = None) -> str:
        """The mode (BUSY, HANG, PAUSE, IDLE) of GPU `gpu` at `t` (default: now)."""
        return self._segment(gpu, self.clock() if t is None else t).mode

    def _build_segments(self, gpu: int) -> tuple[_Segment, ...]:
        """The GPU's time cut where its activity or its own slowdown changes, with the energy,
        PCIe input and thermal-filter state at each cut, so a reading costs O(1)."""
        p, q = self.profile, self._params[gpu]
        first = self.start - _WARM_SECONDS  # before it the board sat idle, thermally settled
        timeline = self._timelines[gpu]
        edges = {first}
        edges.update(t for t, _ in timeline if first < t < math.inf)
        for kind in _SLOWDOWN_EFFECT:
            for begin, end, _ in self._windows[gpu].get(kind, ()):
                edges.update(t for t in (begin, end) if first < t < math.inf)
        ordered = sorted(edges)
        segments: list[_Segment] = []
        joules, rx, filtered = 0.0, 0.0, p.power_idle_watts
        tau = q.thermal_tau_seconds
        for i, begin in enumerate(ordered):
            end = ordered[i + 1] if i + 1 < len(ordered) else begin + 2.0
            probe = (begin + end) / 2
            act = activity_at(timeline, probe)
            clock_ratio, power_ratio, reasons = self._slowdown(gpu, probe)
            if act.mode == BUSY:
                wait = _PEER_WAIT_POWER_FLOOR + (1.0 - _PEER_WAIT_POWER_FLOOR) * act.busy
                scale, watts = (power_ratio if clock_ratio < 1.0 else wait), 0.0
            elif act.mode == HANG:
                scale, watts = min(power_ratio, _PEER_WAIT_POWER_FLOOR), 0.0
            elif act.mode == PAUSE:
                scale, watts = 0.0, p.power_idle_watts * _PAUSE_POWER_OVER_IDLE
            else:
                scale, watts = 0.0, p.power_idle_watts
            segment = _Segment(
                begin,
                act.mode,
                scale,
                watts,
                act.busy,
                act.pace,
                clock_ratio,
                power_ratio,
                reasons,
                joules,
                rx,
                filtered,
            )
            segments.append(segment)
            if i + 1 < len(ordered):
                joules += scale * self._power_integral(q, begin, end) + watts * (end - begin)
                rx += act.pace * self._pcie_rx_integral_kilobytes(q, begin, end)
                settled = scale * q.power_base_watts + watts
                filtered = settled + (filtered - settled) * math.exp(-(end - begin) / tau)
        return tuple(segments)

    def _segment(self, gpu: int, t: float) -> _Segment:
        index = bisect.bisect_right(self._segment_begins[gpu], t) - 1
        return self._segments[gpu][index if index > 0 else 0]

    def reading(self, gpu: int, t: float | None = None) -> GpuReading:
        """The workload values of `gpu` at time `t` (default: now), on a 1 ms grid."""
        t_ms = math.floor((self.clock() if t is None else t) * 1000.0)
        cached = self._cache[gpu]
        if cached is not None and cached[0] == t_ms:
            return cached[1]
        value = self._compute(gpu, t_ms / 1000.0)
        self._cache[gpu] = (t_ms, value)
        return value

    def _compute(self, gpu: int, t: float) -> GpuReading:
        p = self.profile
        q = self._params[gpu]
        seg = self._segment(gpu, t)
        since_start = t - self.start
        since_job = since_start + _WARM_SECONDS
        clock_ratio, reasons, mode = seg.clock_ratio, seg.reasons, seg.mode
        step = math.floor(since_start / q.step_seconds)
        u_step = _unit(q.key, step)
        jitter_watts = (_unit(q.key ^ 0x5EED, math.floor(since_start * 10.0)) - 0.5) * 8.0

        if mode in (BUSY, HANG):
            swing = 0.0
            for amplitude, omega, phase in zip(q.swing_amplitudes_watts, q.swing_omegas, q.swing_phases):
                swing += amplitude * math.sin(omega * since_job + phase)
            power_smooth = seg.scale * (q.power_base_watts + swing)
            if mode == BUSY:
                # Utilisation in steps: most steps keep the GPU busy the whole sample, some show a
                # short data-loader or collective gap; the same gap lowers the power a little.
                # Waiting in collectives counts as busy: NCCL's kernels run while they wait.
                gap_percent = 0 if u_step < 0.6 else 1 + int((u_step - 0.6) * 12.5)
            else:
                gap_percent = 0  # spinning in a collective that never completes
            gpu_util = 100 - gap_percent
            power = power_smooth - gap_percent * 2.0 + jitter_watts
            power = min(max(power, p.power_idle_watts * 0.9), p.power_limit_watts)
            if clock_ratio < 1.0:
                sm_clock = round(p.sm_clock_max_mhz * clock_ratio / _CLOCK_BIN_MHZ) * _CLOCK_BIN_MHZ
                sm_clock += _CLOCK_BIN_MHZ * (int(_unit(q.key ^ 0xC10C, step) * 3.0) - 1)
            else:
                excess_watts = power_smooth - _POWER_CAP_FRACTION * p.power_limit_watts
                if excess_watts > 0:
                    reasons |= SW_POWER_CAP
                    sm_clock = p.sm_clock_max_mhz - _CLOCK_BIN_MHZ * (1 + int(excess_watts / 8.0))
                elif _unit(q.key ^ 0xC10C, step) < 0.08:
                    sm_clock = p.sm_clock_max_mhz - _CLOCK_BIN_MHZ
                else:
                    sm_clock = p.sm_clock_max_mhz
            # The memory controller works while the GPU computes, not while it waits.
            busy = seg.busy if mode == BUSY and clock_ratio >= 1.0 else (1.0 if mode == BUSY else 0.05)
            mem_util = max(
                0,
                round(
                    (q.mem_util_base_percent + (_unit(q.key ^ 0x3E3, step) - 0.5) * 2.0)
                    * clock_ratio
                    * busy
                    * gpu_util
                    / 100.0
                ),
            )
            video_clock = p.video_clock_max_mhz
            mem_step = math.floor(since_start / 30.0)
            mem_used = q.mem_job_bytes + (int(_unit(q.key ^ 0x3E30, mem_step) * 5.0) - 2) * (64 << 20)
        else:
            power = seg.watts + jitter_watts * 0.2
            power = min(max(power, p.power_idle_watts * 0.9), p.power_limit_watts)
            gpu_util = int(u_step * 4.0) if mode == PAUSE else 0
            mem_util = 0
            sm_clock = p.sm_clock_idle_mhz
            video_clock = p.video_clock_idle_mhz
            reasons |= GPU_IDLE
            if mode == PAUSE:
                mem_step = math.floor(since_start / 30.0)
                mem_used = q.mem_job_bytes + (int(_unit(q.key ^ 0x3E30, mem_step) * 5.0) - 2) * (64 << 20)
            else:
                mem_used = 0

        temp_gpu = self._temperature(gpu, t, since_job, seg)
        temp_mem = temp_gpu - p.mem_temp_below_gpu_celsius + q.mem_temp_offset_celsius
        rx = self._pcie_rx_rate(q, since_job, seg.pace)

        return GpuReading(
            gpu_util_percent=gpu_util,
            mem_util_percent=int(mem_util),
            power_milliwatts=int(power * 1000.0),
            energy_millijoules=q.energy_offset_millijoules
            + int((self._joules(gpu, t, seg) - self._joules_at_start[gpu]) * 1000.0),
            temp_gpu_celsius=int(temp_gpu),
            temp_mem_celsius=int(temp_mem),
            sm_clock_mhz=int(sm_clock),
            mem_clock_mhz=p.mem_clock_max_mhz,
            video_clock_mhz=video_clock,
            clock_event_reasons=reasons,
            pcie_tx_kilobytes_per_second=int(rx * q.pcie_tx_fraction),
            pcie_rx_kilobytes_per_second=int(rx),
            mem_used_bytes=mem_used,
        )

    def _temperature(self, gpu: int, t: float, since_job: float, seg: _Segment) -> float:
        """Core temperature: power through a first-order thermal filter, plus thermal faults."""
        q = self._params[gpu]
        tau = q.thermal_tau_seconds
        settled = seg.scale * q.power_base_watts + seg.watts
        filtered = settled + (seg.filtered_watts - settled) * math.exp(-max(0.0, t - seg.begin) / tau)
        if seg.scale:
            swing = 0.0
            for (passed, lag), omega, phase in zip(self._filtered_swings[gpu], q.swing_omegas, q.swing_phases):
                swing += passed * math.sin(omega * since_job + phase - lag)
            filtered += seg.scale * swing
        celsius = q.ambient_celsius + q.celsius_per_watt * filtered

        windows = self._windows[gpu].get("thermal_slowdown")
        if not windows:
            return celsius
        slowdown = self.profile.temp_slowdown_celsius
        for begin, end, _ in windows:
            hot = slowdown + 1.5 + _unit(q.key ^ 0x7E39, math.floor(t))  # 90-91 C while tripped
            if begin - _THERMAL_RAMP_SECONDS <= t < begin:
                # Cooling fails first: the core climbs towards the threshold, just short of it.
                frac = (t - (begin - _THERMAL_RAMP_SECONDS)) / _THERMAL_RAMP_SECONDS
                target = slowdown - 1.0
                celsius = max(celsius, celsius + (target - celsius) * frac * frac)
            elif begin <= t < end:
                celsius = max(celsius, hot)
            elif t >= end:
                celsius += max(0.0, hot - celsius) * math.exp(-(t - end) / _THERMAL_COOL_SECONDS)
        return celsius

    def _joules(self, gpu: int, t: float, seg: _Segment | None = None) -> float:
        """Energy of the smooth power from the first segment to `t` (exact integral, monotone)."""
        seg = seg or self._segment(gpu, t)
        t = max(t, seg.begin)
        joules = seg.joules_before + seg.watts * (t - seg.begin)
        if seg.scale:
            joules += seg.scale * self._power_integral(self._params[gpu], seg.begin, t)
        return joules

    def _power_integral(self, q: _GpuParams, t0: float, t1: float) -> float:
        """Joules of the unscaled smooth power between absolute times t0 and t1."""
        x0 = t0 - self.start + _WARM_SECONDS
        x1 = t1 - self.start + _WARM_SECONDS
        joules = q.power_base_watts * (x1 - x0)
        for amplitude, omega, phase in zip(q.swing_amplitudes_watts, q.swing_omegas, q.swing_phases):
            joules += amplitude / omega * (math.cos(omega * x0 + phase) - math.cos(omega * x1 + phase))
        return joules

    # ---- PCIe traffic --------------------------------------------------------------------------

    @staticmethod
    def _pcie_rx_rate(q: _GpuParams, since_job: float, pace: float) -> float:
        """Receive rate in KB/s at `since_job` seconds into the job."""
        swing = 1.0 + _PCIE_SWING_FRACTION * math.sin(q.pcie_swing_omega * since_job + q.pcie_swing_phase)
        return pace * q.pcie_rx_kilobytes_per_second * swing

    def _pcie_rx_integral_kilobytes(self, q: _GpuParams, t0: float, t1: float) -> float:
        """KB received between absolute times t0 and t1 at pace 1 (exact integral of the swing)."""
        x0 = t0 - self.start + _WARM_SECONDS
        x1 = t1 - self.start + _WARM_SECONDS
        omega, phase = q.pcie_swing_omega, q.pcie_swing_phase
        swing = _PCIE_SWING_FRACTION / omega * (math.cos(omega * x0 + phase) - math.cos(omega * x1 + phase))
        return q.pcie_rx_kilobytes_per_second * ((x1 - x0) + swing)

    def _rx_kilobytes(self, gpu: int, t: float) -> float:
        seg = self._segment(gpu, t)
        t = max(t, seg.begin)
        return seg.rx_kilobytes_before + seg.pace * self._pcie_rx_integral_kilobytes(self._params[gpu], seg.begin, t)

    def pcie_bytes(self, gpu: int, t: float) -> tuple[int, int]:
        """(TX, RX) cumulative PCIe bytes at `t`, like NVML_FI_DEV_PCIE_COUNT_TX/RX_BYTES: the
        integral of the throughput, so counter deltas and nvmlDeviceGetPcieThroughput agree."""
        q = self._params[gpu]
        rx = (self._rx_kilobytes(gpu, t) - self._rx_kilobytes_at_start[gpu]) * _BYTES_PER_KB
        return q.pcie_tx_base_bytes + int(rx * q.pcie_tx_fraction), q.pcie_rx_base_bytes + int(rx)

    # ---- processes -----------------------------------------------------------------------------

    def place_processes(self, gpu: int, pids: Sequence[int]) -> None:
        """Run exactly `pids` on `gpu` from now on (an empty list: the GPU is idle)."""
        if not 0 <= gpu < self.gpu_count:
            raise ValueError(f"node {self.name} has no GPU {gpu}")
        checked = tuple(int(pid) for pid in pids)
        if any(pid <= 0 for pid in checked):
            raise ValueError(f"pids must be positive, got {list(pids)!r}")
        self._processes[gpu] = checked  # one assignment: readers on other threads see old or new

    def processes(self, gpu: int) -> tuple[int, ...]:
        """The pids of the compute processes on `gpu`."""
        return self._processes[gpu]

    def processes_at(self, gpu: int, t: float) -> tuple[int, ...]:
        """The pids with a compute context on `gpu` at `t`: none while the GPU is idle."""
        return () if self._segment(gpu, t).mode == IDLE else self._processes[gpu]

    # ---- counters and link state ---------------------------------------------------------------

    def pcie_replay_count(self, gpu: int, t: float) -> int:
        count = self._params[gpu].pcie_replay_base
        if not self._windows[gpu]:
            return count
        for begin, end, fault in self._windows[gpu].get("pcie_replays", ()):
            if begin <= t:
                rate = fault.rate_per_second or DEFAULT_PCIE_REPLAYS_PER_SECOND
                count += 1 + int(rate * (min(t, end) - begin))
        return count

    def pcie_link(self, gpu: int, t: float) -> tuple[int, int]:
        """(current generation, current width) of the GPU's PCIe link."""
        gen, width = self.profile.pcie_link_gen_max, self.profile.pcie_link_width_max
        if self._segment(gpu, t).mode == IDLE:
            gen = _IDLE_PCIE_GEN
        for fault in self._active(gpu, "pcie_downtrain", t):
            gen, width = min(gen, fault.pcie_gen), min(width, fault.pcie_width)
        return gen, width

    def ecc_counts(self, gpu: int, t: float) -> tuple[int, int, int, int]:
        """(SBE volatile, DBE volatile, SBE aggregate, DBE aggregate) totals."""
        windows = self._windows[gpu]
        if not windows:
            return 0, 0, 0, 0
        dbe = self._started(gpu, "ecc_dbe", t)
        sbe = self._started(gpu, "single_sbe", t)
        for begin, end, fault in windows.get("ecc_sbe_burst", ()):
            if begin <= t:
                rate = fault.rate_per_second or DEFAULT_SBE_PER_SECOND
                sbe += 1 + int(rate * (min(t, end) - begin))
        return sbe, dbe, sbe, dbe

    def remapped_rows(self, gpu: int, t: float) -> tuple[int, int, int, int]:
        """(correctable, uncorrectable, pending, failure) as nvmlDeviceGetRemappedRows returns."""
        if not self._windows[gpu]:
            return 0, 0, 0, 0
        pending_started = self._started(gpu, "row_remap_pending", t)
        failures = self._started(gpu, "row_remap_failure", t)
        pending = 1 if self._active(gpu, "row_remap_pending", t) else 0
        return 0, pending_started + failures, pending, 1 if failures else 0

    def nvlink_up(self, gpu: int, link: int, t: float) -> bool:
        windows = self._windows[gpu]
        if "nvlink_down" not in windows:  # the common case, asked 18 times per GPU per cycle
            return True
        return not any(f.link == link for f in self._active(gpu, "nvlink_down", t))

    def nvlink_error_count(self, gpu: int, link: int, counter: str, t: float) -> int:
        """One NVLink error counter (a name in NVLINK_COUNTERS) of one link."""
        windows = self._windows[gpu]
        if "nvlink_errors" not in windows and "nvlink_down" not in windows:
            return 0
        count = 0
        for begin, end, fault in windows.get("nvlink_errors", ()):
            if fault.link == link and begin <= t:
                rate = (fault.rate_per_second or DEFAULT_NVLINK_CRC_FLITS_PER_SECOND) * _NVLINK_COUNTER_SHARE[counter]
                count += 1 + int(rate * (min(t, end) - begin))
        if counter == "recovery":
            # A link that drops is retrained: one recovery per drop.
            count += sum(1 for begin, _, f in windows.get("nvlink_down", ()) if f.link == link and begin <= t)
        return count

    # ---- many instants at once: the simulator's fast path (sim/rows.py) ------------------------
    # The same arithmetic as reading(), pcie_bytes() and the counters above, in the same order of
    # operations, over arrays of times; sin, cos and exp go through `math` element by element, so
    # every value is bit for bit what the one-at-a-time methods give (tests/sim/test_rows.py).

    def _segment_block(self, gpu: int, times: np.ndarray) -> np.ndarray:
        """Index of each time's segment (as _segment picks it)."""
        index = np.searchsorted(np.asarray(self._segment_begins[gpu]), times, side="right") - 1
        return np.where(index > 0, index, 0)

    def _segment_arrays(self, gpu: int) -> dict[str, np.ndarray]:
        cached = self._segment_cache[gpu]
        if cached is None:
            segments = self._segments[gpu]
            cached = {
                name: np.array([getattr(s, name) for s in segments], dtype=np.float64)
                for name in (
                    "begin",
                    "scale",
                    "watts",
                    "busy",
                    "pace",
                    "clock_ratio",
                    "joules_before",
                    "rx_kilobytes_before",
                    "filtered_watts",
                )
            }
            cached["reasons"] = np.array([s.reasons for s in segments], dtype=np.int64)
            cached["mode"] = np.array([MODES.index(s.mode) for s in segments], dtype=np.int64)
            self._segment_cache[gpu] = cached
        return cached

    def idle_block(self, gpu: int, times: np.ndarray) -> np.ndarray:
        """mode(gpu, t) == IDLE at each time."""
        modes = self._segment_arrays(gpu)["mode"][self._segment_block(gpu, times)]
        return modes == MODES.index(IDLE)

    def readings_block(self, gpu: int, times: np.ndarray) -> dict[str, np.ndarray]:
        """reading(gpu, t) at each of `times`: GpuReading's fields as arrays (integers as int64)."""
        p = self.profile
        q = self._params[gpu]
        t = np.floor(times * 1000.0) / 1000.0  # reading()'s 1 ms grid
        segs = self._segment_arrays(gpu)
        index = self._segment_block(gpu, t)
        scale, watts = segs["scale"][index], segs["watts"][index]
        clock_ratio, reasons, mode = segs["clock_ratio"][index], segs["reasons"][index], segs["mode"][index]
        since_start = t - self.start
        since_job = since_start + _WARM_SECONDS
        step = np.floor(since_start / q.step_seconds).astype(np.int64)
        u_step = _unit_block(q.key, step)
        jitter_watts = (_unit_block(q.key ^ 0x5EED, np.floor(since_start * 10.0).astype(np.int64)) - 0.5) * 8.0
        busy_mode, hang_mode = mode == MODES.index(BUSY), mode == MODES.index(HANG)
        pause_mode = mode == MODES.index(PAUSE)
        working = busy_mode | hang_mode

        swing = np.zeros(len(t))
        for amplitude, omega, phase in zip(q.swing_amplitudes_watts, q.swing_omegas, q.swing_phases):
            swing = swing + amplitude * _math_map(math.sin, omega * since_job + phase)
        power_smooth = scale * (q.power_base_watts + swing)
        gap_percent = np.where(busy_mode & (u_step >= 0.6), 1 + np.trunc((u_step - 0.6) * 12.5), 0.0)
        gpu_util_busy = 100 - gap_percent
        power_busy = power_smooth - gap_percent * 2.0 + jitter_watts
        u_clock = _unit_block(q.key ^ 0xC10C, step)
        slowed_clock = np.round(p.sm_clock_max_mhz * clock_ratio / _CLOCK_BIN_MHZ) * _CLOCK_BIN_MHZ + _CLOCK_BIN_MHZ * (
            np.trunc(u_clock * 3.0) - 1
        )
        excess_watts = power_smooth - _POWER_CAP_FRACTION * p.power_limit_watts
        capped = (clock_ratio >= 1.0) & (excess_watts > 0)
        full_clock = np.where(
            capped,
            p.sm_clock_max_mhz - _CLOCK_BIN_MHZ * (1 + np.trunc(np.where(capped, excess_watts, 0.0) / 8.0)),
            np.where(u_clock < 0.08, p.sm_clock_max_mhz - _CLOCK_BIN_MHZ, p.sm_clock_max_mhz),
        )
        sm_clock_busy = np.where(clock_ratio < 1.0, slowed_clock, full_clock)
        busy = np.where(busy_mode & (clock_ratio >= 1.0), segs["busy"][index], np.where(busy_mode, 1.0, 0.05))
        mem_util_busy = np.maximum(
            0,
            np.round(
                (q.mem_util_base_percent + (_unit_block(q.key ^ 0x3E3, step) - 0.5) * 2.0)
                * clock_ratio
                * busy
                * gpu_util_busy
                / 100.0
            ),
        )
        mem_step = np.floor(since_start / 30.0).astype(np.int64)
        mem_job = q.mem_job_bytes + (np.trunc(_unit_block(q.key ^ 0x3E30, mem_step) * 5.0).astype(np.int64) - 2) * (
            64 << 20
        )
        power_rest = watts + jitter_watts * 0.2

        power = np.where(working, power_busy, power_rest)
        power = np.minimum(np.maximum(power, p.power_idle_watts * 0.9), p.power_limit_watts)
        gpu_util = np.where(working, gpu_util_busy, np.where(pause_mode, np.trunc(u_step * 4.0), 0.0))
        mem_util = np.where(working, mem_util_busy, 0.0)
        sm_clock = np.where(working, sm_clock_busy, float(p.sm_clock_idle_mhz))
        video_clock = np.where(working, p.video_clock_max_mhz, p.video_clock_idle_mhz)
        reasons = np.where(working, np.where(capped, reasons | SW_POWER_CAP, reasons), reasons | GPU_IDLE)
        mem_used = np.where(working | pause_mode, mem_job, 0)

        temp_gpu = self._temperature_block(gpu, t, since_job, index)
        temp_mem = temp_gpu - p.mem_temp_below_gpu_celsius + q.mem_temp_offset_celsius
        pcie_swing = 1.0 + _PCIE_SWING_FRACTION * _math_map(
            math.sin, q.pcie_swing_omega * since_job + q.pcie_swing_phase
        )
        rx = segs["pace"][index] * q.pcie_rx_kilobytes_per_second * pcie_swing
        joules = self._joules_block(gpu, t, index)
        return {
            "gpu_util_percent": gpu_util.astype(np.int64),
            "mem_util_percent": mem_util.astype(np.int64),
            "power_milliwatts": np.trunc(power * 1000.0).astype(np.int64),
            "energy_millijoules": q.energy_offset_millijoules
            + np.trunc((joules - self._joules_at_start[gpu]) * 1000.0).astype(np.int64),
            "temp_gpu_celsius": np.trunc(temp_gpu).astype(np.int64),
            "temp_mem_celsius": np.trunc(temp_mem).astype(np.int64),
            "sm_clock_mhz": sm_clock.astype(np.int64),
            "mem_clock_mhz": np.full(len(t), p.mem_clock_max_mhz, dtype=np.int64),
            "video_clock_mhz": video_clock.astype(np.int64),
            "clock_event_reasons": reasons,
            "pcie_tx_kilobytes_per_second": np.trunc(rx * q.pcie_tx_fraction).astype(np.int64),
            "pcie_rx_kilobytes_per_second": np.trunc(rx).astype(np.int64),
            "mem_used_bytes": mem_used.astype(np.int64),
        }

    def _temperature_block(self, gpu: int, t: np.ndarray, since_job: np.ndarray, index: np.ndarray) -> np.ndarray:
        q = self._params[gpu]
        segs = self._segment_arrays(gpu)
        scale, watts = segs["scale"][index], segs["watts"][index]
        settled = scale * q.power_base_watts + watts
        decay = _math_map(math.exp, -np.maximum(0.0, t - segs["begin"][index]) / q.thermal_tau_seconds)
        filtered = settled + (segs["filtered_watts"][index] - settled) * decay
        swing = np.zeros(len(t))
        for (passed, lag), omega, phase in zip(self._filtered_swings[gpu], q.swing_omegas, q.swing_phases):
            swing = swing + passed * _math_map(math.sin, omega * since_job + phase - lag)
        filtered = np.where(scale != 0.0, filtered + scale * swing, filtered)
        celsius = q.ambient_celsius + q.celsius_per_watt * filtered
        windows = self._windows[gpu].get("thermal_slowdown")
        if not windows:
            return celsius
        slowdown = self.profile.temp_slowdown_celsius
        for begin, end, _ in windows:
            hot = slowdown + 1.5 + _unit_block(q.key ^ 0x7E39, np.floor(t).astype(np.int64))
            ramp = (begin - _THERMAL_RAMP_SECONDS <= t) & (t < begin)
            frac = (t - (begin - _THERMAL_RAMP_SECONDS)) / _THERMAL_RAMP_SECONDS
            target = slowdown - 1.0
            ramped = np.maximum(celsius, celsius + (target - celsius) * frac * frac)
            tripped = np.maximum(celsius, hot)
            after = t >= end
            cooling = celsius + np.maximum(0.0, hot - celsius) * _math_map(
                math.exp, np.where(after, -(t - end) / _THERMAL_COOL_SECONDS, 0.0)
            )
            tripping = (begin <= t) & (t < end)
            celsius = np.where(ramp, ramped, np.where(tripping, tripped, np.where(after, cooling, celsius)))
        return celsius

    def _joules_block(self, gpu: int, t: np.ndarray, index: np.ndarray) -> np.ndarray:
        segs = self._segment_arrays(gpu)
        begin, scale = segs["begin"][index], segs["scale"][index]
        t = np.maximum(t, begin)
        joules = segs["joules_before"][index] + segs["watts"][index] * (t - begin)
        integral = self._power_integral_block(self._params[gpu], begin, t)
        return np.where(scale != 0.0, joules + scale * integral, joules)

    def _power_integral_block(self, q: _GpuParams, t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
        x0 = t0 - self.start + _WARM_SECONDS
        x1 = t1 - self.start + _WARM_SECONDS
        joules = q.power_base_watts * (x1 - x0)
        for amplitude, omega, phase in zip(q.swing_amplitudes_watts, q.swing_omegas, q.swing_phases):
            joules = joules + amplitude / omega * (
                _math_map(math.cos, omega * x0 + phase) - _math_map(math.cos, omega * x1 + phase)
            )
        return joules

    def pcie_bytes_block(self, gpu: int, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """pcie_bytes(gpu, t) at each of `times`: (TX, RX) as int64 arrays."""
        q = self._params[gpu]
        segs = self._segment_arrays(gpu)
        index = self._segment_block(gpu, times)
        begin = segs["begin"][index]
        t = np.maximum(times, begin)
        x0 = begin - self.start + _WARM_SECONDS
        x1 = t - self.start + _WARM_SECONDS
        omega, phase = q.pcie_swing_omega, q.pcie_swing_phase
        swing = (
            _PCIE_SWING_FRACTION
            / omega
            * (_math_map(math.cos, omega * x0 + phase) - _math_map(math.cos, omega * x1 + phase))
        )
        integral = q.pcie_rx_kilobytes_per_second * ((x1 - x0) + swing)
        kilobytes = segs["rx_kilobytes_before"][index] + segs["pace"][index] * integral
        rx = (kilobytes - self._rx_kilobytes_at_start[gpu]) * _BYTES_PER_KB
        tx_bytes = q.pcie_tx_base_bytes + np.trunc(rx * q.pcie_tx_fraction).astype(np.int64)
        return tx_bytes, q.pcie_rx_base_bytes + np.trunc(rx).astype(np.int64)

    def counters_block(self, gpu: int, times: np.ndarray) -> dict[str, np.ndarray]:
        """The counters and link state at each of `times` (int64 arrays): pcie_replay,
        ecc_sbe / ecc_dbe (volatile and aggregate alike), remapped_* (as remapped_rows()),
        nvlink_up (links up) and nvlink_<counter> (summed over the links), pcie_gen, pcie_width."""
        windows = self._windows[gpu]
        n = len(times)
        zeros = np.zeros(n, dtype=np.int64)

        def started(kind: str) -> np.ndarray:
            return sum((times >= begin).astype(np.int64) for begin, _, _ in windows.get(kind, ())) + zeros

        def active(kind: str) -> list[tuple[np.ndarray, Fault]]:
            return [((begin <= times) & (times < end), f) for begin, end, f in windows.get(kind, ())]

        def climbed(begin: float, end: float, rate: float) -> np.ndarray:
            return np.where(times >= begin, 1 + np.trunc(rate * (np.minimum(times, end) - begin)), 0).astype(np.int64)

        replay = self._params[gpu].pcie_replay_base + zeros
        for begin, end, fault in windows.get("pcie_replays", ()):
            replay = replay + climbed(begin, end, fault.rate_per_second or DEFAULT_PCIE_REPLAYS_PER_SECOND)
        sbe = started("single_sbe")
        for begin, end, fault in windows.get("ecc_sbe_burst", ()):
            sbe = sbe + climbed(begin, end, fault.rate_per_second or DEFAULT_SBE_PER_SECOND)
        pending_started, failures = started("row_remap_pending"), started("row_remap_failure")
        pending = zeros.copy()
        for on, _ in active("row_remap_pending"):
            pending = pending | on
        links = self.profile.nvlink_links
        down = np.zeros((n, links), dtype=bool)
        for on, fault in active("nvlink_down"):
            down[:, fault.link] |= on
        out = {
            "pcie_replay": replay,
            "ecc_sbe": sbe,
            "ecc_dbe": started("ecc_dbe"),
            "remapped_correctable": zeros,
            "remapped_uncorrectable": pending_started + failures,
            "remap_pending": pending.astype(np.int64),
            "remap_failure": (failures > 0).astype(np.int64),
            "nvlink_up": links - down.sum(axis=1),
        }
        for counter in NVLINK_COUNTERS:
            count = zeros
            for begin, end, fault in windows.get("nvlink_errors", ()):
                rate = (fault.rate_per_second or DEFAULT_NVLINK_CRC_FLITS_PER_SECOND) * _NVLINK_COUNTER_SHARE[counter]
                count = count + climbed(begin, end, rate)
            if counter == "recovery":
                for begin, _, _ in windows.get("nvlink_down", ()):
                    count = count + (times >= begin)
            out["nvlink_" + counter] = count
        gen = np.where(self.idle_block(gpu, times), _IDLE_PCIE_GEN, self.profile.pcie_link_gen_max)
        width = np.full(n, self.profile.pcie_link_width_max, dtype=np.int64)
        for on, fault in active("pcie_downtrain"):
            gen = np.where(on, np.minimum(gen, fault.pcie_gen), gen)
            width = np.where(on, np.minimum(width, fault.pcie_width), width)
        out["pcie_gen"], out["pcie_width"] = gen.astype(np.int64), width
        return out


def _unit_block(key: int, i: np.ndarray) -> np.ndarray:
    """_unit(key, i) for each non-negative i: the same uint64 arithmetic, wrapping as & _MASK64 does."""
    x = np.uint64(key) ^ (i.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03))
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return x.astype(np.float64) / 18446744073709551616.0


def _math_map(function: Callable[[float], float], values: np.ndarray) -> np.ndarray:
    """`function` (math.sin, ...) on each value: numpy's own may differ in the last bit."""
    return np.fromiter(map(function, values.tolist()), dtype=np.float64, count=len(values))
