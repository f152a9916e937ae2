"""The simulator's fast path: a SimNode's GPU samples computed in bulk, as the agent would read them.

`NodeRows` gives, tick by tick, exactly what the agent's NvmlSource reads from the fake NVML of one
node (fleetwatch.sim.fake_nvml) and what SimFleet.records() turns into GpuSamples and GPU-lost
events, without the NVML calls: the readings come from SimNode's array methods (readings_block,
counters_block, pcie_bytes_block) for a block of ticks at a time, converted to canonical units as
NvmlSource converts them, and NvmlSource's behaviour is replayed around them: a field the board
answers NOT_SUPPORTED is absent, the PCIe rates need two readings of the byte counters since the
source started, a GPU that is lost gives one gpu_lost event and then nothing, and the NVML source
SimFleet re-initialises at every edge of a gpu_missing window finds the GPU missing (not sampled)
or lost (a GPU-lost event without its uuid) at that moment.

The GPU samples come out as rows in the column order of fleetwatch.wire.GPU_FIELDS (NaN: absent),
one GpuRows per node and tick, which RecentData takes without building GpuSamples. The scalar path
stays the reference: tests/sim/test_rows.py compares the two record by record over scenarios with
every fault kind. `supported()` says whether this pynvml gives the NVML source the routes modelled
here; where it does not, SimFleet falls back to the scalar path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pynvml

from fleetwatch.agent.sources.gpm import GPM_METRICS
from fleetwatch.detectors.engine import GpuRows
from fleetwatch.records import Event
from fleetwatch.sim.fake_nvml import gpm_model
from fleetwatch.sim.node import SimNode
from fleetwatch.wire import GPU_FIELDS

_COLUMN = {name: i for i, name in enumerate(GPU_FIELDS)}
_MILLI = 1000.0  # mW -> W, mJ -> J, as NvmlSource converts them
_BYTES_PER_KB = 1024
# Ticks computed at once per node, at most: large enough to amortise numpy's per-call cost, small
# enough that a day-long soak run keeps a few MB per node. A run is cut into equal blocks of up
# to this many (a 600-tick run: one block, not 512 ticks and a short one that costs as much).
BLOCK_TICKS = 1024
# pynvml names the NVML source needs for the routes modelled here (field ids, the memory v2
# version): an older nvidia-ml-py sends the source down other routes.
_NEEDED = (
    "NVML_FI_DEV_MEMORY_TEMP",
    "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "NVML_FI_DEV_PCIE_REPLAY_COUNTER",
    "NVML_FI_DEV_PCIE_COUNT_TX_BYTES",
    "NVML_FI_DEV_PCIE_COUNT_RX_BYTES",
    "NVML_FI_DEV_ECC_SBE_VOL_TOTAL",
    "NVML_FI_DEV_ECC_DBE_VOL_TOTAL",
    "NVML_FI_DEV_ECC_SBE_AGG_TOTAL",
    "NVML_FI_DEV_ECC_DBE_AGG_TOTAL",
    "NVML_FI_DEV_REMAPPED_COR",
    "NVML_FI_DEV_REMAPPED_UNC",
    "NVML_FI_DEV_REMAPPED_PENDING",
    "NVML_FI_DEV_REMAPPED_FAILURE",
    "NVML_NVLINK_ERROR_DL_REPLAY",
    "NVML_NVLINK_ERROR_DL_RECOVERY",
    "NVML_NVLINK_ERROR_DL_CRC_FLIT",
    "NVML_NVLINK_ERROR_DL_CRC_DATA",
    "nvmlMemory_v2",
)
_LOST_MESSAGE = "GPU is lost: NVML calls fail with NVML_ERROR_GPU_IS_LOST"


def supported(node: SimNode) -> bool:
    """Whether the fast path reads what NvmlSource reads for `node` under this pynvml: the field
    routes above exist, and the board is one whose quirks are modelled (Hopper's: per-link NVLink
    counters that answer, the legacy totals never asked, no fan, no page retirement)."""
    p = node.profile
    return (
        all(hasattr(pynvml, name) for name in _NEEDED)
        and p.nvlink_links > 0
        and "nvmlDeviceGetNvLinkState" not in p.not_supported
        and "nvmlDeviceGetNvLinkErrorCounter" not in p.not_supported
        and {"replay", "recovery", "crc_flit"}.isdisjoint(p.nvlink_counters_not_supported)
        and {"nvmlDeviceGetFanSpeed", "nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus"}
        <= p.not_supported
        and {pynvml.NVML_FI_DEV_RETIRED_SBE, pynvml.NVML_FI_DEV_RETIRED_DBE, pynvml.NVML_FI_DEV_RETIRED_PENDING}
        <= p.fields_not_supported
    )


_GPM_COLUMNS = [_COLUMN[name] for _, name, _ in GPM_METRICS]


def _put_gpm(values: np.ndarray, model: dict[str, Any]) -> None:
    """gpm_model's output into canonical columns of `values` (last axis), as GpmReader converts it."""
    for const, name, factor in GPM_METRICS:
        values[..., _COLUMN[name]] = model[const] * factor


def _pci_bus_id(raw: str) -> str:
    """NVML's "00000000:18:00.0" as NvmlSource reports it ("0000:18:00.0")."""
    domain, _, rest = raw.partition(":")
    return f"{int(domain, 16):04x}:{rest.lower()}"


@dataclass(slots=True)
class _Gpu:
    """What the node's current NVML source knows of one GPU (NvmlSource's _Gpu, the parts that
    shape its samples)."""

    usable: bool = True
    lost: bool = False
    lost_reported: bool = False
    uuid: str | None = None
    pci_bus_id: str | None = None
    previous: int = -1  # tick of the last reading of the PCIe byte counters by this source


class NodeRows:
    """One SimNode's GPU samples and GPU-lost events, tick by tick, as SimFleet.records() would
    give them (see the module docstring). Call sample() once per tick the node is not silent, in
    time order, after restart() at the ticks where SimFleet re-initialises the node's NVML."""

    def __init__(
        self,
        name: str,
        sim: SimNode,
        times: np.ndarray,
        attribution: Sequence[tuple[str | None, int | None]],
    ) -> None:
        """`times`: every tick of the run; `attribution`: per GPU its (job, rank) while not idle."""
        self.name = name
        self.sim = sim
        self.times = times
        self.attribution = list(attribution)
        count = sim.gpu_count
        self._gpus = [_Gpu() for _ in range(count)]
        self._block_ticks = max(1, math.ceil(len(times) / max(1, math.ceil(len(times) / BLOCK_TICKS))))
        self._block_start = -1
        self._values = np.empty((0, count, len(GPU_FIELDS)))
        self._tx = self._rx = np.empty((0, count), dtype=np.int64)
        self._idle = np.empty((0, count), dtype=bool)
        self._static = self._static_row()
        self._last: tuple[list[int], list[str | None], list[str | None], list[int | None], list[bool]] | None = None
        # When each GPU is lost (inf: never), as SimNode.is_lost reads it.
        self._lost_at = [math.inf if t is None else t for t in (sim.lost_at(g) for g in range(sim.gpu_count))]
        self.restart(0)

    def _static_row(self) -> np.ndarray:
        """The fields that never change (NvmlSource reads them once), and the ones always absent."""
        p = self.sim.profile
        row = np.full(len(GPU_FIELDS), np.nan)
        row[_COLUMN["mem_total_bytes"]] = p.memory_total_bytes
        row[_COLUMN["temp_slowdown_celsius"]] = float(p.temp_slowdown_celsius)
        row[_COLUMN["temp_shutdown_celsius"]] = float(p.temp_shutdown_celsius)
        row[_COLUMN["power_limit_watts"]] = p.power_limit_milliwatts / _MILLI
        row[_COLUMN["sm_clock_max_mhz"]] = float(p.sm_clock_max_mhz)
        row[_COLUMN["pcie_link_gen_max"]] = p.pcie_link_gen_max
        row[_COLUMN["pcie_link_width_max"]] = p.pcie_link_width_max
        row[_COLUMN["nvlink_links_total"]] = p.nvlink_links
        return row

    def restart(self, tick: int) -> None:
        """The node's NVML source is (re)started at `tick`: each GPU found lost, missing or usable
        then, as NvmlSource.start() finds it; PCIe rates start over."""
        now = float(self.times[tick])
        sim = self.sim
        self._last = None  # the GPUs' identities are learned again
        for index, gpu in enumerate(self._gpus):
            gpu.usable, gpu.lost, gpu.lost_reported, gpu.previous = True, False, False, -1
            gpu.uuid = gpu.pci_bus_id = None
            if sim.is_lost(index, now):
                gpu.lost = True  # the handle fails with GPU_IS_LOST: no uuid learned
            elif sim.is_missing(index, now):
                gpu.usable = False  # "cannot be read through NVML (Unknown Error)"
            else:
                gpu.uuid = sim.gpus[index].uuid
                gpu.pci_bus_id = _pci_bus_id(sim.gpus[index].pci_bus_id)

    def _load(self, tick: int) -> None:
        """Computes the block of ticks holding `tick` (and the tick before it, for rates)."""
        start = (tick // self._block_ticks) * self._block_ticks
        stop = min(start + self._block_ticks, len(self.times))
        first = max(start - 1, 0)
        times = self.times[first:stop]
        sim = self.sim
        count = sim.gpu_count
        values = np.empty((len(times), count, len(GPU_FIELDS)))
        values[:] = self._static
        tx = np.empty((len(times), count), dtype=np.int64)
        rx = np.empty((len(times), count), dtype=np.int64)
        idle = np.empty((len(times), count), dtype=bool)
        c = _COLUMN
        for gpu in range(count):
            r = sim.readings_block(gpu, times)
            k = sim.counters_block(gpu, times)
            v = values[:, gpu, :]
            v[:, c["gpu_util_percent"]] = r["gpu_util_percent"]
            v[:, c["mem_util_percent"]] = r["mem_util_percent"]
            v[:, c["mem_used_bytes"]] = r["mem_used_bytes"]
            v[:, c["temp_gpu_celsius"]] = r["temp_gpu_celsius"]
            # NvmlSource leaves out an HBM reading of 0 C: boards without the sensor answer 0.
            v[:, c["temp_mem_celsius"]] = np.where(r["temp_mem_celsius"] == 0, np.nan, r["temp_mem_celsius"])
            v[:, c["power_watts"]] = r["power_milliwatts"] / _MILLI
            v[:, c["energy_joules"]] = r["energy_millijoules"] / _MILLI
            v[:, c["sm_clock_mhz"]] = r["sm_clock_mhz"]
            v[:, c["mem_clock_mhz"]] = r["mem_clock_mhz"]
            v[:, c["clock_event_reasons"]] = r["clock_event_reasons"]
            v[:, c["pcie_replay_total"]] = k["pcie_replay"]
            v[:, c["pcie_link_gen"]] = k["pcie_gen"]
            v[:, c["pcie_link_width"]] = k["pcie_width"]
            for name, key in (
                ("ecc_sbe_volatile_total", "ecc_sbe"),
                ("ecc_dbe_volatile_total", "ecc_dbe"),
                ("ecc_sbe_aggregate_total", "ecc_sbe"),
                ("ecc_dbe_aggregate_total", "ecc_dbe"),
                ("remapped_rows_correctable", "remapped_correctable"),
                ("remapped_rows_uncorrectable", "remapped_uncorrectable"),
                ("remap_pending", "remap_pending"),
                ("remap_failure", "remap_failure"),
                ("nvlink_links_up", "nvlink_up"),
                ("nvlink_replay_errors_total", "nvlink_replay"),
                ("nvlink_recovery_errors_total", "nvlink_recovery"),
                ("nvlink_crc_flit_errors_total", "nvlink_crc_flit"),
            ):
                v[:, c[name]] = k[key]
            if "crc_data" not in sim.profile.nvlink_counters_not_supported:
                v[:, c["nvlink_crc_data_errors_total"]] = k["nvlink_crc_data"]
            tx[:, gpu], rx[:, gpu] = sim.pcie_bytes_block(gpu, times)
            idle[:, gpu] = sim.idle_block(gpu, times)
            # GPM over each interval between consecutive ticks (fixed up where the source restarted).
            util, mem_util, clock = (r[name] for name in ("gpu_util_percent", "mem_util_percent", "sm_clock_mhz"))
            model = gpm_model(
                gpu,
                (util[:-1], util[1:]),
                (mem_util[:-1], mem_util[1:]),
                (clock[:-1], clock[1:]),
                sim.profile.sm_clock_max_mhz,
            )
            _put_gpm(v[1:], model)
        # The driver's timestamp of the field values, in microseconds, is what NvmlSource divides by.
        seconds = np.trunc(times * 1_000_000).astype(np.int64) / 1e6
        # Rates between consecutive ticks, where both were read by one source (fixed up otherwise).
        elapsed = seconds[1:] - seconds[:-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            tx_rate = (tx[1:] - tx[:-1]) / elapsed[:, None]
            rx_rate = (rx[1:] - rx[:-1]) / elapsed[:, None]
        ok = (elapsed[:, None] > 0) & (tx[1:] >= tx[:-1]) & (rx[1:] >= rx[:-1])
        values[1:, :, c["pcie_tx_bytes_per_second"]] = np.where(ok, tx_rate, np.nan)
        values[1:, :, c["pcie_rx_bytes_per_second"]] = np.where(ok, rx_rate, np.nan)
        self._block_start = first
        self._values, self._tx, self._rx, self._idle = values, tx, rx, idle

    def busy_fraction(self, tick: int) -> float:
        """The fraction of the node's GPUs not idle at `tick` (whatever NVML says of them)."""
        if not self._block_start <= tick - (tick > 0) or tick >= self._block_start + len(self._values):
            self._load(tick)
        count = self.sim.gpu_count
        return (count - int(np.count_nonzero(self._idle[tick - self._block_start]))) / count

    def sample(self, tick: int) -> tuple[list[Event], GpuRows | None]:
        """The node's GPU-lost events and GPU samples at `tick` (NvmlSource.sample())."""
        if not self._block_start <= tick - (tick > 0) or tick >= self._block_start + len(self._values):
            self._load(tick)
        i = tick - self._block_start
        now = float(self.times[tick])
        events: list[Event] = []
        sampled: list[int] = []
        fix: list[tuple[int, int]] = []  # (GPU, its previous reading's tick) where that is not tick - 1
        lost_at = self._lost_at
        for index, gpu in enumerate(self._gpus):
            if not gpu.usable:
                continue
            if not gpu.lost and lost_at[index] <= now:
                gpu.lost = True
            if gpu.lost:
                if not gpu.lost_reported:
                    gpu.lost_reported = True
                    events.append(
                        Event(
                            t=now,
                            node=self.name,
                            kind="gpu_lost",
                            gpu=index,
                            uuid=gpu.uuid,
                            pci_bus_id=gpu.pci_bus_id,
                            message=_LOST_MESSAGE,
                            source="nvml",
                        )
                    )
                continue
            sampled.append(index)
            if gpu.previous != tick - 1 or i == 0:
                fix.append((index, gpu.previous))
            gpu.previous = tick
        if not sampled:
            return events, None
        values = self._values[i]
        count = self.sim.gpu_count
        if fix:
            values = values.copy()
            self._rates(values, i, tick, fix)
        if len(sampled) < count:
            values = values[sampled]
        idle = self._idle[i].tolist()
        last = self._last
        uuids: list[str | None]
        jobs: list[str | None]
        ranks: list[int | None]
        if last is not None and last[0] == sampled and last[4] == idle:
            # The same GPUs, idle or not as before: the previous tick's lists, the very objects
            # (RecentData recognises them and skips interning the same identities again).
            sampled, uuids, jobs, ranks, _ = last
        else:
            jobs, ranks = [], []
            for index in sampled:
                job, rank = self.attribution[index]
                if job is not None and idle[index]:
                    job = rank = None
                jobs.append(job)
                ranks.append(rank)
            uuids = [self._gpus[index].uuid for index in sampled]
            self._last = (sampled, uuids, jobs, ranks, idle)
        rows = GpuRows(t=now, node=self.name, gpus=sampled, values=values, uuids=uuids, jobs=jobs, ranks=ranks)
        return events, rows

    def _rates(self, values: np.ndarray, i: int, tick: int, gpus: list[tuple[int, int]]) -> None:
        """PCIe rates and GPM of `gpus` (GPU, tick of its previous reading by this source, -1: none),
        whose previous reading is not the tick before: from that reading, or none for a first one."""
        c = _COLUMN
        for index, previous in gpus:
            if previous < 0:
                values[index, c["pcie_tx_bytes_per_second"]] = np.nan
                values[index, c["pcie_rx_bytes_per_second"]] = np.nan
                values[index, _GPM_COLUMNS] = np.nan
                continue
            then, now = (self.sim.reading(index, float(self.times[t])) for t in (previous, tick))
            model = gpm_model(
                index,
                (then.gpu_util_percent, now.gpu_util_percent),
                (then.mem_util_percent, now.mem_util_percent),
                (then.sm_clock_mhz, now.sm_clock_mhz),
                self.sim.profile.sm_clock_max_mhz,
            )
            _put_gpm(values[index], model)
            tx_now, rx_now = self._counters(tick, index)
            tx_then, rx_then = self._counters(previous, index)
            elapsed = self._stamp(tick) - self._stamp(previous)
            if elapsed <= 0 or tx_now < tx_then or rx_now < rx_then:
                values[index, c["pcie_tx_bytes_per_second"]] = np.nan
                values[index, c["pcie_rx_bytes_per_second"]] = np.nan
                continue
            values[index, c["pcie_tx_bytes_per_second"]] = (tx_now - tx_then) / elapsed
            values[index, c["pcie_rx_bytes_per_second"]] = (rx_now - rx_then) / elapsed

    def _stamp(self, tick: int) -> float:
        return int(self.times[tick] * 1_000_000) / 1e6

    def _counters(self, tick: int, gpu: int) -> tuple[int, int]:
        i = tick - self._block_start
        if 0 <= i < len(self._tx):
            return int(self._tx[i, gpu]), int(self._rx[i, gpu])
        tx, rx = self.sim.pcie_bytes(gpu, float(self.times[tick]))
        return tx, rx


__all__ = ["BLOCK_TICKS", "NodeRows", "supported"]
