"""The load side of tests/bench/collector_fleet.py: a simulated fleet's telemetry, over gRPC or as /metrics.

`FleetValues` holds every GPU and host field of a set of nodes as numpy arrays and moves them one
second at a time the way real telemetry moves (board power with NVML's milliwatt resolution,
integer temperatures that drift, integer clocks in 15 MHz steps, an energy counter that grows by
power x dt in whole mJ, PCIe rates as full floats, error counters that almost never move, limits
and link widths that never do). The field set and starting values come from the real agent code
sampling the fake NVML (`NvmlSource` over `SimNode`) for a few template nodes; every node starts
from one of them with its own offsets and then walks on its own.

`worker_main` runs in a child process (multiprocessing, spawn) and owns a slice of the fleet:
- mode "grpc": one gRPC stream per node, Hello then one Batch a second at the node's phase of the
  second (batch_seconds 0, the 0.1.0 form) or, as the agent sends, one dense Batch (GpuColumns)
  of batch_seconds cycles every batch_seconds; cumulative Acks read back; a broken stream reconnects and resends what is unacked, as
  the agent's spool would. Returns per batch its scheduled, sent and acked times.
- mode "prom": an aiohttp server with one loopback port per node, answering `/metrics` with the
  node's series in the text exposition format, under the agent's own metric names
  (fleetwatch.agent.metrics), gzipped when the scraper asks (as prometheus_client does).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
import socket
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHOD = "/fleetwatch.v1.Telemetry/Stream"
BOOT_ID_HEX = 32
# Seconds one stream waits for its Welcome; a connect that fails is retried after RECONNECT_SECONDS.
WELCOME_TIMEOUT_SECONDS = 30.0
RECONNECT_SECONDS = 1.0
# Parallel Hellos while a worker opens its streams (keeps the collector's accept path sane).
CONNECT_CONCURRENCY = 32

# GPU fields that never move during a run (limits, maxima, link shapes, retirement state).
_CONSTANT_GPU = frozenset(
    {
        "mem_total_bytes",
        "temp_slowdown_celsius",
        "temp_shutdown_celsius",
        "power_limit_watts",
        "sm_clock_max_mhz",
        "mem_clock_mhz",
        "pcie_link_gen",
        "pcie_link_gen_max",
        "pcie_link_width",
        "pcie_link_width_max",
        "ecc_dbe_volatile_total",
        "ecc_dbe_aggregate_total",
        "retired_pages_sbe",
        "retired_pages_dbe",
        "retired_pages_pending",
        "remapped_rows_correctable",
        "remapped_rows_uncorrectable",
        "remap_pending",
        "remap_failure",
        "nvlink_links_up",
        "nvlink_links_total",
        "nvlink_crc_data_errors_total",
        "nvlink_recovery_errors_total",
    }
)
# Error counters that do move, very rarely (per GPU-second).
_RARE_COUNTERS = ("pcie_replay_total", "nvlink_crc_flit_errors_total", "nvlink_replay_errors_total")
_RARE_PER_SECOND = 2e-4
_SM_CLOCK_STEP_MHZ = 15
_MIB = 1 << 20
_PAGE = 4096
# A DGX-class host: 2 TiB of memory, a 3.84 TB local NVMe, 224 hardware threads.
HOST_TEMPLATE: dict[str, float | int] = {
    "cpu_percent": 18.4,
    "load1": 41.27,
    "mem_used_bytes": 412_318_437_376,
    "mem_total_bytes": 2_164_193_034_240,
    "disk_used_bytes": 1_213_408_145_408,
    "disk_total_bytes": 3_840_755_982_336,
    "net_rx_bytes_total": 48_213_772_180_113,
    "net_tx_bytes_total": 31_007_114_902_471,
}
HOST_THREADS = 224


def build_templates(count: int, gpus: int) -> list[dict[str, Any]]:
    """Sample `count` simulated nodes through the agent's real NVML source; picklable dicts."""
    from fleetwatch.agent.sources.nvml import NvmlSource
    from fleetwatch.sim.fake_nvml import make_fake_nvml
    from fleetwatch.sim.node import SimNode

    out = []
    for k in range(count):
        clock = [1.7e9 + 1000.0 * k]
        source = NvmlSource(make_fake_nvml(SimNode(f"template{k}", gpu_count=gpus, seed=k, clock=lambda c=clock: c[0])))
        source.start()
        samples: list[dict[str, Any]] = []
        # A few simulated seconds so that rate fields (PCIe) have a window; keep the fullest sample.
        for _ in range(6):
            clock[0] += 1.0
            got, _events = source.sample()
            if sum(len(g["metrics"]) for g in got) >= sum(len(g["metrics"]) for g in samples):
                samples = got
        out.append(
            {
                "inventory": [dict(info) for info in source.inventory],
                "gpus": [
                    {"gpu": g["gpu"], "uuid": g.get("uuid") or "", "metrics": dict(g["metrics"])} for g in samples
                ],
            }
        )
    from fleetwatch.v1 import telemetry_pb2 as pb

    # All eight host fields: what psutil gives on a Linux GPU node (HostSource).
    host_fields = [f.name for f in pb.HostMetrics.DESCRIPTOR.fields if f.name in HOST_TEMPLATE]
    for t in out:
        t["host_fields"] = host_fields
    return out


def node_name(index: int) -> str:
    return f"node{index:05d}"


def _node_uuid(index: int, gpu: int) -> str:
    u = uuid.UUID(int=(0x6A1B << 112) | (index << 16) | gpu)
    return f"GPU-{u}"


@dataclass
class FleetValues:
    """Every field of a set of nodes, as (nodes, gpus) arrays, moved one second per `step`."""

    nodes: Sequence[int]
    templates: list[dict[str, Any]]
    seed: int
    # Sampling cycles (seconds) per batch: 0 sends the 0.1.0 form, one Batch of GpuSamples a second;
    # N sends the agent's dense form (GpuColumns), N cycles every N seconds.
    batch_seconds: int = 0
    gpu_fields: list[str] = field(init=False)
    host_fields: list[str] = field(init=False)
    second: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        from google.protobuf.descriptor import FieldDescriptor as FD

        from fleetwatch.v1 import telemetry_pb2 as pb

        self.rng = np.random.default_rng(self.seed)
        n = len(self.nodes)
        tpl = [self.templates[i % len(self.templates)] for i in self.nodes]
        self.gpus = len(tpl[0]["gpus"]) if n else 0
        g = self.gpus
        names = set.intersection(*(set(s["metrics"]) for t in self.templates for s in t["gpus"]))
        integer_types = {FD.TYPE_UINT64, FD.TYPE_UINT32, FD.TYPE_INT64, FD.TYPE_INT32}
        order = [f.name for f in pb.GpuMetrics.DESCRIPTOR.fields if f.name in names]
        self.gpu_fields = order
        self.gpu_int = {f.name for f in pb.GpuMetrics.DESCRIPTOR.fields if f.type in integer_types}
        self.host_fields = list(self.templates[0]["host_fields"])
        self.host_int = {f.name for f in pb.HostMetrics.DESCRIPTOR.fields if f.type in integer_types}
        rng = self.rng

        def base(name: str) -> np.ndarray:
            return np.array([[s["metrics"][name] for s in t["gpus"]] for t in tpl], dtype=np.float64).reshape(n, g)

        v: dict[str, np.ndarray] = {name: base(name) for name in order}
        self.v = v
        # Per-node character around the template: each board draws its own power, runs a bit
        # warmer or cooler, moves its own PCIe traffic, and has its own lifetime energy.
        self.power_mean = np.clip(v["power_watts"] + rng.normal(0, 20, (n, g)), 150, v["power_limit_watts"] - 5)
        self.power_dev = np.zeros((n, g))
        self.temp_state = {k: v[k] + rng.integers(-3, 4, (n, g)) for k in ("temp_gpu_celsius", "temp_mem_celsius")}
        self.temp_base = {k: s.copy() for k, s in self.temp_state.items()}
        self.util_base = v["gpu_util_percent"].copy() if "gpu_util_percent" in v else None
        self.memutil_base = v["mem_util_percent"] + rng.integers(-2, 3, (n, g)) if "mem_util_percent" in v else None
        self.pcie_base = {
            k: v[k] * rng.lognormal(0, 0.4, (n, g))
            for k in ("pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second")
            if k in v
        }
        if "energy_joules" in v:
            v["energy_joules"] = np.round(v["energy_joules"] * rng.uniform(0.3, 1.7, (n, g)), 3)
        if "mem_used_bytes" in v:
            v["mem_used_bytes"] = np.minimum(
                v["mem_used_bytes"] + rng.integers(-512, 512, (n, g)) * 2 * _MIB, v["mem_total_bytes"]
            )
        h = {k: np.full(n, float(HOST_TEMPLATE[k])) for k in self.host_fields}
        self.h = h
        self.cpu_base = rng.uniform(5, 40, n)
        self.net_rate = {k: rng.lognormal(math.log(2e7), 1.0, n) for k in ("net_rx_bytes_total", "net_tx_bytes_total")}
        for k in ("net_rx_bytes_total", "net_tx_bytes_total", "disk_used_bytes", "mem_used_bytes"):
            if k in h:
                h[k] = np.floor(h[k] * rng.uniform(0.5, 1.5, n) / _PAGE) * _PAGE
        self.uuids = [[_node_uuid(i, j) for j in range(g)] for i in self.nodes]
        self.names = [node_name(i) for i in self.nodes]
        self.inventory = []
        for i, t in zip(self.nodes, tpl):
            inv = []
            for j, info in enumerate(t["inventory"]):
                info = dict(info, uuid=_node_uuid(i, j), serial=f"16{i:07d}{j:04d}")
                inv.append(info)
            self.inventory.append(inv)
        self.step()

    @property
    def values_per_batch(self) -> int:
        return (self.gpus * len(self.gpu_fields) + len(self.host_fields)) * max(1, self.batch_seconds)

    def step(self) -> None:
        """One second of the fleet: every array moves once; lists for the builders are refreshed."""
        rng, v, h = self.rng, self.v, self.h
        n, g = len(self.nodes), self.gpus
        shape = (n, g)
        self.second += 1
        # Board power: noisy around each board's mean (about 7 W sd second to second, as the
        # simulator's boards), mW resolution as NVML reports it.
        self.power_dev = 0.3 * self.power_dev + rng.normal(0, 7, shape)
        power = np.round(np.clip(self.power_mean + self.power_dev, 60, v["power_limit_watts"]), 3)
        v["power_watts"] = power
        if "energy_joules" in v:
            v["energy_joules"] = np.round(v["energy_joules"] + power, 3)  # dt = 1 s, whole mJ
        for k, state in self.temp_state.items():
            target = self.temp_base[k] + (power - self.power_mean) / 12
            state += 0.05 * (target - state) + rng.normal(0, 0.12, shape)
            v[k] = np.round(state)
        if self.util_base is not None:
            dips = np.where(rng.random(shape) < 0.4, rng.integers(1, 4, shape), 0)
            v["gpu_util_percent"] = np.clip(self.util_base - dips, 0, 100).astype(np.float64)
        if self.memutil_base is not None:
            v["mem_util_percent"] = np.clip(self.memutil_base + rng.integers(-1, 2, shape), 0, 100).astype(np.float64)
        if "sm_clock_mhz" in v:
            move = rng.random(shape) < 0.08
            drop = rng.choice([0, 0, 0, 1, 2], size=shape) * _SM_CLOCK_STEP_MHZ
            v["sm_clock_mhz"] = np.where(move, v["sm_clock_max_mhz"] - drop, v["sm_clock_mhz"])
        if "clock_event_reasons" in v:
            capped = power > 0.97 * v["power_limit_watts"]
            reasons = v["clock_event_reasons"].astype(np.int64)
            v["clock_event_reasons"] = np.where(capped, reasons | 0x4, reasons & ~0x4).astype(np.float64)
        for k, b in self.pcie_base.items():
            v[k] = b * rng.lognormal(0, 0.35, shape)
        if "mem_used_bytes" in v:
            change = rng.random(shape) < 0.003
            delta = rng.integers(-64, 65, shape) * 2 * _MIB
            v["mem_used_bytes"] = np.clip(v["mem_used_bytes"] + change * delta, 0, v["mem_total_bytes"])
        for k in _RARE_COUNTERS:
            if k in v:
                v[k] = v[k] + (rng.random(shape) < _RARE_PER_SECOND)
        if "ecc_sbe_volatile_total" in v:
            sbe = rng.random(shape) < _RARE_PER_SECOND
            v["ecc_sbe_volatile_total"] = v["ecc_sbe_volatile_total"] + sbe
            if "ecc_sbe_aggregate_total" in v:
                v["ecc_sbe_aggregate_total"] = v["ecc_sbe_aggregate_total"] + sbe
        # Host: CPU busy around each node's level (psutil's 0.1 %), load with 2 decimals, memory
        # in pages, a disk that slowly fills, network counters growing by each node's rate.
        if "cpu_percent" in h:
            h["cpu_percent"] = np.round(np.clip(self.cpu_base + rng.normal(0, 3, n), 0, 100), 1)
        if "load1" in h:
            busy = h.get("cpu_percent", self.cpu_base) / 100 * HOST_THREADS
            h["load1"] = np.round(h["load1"] + (busy - h["load1"]) * (1 - math.exp(-1 / 60)), 2)
        if "mem_used_bytes" in h:
            h["mem_used_bytes"] = h["mem_used_bytes"] + np.round(rng.normal(0, 8 * _MIB, n) / _PAGE) * _PAGE
        if "disk_used_bytes" in h:
            h["disk_used_bytes"] = h["disk_used_bytes"] + (rng.random(n) < 0.3) * rng.integers(1, 64, n) * _PAGE
        for k, rate in self.net_rate.items():
            if k in h:
                h[k] = h[k] + np.floor(rate * rng.lognormal(0, 0.3, n))
        self._gpu_lists: list[Any] | None = None
        self._host_lists: list[Any] | None = None
        self._prom_lists: list[Any] | None = None
        self._gpu_stack: np.ndarray | None = None

    def advance_to(self, second: int) -> None:
        # At most a minute of catching up: a stalled worker must not spend its time here.
        steps = min(second - self.second, 60)
        for _ in range(max(0, steps)):
            self.step()
        self.second = max(self.second, second)

    # -- gRPC batches ---------------------------------------------------------------------------

    def _lists(self) -> tuple[list[Any], list[Any]]:
        if self._gpu_lists is None or self._host_lists is None:
            cols = []
            for k in self.gpu_fields:
                a = self.v[k]
                cols.append(a.astype(np.int64).tolist() if k in self.gpu_int else a.tolist())
            # (field, node, gpu) -> per node, per gpu, the field values in gpu_fields order.
            self._gpu_lists = [list(zip(*(c[i] for c in cols))) for i in range(len(self.nodes))]
            hcols = []
            for k in self.host_fields:
                a = self.h[k]
                hcols.append(a.astype(np.int64).tolist() if k in self.host_int else a.tolist())
            self._host_lists = list(zip(*hcols)) if hcols else [() for _ in self.nodes]
        return self._gpu_lists, self._host_lists

    def batch(self, local: int, seq: int, t: float, boot_id: str) -> bytes:
        """The serialized AgentMessage(batch) of node `local` (index into `nodes`) for this second."""
        from fleetwatch.v1 import telemetry_pb2 as pb

        gpu_lists, host_lists = self._lists()
        names = self.gpu_fields
        uuids = self.uuids[local]
        gpus = [
            {"gpu": j, "t": t, "uuid": uuids[j], "metrics": dict(zip(names, values))}
            for j, values in enumerate(gpu_lists[local])
        ]
        host = {"t": t, "metrics": dict(zip(self.host_fields, host_lists[local]))}
        return pb.AgentMessage(batch=pb.Batch(seq=seq, t=t, boot_id=boot_id, gpus=gpus, host=host)).SerializeToString()

    def cycle(self, local: int, t: float) -> tuple[float, np.ndarray, tuple[Any, ...]]:
        """Node `local`'s sampling cycle of this second, kept until its dense batch is sent."""
        if self._gpu_stack is None:
            self._gpu_stack = np.stack([self.v[k] for k in self.gpu_fields], axis=-1)
        return t, self._gpu_stack[local].copy(), self._lists()[1][local]

    def dense_batch(
        self, local: int, seq: int, cycles: list[tuple[float, np.ndarray, tuple[Any, ...]]], boot_id: str
    ) -> bytes:
        """The serialized AgentMessage(batch) of node `local` in the agent's dense form: `cycles` in one."""
        from fleetwatch.v1 import telemetry_pb2 as pb
        from fleetwatch.wire import GPU_FIELD_NUMBERS

        g = self.gpus
        columns = pb.GpuColumns(
            t=[t for t, _, _ in cycles for _ in range(g)],
            gpu=list(range(g)) * len(cycles),
            label=list(range(g)) * len(cycles),
            labels=[pb.GpuLabels(uuid=u) for u in self.uuids[local]],
            fields=[GPU_FIELD_NUMBERS[k] for k in self.gpu_fields],
            values=np.concatenate([m for _, m, _ in cycles]).astype("<f8").tobytes(),
        )
        hosts = [{"t": t, "metrics": dict(zip(self.host_fields, host))} for t, _, host in cycles]
        batch = pb.Batch(seq=seq, t=cycles[-1][0], boot_id=boot_id, gpu_columns=columns, hosts=hosts)
        return pb.AgentMessage(batch=batch).SerializeToString()

    def hello(self, local: int, boot_id: str) -> bytes:
        from fleetwatch.v1 import telemetry_pb2 as pb

        hello = pb.Hello(
            node=self.names[local],
            boot_id=boot_id,
            agent_version="bench",
            sampling_interval_seconds=1.0,
            t=time.time(),
            nvml_available=True,
            batch_interval_seconds=float(self.batch_seconds),
        )
        for info in self.inventory[local]:
            gpu = hello.gpus.add(
                index=info["index"],
                uuid=info["uuid"],
                name=info.get("name") or "",
                pci_bus_id=info.get("pci_bus_id") or "",
                serial=info.get("serial") or "",
                driver_version=info.get("driver_version") or "",
                cuda_version=info.get("cuda_version") or "",
            )
            for key in ("memory_total_bytes", "power_limit_watts", "sm_clock_max_mhz", "mem_clock_max_mhz"):
                if info.get(key) is not None:
                    setattr(gpu, key, type(getattr(gpu, key))(info[key]))
        return pb.AgentMessage(hello=hello).SerializeToString()

    # -- Prometheus exposition ------------------------------------------------------------------

    def _prom_setup(self) -> None:
        try:
            from fleetwatch.agent.metrics import GPU_METRICS, HOST_METRICS

            gpu_map = {m.canonical: m for m in GPU_METRICS}
            host_map = {m.canonical: m for m in HOST_METRICS}
        except ImportError:  # the agent's tables moved: fall back to plain canonical names
            gpu_map, host_map = {}, {}

        def describe(canonical: str, table: dict[str, Any], prefix: str) -> tuple[str, str, str, tuple[int, int]]:
            m = table.get(canonical)
            if m is None:
                name = f"{prefix}{canonical}"
                return name, "counter" if name.endswith("_total") else "gauge", canonical, (1, 1)
            kind = "counter" if m.kind == "counter" else "gauge"
            return m.name, kind, m.help, (m.scale.numerator, m.scale.denominator)

        self._prom_gpu = [describe(k, gpu_map, "fleetwatch_gpu_") for k in self.gpu_fields]
        self._prom_host = [describe(k, host_map, "fleetwatch_host_") for k in self.host_fields]
        # Per node: the text before each value ("# HELP/# TYPE" on a family's first line).
        self._prom_prefix: list[list[str]] = []
        for local, name in enumerate(self.names):
            parts = []
            for metric, kind, help_text, _scale in self._prom_gpu:
                head = f"# HELP {metric} {help_text}\n# TYPE {metric} {kind}\n"
                for j in range(self.gpus):
                    labels = f'{{node="{name}",gpu="{j}",uuid="{self.uuids[local][j]}"}} '
                    parts.append(head + metric + labels if j == 0 else metric + labels)
            for metric, kind, help_text, _scale in self._prom_host:
                parts.append(f'# HELP {metric} {help_text}\n# TYPE {metric} {kind}\n{metric}{{node="{name}"}} ')
            self._prom_prefix.append(parts)

    def exposition(self, local: int) -> str:
        """Node `local`'s series in the Prometheus text format (version 0.0.4), this second's values."""
        if not hasattr(self, "_prom_prefix"):
            self._prom_setup()
        if self._prom_lists is None:
            n = len(self.nodes)

            def scaled(a: np.ndarray, scale: tuple[int, int]) -> np.ndarray:
                # Numerator first, then an exact division, as the agent converts (97 / 100 is 0.97).
                return a if scale == (1, 1) else a * scale[0] / scale[1]

            cols = [
                scaled(self.v[k], scale).reshape(n, self.gpus)
                for k, (_m, _kind, _h, scale) in zip(self.gpu_fields, self._prom_gpu)
            ]
            host = [
                scaled(self.h[k], scale).reshape(n, 1)
                for k, (_m, _kind, _h, scale) in zip(self.host_fields, self._prom_host)
            ]
            self._prom_lists = np.concatenate(cols + host, axis=1).tolist()
        values = self._prom_lists[local]
        return "".join([f"{p}{x!r}\n" for p, x in zip(self._prom_prefix[local], values)])


# -- the worker process ---------------------------------------------------------------------------


@dataclass
class NodeStream:
    """One simulated agent's stream: its batches' times, what is unacked, and the stream's state."""

    local: int
    phase: float
    boot_id: str
    sched: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)
    pending: dict[int, bytes] = field(default_factory=dict)
    acked: int = 0
    cycles: list[Any] = field(default_factory=list)  # sampled, waiting for their dense batch
    call: Any = None
    channel: Any = None
    reader: asyncio.Task[None] | None = None
    broken: bool = True
    reconnects: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)


class GrpcWorker:
    def __init__(self, cfg: dict[str, Any], values: FleetValues) -> None:
        self.cfg = cfg
        self.values = values
        self.address = f"127.0.0.1:{cfg['grpc_port']}"
        self.errors: dict[str, int] = {}
        self.error_examples: list[str] = []
        self.writes = 0
        total = cfg["total_nodes"]
        rng = np.random.default_rng(cfg["seed"] + 7)
        self.streams = [
            NodeStream(
                local=k,
                # Nodes' batches spread evenly over the batch interval across all workers, with a
                # little jitter.
                phase=((node / total + rng.uniform(0, 0.2 / total)) % 1.0) * max(1, values.batch_seconds),
                boot_id=uuid.uuid4().hex[:BOOT_ID_HEX],
            )
            for k, node in enumerate(values.nodes)
        ]

    def _error(self, what: str, exc: BaseException) -> None:
        import grpc

        code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
        key = f"{what}:{code}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if len(self.error_examples) < 5:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            self.error_examples.append(f"{what}: {code}: {detail}"[:300])

    async def _close(self, s: NodeStream) -> None:
        if s.reader is not None:
            s.reader.cancel()
            with contextlib.suppress(BaseException):
                await s.reader
            s.reader = None
        if s.channel is not None:
            with contextlib.suppress(Exception):
                await s.channel.close()
            s.channel = None
        s.call = None
        s.broken = True

    async def _connect(self, s: NodeStream) -> bool:
        """Open the stream: Hello, Welcome, then the ack reader; resend everything unacked."""
        import grpc

        from fleetwatch.v1 import telemetry_pb2 as pb

        await self._close(s)
        # Each stream its own TCP connection, as each agent has: without a local subchannel pool
        # gRPC would share one connection between channels to the same address.
        s.channel = grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            s.call = s.channel.stream_stream(
                METHOD, request_serializer=None, response_deserializer=pb.CollectorMessage.FromString
            )()
            await asyncio.wait_for(s.call.write(self.values.hello(s.local, s.boot_id)), WELCOME_TIMEOUT_SECONDS)
            first = await asyncio.wait_for(s.call.read(), WELCOME_TIMEOUT_SECONDS)
            if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
                raise RuntimeError(f"expected a Welcome, got {first!r}")
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._error("connect", exc)
            await self._close(s)
            return False
        s.broken = False
        s.reader = asyncio.create_task(self._read_acks(s))
        for seq in sorted(s.pending):
            try:
                await s.call.write(s.pending[seq])
                self.writes += 1
            except Exception as exc:
                self._error("resend", exc)
                s.broken = True
                return False
        return True

    async def _read_acks(self, s: NodeStream) -> None:
        import grpc

        call = s.call
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    if s.acked < len(s.sent):
                        self._error("read", RuntimeError("stream ended with batches unacked"))
                    break
                if msg.WhichOneof("body") != "ack":
                    continue
                now = time.time()
                upto = min(int(msg.ack.seq), len(s.sent))
                for seq in range(s.acked + 1, upto + 1):
                    s.acked_at[seq - 1] = now
                    s.pending.pop(seq, None)
                s.acked = max(s.acked, upto)
                s.progress.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._error("read", exc)
        s.broken = True
        s.progress.set()

    async def open_all(self) -> int:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(s: NodeStream) -> bool:
            async with gate:
                return await self._connect(s)

        return sum(await asyncio.gather(*(one(s) for s in self.streams)))

    async def _run_node(self, s: NodeStream, t0: float, end: float, deadline: float) -> None:
        values = self.values
        next_connect = 0.0
        seq = 0
        second = 0
        per_batch = max(1, values.batch_seconds)
        while True:
            sched = t0 + s.phase + second
            if sched >= end:
                break
            delay = sched - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            second += 1
            values.advance_to(second)
            now = time.time()
            if values.batch_seconds:
                s.cycles.append(values.cycle(s.local, now))
                if len(s.cycles) < per_batch:
                    continue
                body = values.dense_batch(s.local, seq + 1, s.cycles, s.boot_id)
                s.cycles = []
            seq += 1
            if not values.batch_seconds:
                body = values.batch(s.local, seq, now, s.boot_id)
            s.sched.append(sched)
            s.sent.append(now)
            s.acked_at.append(math.nan)
            s.pending[seq] = body
            if s.broken and time.time() >= next_connect:
                next_connect = time.time() + RECONNECT_SECONDS
                s.reconnects += 1
                await self._connect(s)  # resends seq too
                continue
            if s.broken:
                continue
            try:
                await s.call.write(body)
                self.writes += 1
            except Exception as exc:
                self._error("write", exc)
                s.broken = True
        # Drain: wait for the acks of everything sent, reconnecting as an agent would.
        while s.acked < len(s.sent) and time.time() < deadline:
            if s.broken:
                wait = next_connect - time.time()
                if wait > 0:
                    await asyncio.sleep(min(wait, max(0.0, deadline - time.time())))
                    continue
                next_connect = time.time() + RECONNECT_SECONDS
                s.reconnects += 1
                await self._connect(s)
                continue
            s.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.progress.wait(), max(0.01, deadline - time.time()))
        if s.call is not None and not s.broken:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.call.done_writing(), 5)
        await self._close(s)

    async def run(self, t0: float, end: float, deadline: float) -> None:
        await asyncio.gather(*(self._run_node(s, t0, end, deadline) for s in self.streams))

    def result(self) -> dict[str, Any]:
        ss = self.streams
        return {
            "sched": np.array([x for s in ss for x in s.sched]),
            "sent": np.array([x for s in ss for x in s.sent]),
            "acked_at": np.array([x for s in ss for x in s.acked_at]),
            "values_per_batch": self.values.values_per_batch,
            "writes": self.writes,
            "reconnects": sum(max(0, s.reconnects) for s in ss),
            "errors": self.errors,
            "error_examples": self.error_examples,
            "streams": len(ss),
        }


async def _grpc_main(cfg: dict[str, Any], conn: Any) -> None:
    values = FleetValues(cfg["nodes"], cfg["templates"], cfg["seed"], batch_seconds=cfg.get("batch_seconds", 0))
    worker = GrpcWorker(cfg, values)
    loop = asyncio.get_running_loop()
    opened = await worker.open_all()
    conn.send(("ready", {"opened": opened, "streams": len(worker.streams), "errors": dict(worker.errors)}))
    msg = await loop.run_in_executor(None, conn.recv)
    if msg[0] != "go":
        return
    _, t0, end, deadline = msg
    await worker.run(t0, end, deadline)
    conn.send(("result", worker.result()))


async def _prom_main(cfg: dict[str, Any], conn: Any) -> None:
    from aiohttp import web

    values = FleetValues(cfg["nodes"], cfg["templates"], cfg["seed"])
    if values.nodes:
        values.exposition(0)  # builds the label prefixes before serving
    # One listening port per node, as each node's agent has its own /metrics: Prometheus then
    # keeps one connection per target, as it does in a real fleet.
    socks = []
    for _ in values.nodes:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    by_port = {sock.getsockname()[1]: k for k, sock in enumerate(socks)}
    origin = time.time()
    stats = {"scrapes": 0, "bytes": 0, "not_found": 0}
    level = cfg.get("gzip_level", 1)

    async def metrics(request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        local = by_port.get(sockname[1]) if sockname else None
        if local is None:
            stats["not_found"] += 1
            raise web.HTTPNotFound()
        values.advance_to(int(time.time() - origin) + 1)
        body = values.exposition(local).encode()
        headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        # As the agent's prometheus_client endpoint does when the scraper accepts gzip.
        if level > 0 and "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=level)
            headers["Content-Encoding"] = "gzip"
        stats["scrapes"] += 1
        stats["bytes"] += len(body)
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for sock in socks:
        await web.SockSite(runner, sock, backlog=64).start()
    targets = {values.names[k]: port for port, k in by_port.items()}
    conn.send(("ready", {"targets": targets, "series_per_node": values.values_per_batch}))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, conn.recv)  # any message: stop
    await runner.cleanup()
    conn.send(("result", stats))


def worker_main(mode: str, cfg: dict[str, Any], conn: Any) -> None:
    """Entry point of a load-generator process (multiprocessing, spawn context)."""
    try:
        asyncio.run(_grpc_main(cfg, conn) if mode == "grpc" else _prom_main(cfg, conn))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise
