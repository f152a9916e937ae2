"""Checks every field of an agent's messages against fleetwatch.limits before anything is stored or detected."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetwatch import limits
from fleetwatch.collector.storage.blocks import storable
from fleetwatch.collector.storage.store import GpuRows, IngestBatch
from fleetwatch.records import Event, GpuSample, HostSample, Step
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import GPU_FIELD_NUMBERS, GPU_FIELDS

# The event kinds agents send and detectors act on (telemetry.proto's Event.kind). A kind this
# collector does not know is refused rather than stored unread: upgrade collectors before agents.
EVENT_KINDS = frozenset({"xid", "gpu_lost"})

# "gpus[3].metrics" -> "gpus.metrics": a field's metric label, one per schema field however many
# entries a message has.
_INDEX_RE = re.compile(r"\[\d+\]")


class InvalidMessage(ValueError):
    """A message that breaks the wire contract's limits: which field (`field`), and why (`problem`).

    `where` is "hello", "batch" (then `seq` is the batch's) or "stream" (a message out of order).
    str() is what the agent is told, e.g. "batch 12: gpus[3].gpu: 4000000000 is not a GPU index
    (0-63)": it quotes values escaped and cut short, never SQL. `detail` goes to the log only.
    """

    def __init__(self, where: str, field: str, problem: str, *, seq: int | None = None, detail: str = "") -> None:
        self.where = where
        self.field = field
        self.problem = problem
        self.seq = seq
        self.detail = detail
        super().__init__(f"{self.subject}: {field}: {problem}")

    @property
    def subject(self) -> str:
        return f"batch {self.seq}" if self.where == "batch" else self.where

    @property
    def field_label(self) -> str:
        """The field without entry indexes, prefixed by the message: a bounded set, fit for a metric label."""
        return f"{self.where}.{_INDEX_RE.sub('', self.field)}"


@dataclass(frozen=True, slots=True)
class ClockWindow:
    """How far from the collector's clock a sample's time may be (fleetwatch.limits explains the defaults)."""

    max_skew_seconds: float = limits.DEFAULT_MAX_CLOCK_SKEW_SECONDS  # ahead of the collector
    max_age_seconds: float = limits.DEFAULT_MAX_DATA_AGE_SECONDS  # behind it


# Field descriptor -> (canonical name, largest storable value or None for a double): what
# _BatchChecker.metrics keeps. Identity fields of IbPortMetrics are left out (_NOT_A_METRIC).
_METRIC_LIMITS: dict[Any, tuple[str, int | None]] = {
    f: (f.name, limits.integer_metric_max(f.name))
    for d in (pb.GpuMetrics.DESCRIPTOR, pb.HostMetrics.DESCRIPTOR, pb.IbPortMetrics.DESCRIPTOR)
    for f in d.fields
    if f.name not in ("device", "port", "ib_state")
}
_NOT_A_METRIC: tuple[None, None] = (None, None)


class _Checker:
    """The checks of one message; raises InvalidMessage at the first field that breaks a limit."""

    def __init__(self, where: str, seq: int | None = None) -> None:
        self.where = where
        self.seq = seq

    def fail(self, field: str, problem: str) -> InvalidMessage:
        return InvalidMessage(self.where, field, problem, seq=self.seq)

    def count(self, field: str, n: int, most: int) -> None:
        if n > most:
            raise self.fail(field, f"{n} entries, at most {most}")

    def text(self, field: str, value: str, max_chars: int, *, required: bool = False) -> str | None:
        """The value, or None for an empty optional one."""
        problem = limits.text_problem(value, max_chars, required=required)
        if problem is not None:
            raise self.fail(field, problem)
        return value or None

    def gpu_index(self, field: str, value: int) -> int:
        if value >= limits.MAX_GPUS_PER_NODE:
            raise self.fail(field, f"{value} is not a GPU index (0-{limits.MAX_GPUS_PER_NODE - 1})")
        return value

    def at_most(self, field: str, value: int, most: int, what: str) -> int:
        if value > most:
            raise self.fail(field, f"{value} is not {what} (0-{most})")
        return value


class _BatchChecker(_Checker):
    def __init__(self, seq: int, received_at: float, window: ClockWindow, dropped: Counter[str] | None) -> None:
        super().__init__("batch", seq)
        self.now = received_at
        self.earliest = received_at - window.max_age_seconds
        self.latest = received_at + window.max_skew_seconds
        self.window = window
        self.dropped = dropped

    def time(self, field: str, value: float) -> float:
        if self.earliest <= value <= self.latest:  # NaN compares false
            return value
        if not math.isfinite(value):
            problem = f"{value} is not a time"
        elif value > self.latest:
            problem = (
                f"{value:.3f} is {value - self.now:.0f} s ahead of the collector's clock "
                f"(at most {self.window.max_skew_seconds:g} s: max_clock_skew_seconds)"
            )
        else:
            problem = (
                f"{value:.3f} is {self.now - value:.0f} s old "
                f"(at most {self.window.max_age_seconds:g} s: max_data_age_seconds)"
            )
        raise self.fail(field, problem)

    def metrics(self, msg: Any) -> dict[str, float | int]:
        """The present fields that can be measurements; the others are dropped (absent) and counted.

        The rule is limits.storable_metric's, inlined: this runs for every value an agent sends.
        """
        kept: dict[str, float | int] = {}
        for descriptor, value in msg.ListFields():
            name, most = _METRIC_LIMITS.get(descriptor, _NOT_A_METRIC)
            if name is None:
                continue  # an IbPortMetrics' identity (device, port, state), checked by the caller
            # On the wire an integer field is an unsigned int and any other a double.
            if (value <= most) if most is not None else (value - value == 0.0):  # inf - inf and NaN are NaN
                kept[name] = value
            elif self.dropped is not None:
                self.dropped[name] += 1
        return kept


# GpuMetrics field number -> its column in GPU_FIELDS order (GpuRows.values).
_GPU_COLUMN = {GPU_FIELD_NUMBERS[name]: i for i, name in enumerate(GPU_FIELDS)}
# Field-number lists already checked (an agent sends the same one in every batch) -> their
# numbers and columns as arrays. Bounded: a client inventing orders fills it once, then is checked.
_CHECKED_FIELDS: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
_CHECKED_FIELDS_MAX = 64
# Label entries (uuid, job, rank, k8s namespace, pod, container) already checked: the same few
# GPUs' labels come in every batch.
_CHECKED_LABELS: set[tuple[str, str, int | None, str, str, str]] = set()
_CHECKED_LABELS_MAX = 100_000
# The Kubernetes pod fields of GpuSample and GpuLabels and their bounds; checked, not stored (yet).
_K8S_FIELDS = (
    ("k8s_namespace", limits.K8S_NAMESPACE_MAX_CHARS),
    ("k8s_pod", limits.K8S_POD_MAX_CHARS),
    ("k8s_container", limits.K8S_CONTAINER_MAX_CHARS),
)


def _k8s(c: _Checker, at: str, message: Any) -> None:
    for name, most in _K8S_FIELDS:
        c.text(f"{at}.{name}", getattr(message, name), most)


def _gpu_fields(c: _BatchChecker, numbers: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """gpu_columns.fields checked: the numbers, and each one's column in GPU_FIELDS order."""
    known = _CHECKED_FIELDS.get(numbers)
    if known is not None:
        return known
    for i, number in enumerate(numbers):
        if number not in _GPU_COLUMN:
            raise c.fail(f"gpu_columns.fields[{i}]", f"{number} is not a GpuMetrics field number")
    if len(set(numbers)) != len(numbers):
        raise c.fail("gpu_columns.fields", "names a field more than once")
    checked = np.array(numbers, dtype=np.int64), np.array([_GPU_COLUMN[n] for n in numbers], dtype=np.int64)
    if len(_CHECKED_FIELDS) < _CHECKED_FIELDS_MAX:
        _CHECKED_FIELDS[numbers] = checked
    return checked


def _gpu_labels(c: _BatchChecker, entries: Any) -> list[tuple[str | None, str | None, int | None]]:
    labels = []
    for i, entry in enumerate(entries):
        key = (
            entry.uuid,
            entry.job,
            entry.rank if entry.HasField("rank") else None,
            entry.k8s_namespace,
            entry.k8s_pod,
            entry.k8s_container,
        )
        if key not in _CHECKED_LABELS:
            at = f"gpu_columns.labels[{i}]"
            c.text(f"{at}.uuid", key[0], limits.GPU_UUID_MAX_CHARS)
            c.text(f"{at}.job", key[1], limits.JOB_MAX_CHARS)
            if key[2] is not None:
                c.at_most(f"{at}.rank", key[2], limits.MAX_RANK, "a rank")
            _k8s(c, at, entry)
            if len(_CHECKED_LABELS) >= _CHECKED_LABELS_MAX:
                _CHECKED_LABELS.clear()
            _CHECKED_LABELS.add(key)
        labels.append((key[0] or None, key[1] or None, key[2]))
    return labels


def _gpu_rows(c: _BatchChecker, columns: pb.GpuColumns) -> GpuRows:
    """Batch.gpu_columns checked as whole arrays: shapes, times, GPU indexes, labels; values that
    cannot be measurements dropped (NaN) and counted, as _BatchChecker.metrics does one by one."""
    rows = len(columns.t)
    c.count("gpu_columns.t", rows, limits.MAX_GPU_ROWS_PER_BATCH)
    for name, entries in (("gpu", len(columns.gpu)), ("label", len(columns.label))):
        if entries != rows:
            raise c.fail(f"gpu_columns.{name}", f"has {entries} entries for {rows} rows (one per entry of t)")
    numbers, where = _gpu_fields(c, tuple(columns.fields))
    if len(columns.values) != 8 * rows * len(numbers):
        raise c.fail(
            "gpu_columns.values",
            f"holds {len(columns.values)} bytes, not {8 * rows * len(numbers)} "
            f"({rows} rows x {len(numbers)} fields x 8-byte floats)",
        )
    t = np.array(columns.t, dtype=np.float64)
    outside = ~((t >= c.earliest) & (t <= c.latest))  # NaN is outside
    if outside.any():
        i = int(np.argmax(outside))
        c.time(f"gpu_columns.t[{i}]", float(t[i]))  # raises, saying how far off
    gpu = np.array(columns.gpu, dtype=np.int64)
    if rows and gpu.max() >= limits.MAX_GPUS_PER_NODE:
        i = int(np.argmax(gpu >= limits.MAX_GPUS_PER_NODE))
        c.gpu_index(f"gpu_columns.gpu[{i}]", int(gpu[i]))  # raises
    c.count("gpu_columns.labels", len(columns.labels), limits.MAX_GPU_ROWS_PER_BATCH)
    label = np.array(columns.label, dtype=np.int64)
    if rows and label.max() >= len(columns.labels):
        i = int(np.argmax(label >= len(columns.labels)))
        raise c.fail(f"gpu_columns.label[{i}]", f"{label[i]} names no entry of labels ({len(columns.labels)})")
    labels = _gpu_labels(c, columns.labels)
    sent = np.frombuffer(columns.values, dtype="<f8").reshape(rows, len(numbers))
    refused = ~(storable("gpu", numbers, sent) | np.isnan(sent))  # NaN is the dense form's absent
    if refused.any():
        if c.dropped is not None:
            counts = refused.sum(axis=0)
            for j in np.flatnonzero(counts).tolist():
                c.dropped[GPU_FIELDS[int(where[j])]] += int(counts[j])
        sent = np.where(refused, np.nan, sent)
    values = np.full((rows, len(GPU_FIELDS)), np.nan)
    values[:, where] = sent
    return GpuRows(t=t, gpu=gpu, values=values, label=label, labels=labels)


def _host(
    c: _BatchChecker, at: str, host: pb.HostSample, node: str, samples: list[HostSample], ib_ports: list[dict[str, Any]]
) -> None:
    """One HostSample checked, into `samples` and `ib_ports`."""
    host_t = host.t
    if not c.earliest <= host_t <= c.latest:  # NaN too; the field's name is only spelled out then
        c.time(f"{at}.t", host_t)
    samples.append(HostSample(t=host_t, node=node, metrics=c.metrics(host.metrics)))
    ports = host.ib_ports
    if not ports:
        return
    c.count(f"{at}.ib_ports", len(ports), limits.MAX_IB_PORTS_PER_BATCH)
    for i, port in enumerate(ports):
        port_at = f"{at}.ib_ports[{i}]"
        problem = limits.ib_device_problem(port.device)
        if problem is not None:
            raise c.fail(f"{port_at}.device", problem)
        row: dict[str, Any] = {
            "t": host_t,
            "device": port.device,
            "port": c.at_most(f"{port_at}.port", port.port, limits.IB_PORT_MAX, "an InfiniBand port"),
            "ib_state": c.text(f"{port_at}.ib_state", port.ib_state, limits.IB_STATE_MAX_CHARS),
        }
        row.update(c.metrics(port))
        ib_ports.append(row)


def check_hello(hello: pb.Hello) -> list[dict[str, Any]]:
    """The Hello's GPU inventory as Store.upsert_node takes it; InvalidMessage for a field out of bounds.

    A measured value of a GPU (memory size, power limit, clocks) that cannot be one is absent, as in
    samples; names, indexes and strings must be right.
    """
    c = _Checker("hello")
    for field, problem in (
        ("node", limits.node_name_problem(hello.node)),
        ("boot_id", limits.boot_id_problem(hello.boot_id)),
    ):
        if problem is not None:
            raise c.fail(field, problem)
    c.text("agent_version", hello.agent_version, limits.VERSION_MAX_CHARS)
    interval = hello.sampling_interval_seconds
    if interval != 0.0 and not (
        limits.SAMPLING_INTERVAL_MIN_SECONDS <= interval <= limits.SAMPLING_INTERVAL_MAX_SECONDS
    ):
        raise c.fail(
            "sampling_interval_seconds",
            f"{interval} s is outside {limits.SAMPLING_INTERVAL_MIN_SECONDS:g}-"
            f"{limits.SAMPLING_INTERVAL_MAX_SECONDS:g} s (0: unset)",
        )
    if not 0.0 <= hello.batch_interval_seconds <= limits.BATCH_INTERVAL_MAX_SECONDS:  # NaN fails too
        raise c.fail(
            "batch_interval_seconds",
            f"{hello.batch_interval_seconds} s is outside 0-{limits.BATCH_INTERVAL_MAX_SECONDS:g} s (0: unset)",
        )
    if not math.isfinite(hello.t):
        raise c.fail("t", f"{hello.t} is not a time")
    c.count("gpus", len(hello.gpus), limits.MAX_GPUS_PER_NODE)
    inventory: list[dict[str, Any]] = []
    seen: set[int] = set()
    for i, g in enumerate(hello.gpus):
        at = f"gpus[{i}]"
        index = c.gpu_index(f"{at}.index", g.index)
        if index in seen:
            raise c.fail(f"{at}.index", f"GPU {index} is listed twice")
        seen.add(index)
        memory = g.memory_total_bytes if g.HasField("memory_total_bytes") else None
        inventory.append(
            {
                "index": index,
                "uuid": c.text(f"{at}.uuid", g.uuid, limits.GPU_UUID_MAX_CHARS),
                "name": c.text(f"{at}.name", g.name, limits.GPU_NAME_MAX_CHARS),
                "pci_bus_id": c.text(f"{at}.pci_bus_id", g.pci_bus_id, limits.PCI_BUS_ID_MAX_CHARS),
                "serial": c.text(f"{at}.serial", g.serial, limits.GPU_SERIAL_MAX_CHARS),
                "memory_total_bytes": None if memory is None else limits.storable_metric("mem_total_bytes", memory),
                "driver_version": c.text(f"{at}.driver_version", g.driver_version, limits.VERSION_MAX_CHARS),
                "cuda_version": c.text(f"{at}.cuda_version", g.cuda_version, limits.VERSION_MAX_CHARS),
                **{
                    key: (getattr(g, key) if g.HasField(key) and math.isfinite(getattr(g, key)) else None)
                    for key in ("power_limit_watts", "sm_clock_max_mhz", "mem_clock_max_mhz")
                },
            }
        )
    return inventory


def check_batch(
    node: str,
    boot_id: str,
    batch: pb.Batch,
    received_at: float,
    window: ClockWindow = ClockWindow(),
    dropped: Counter[str] | None = None,
    held_up_to: int | None = None,
) -> IngestBatch:
    """The batch as the store and the detectors take it, every field checked; InvalidMessage otherwise.

    `node` and `boot_id` come from the stream's checked Hello (a batch's own non-empty boot_id,
    for batches spooled before a reboot, is checked here). Metric values that cannot be
    measurements (NaN, NVML's all-ones "not available") are dropped and counted in `dropped` by
    field name, so the detectors never see them: the field is absent, as for a GPU without it.
    """
    seq = batch.seq
    stream_boot_id = boot_id
    c = _BatchChecker(seq, received_at, window, dropped)
    if not limits.SEQ_MIN <= seq <= limits.SEQ_MAX:
        raise c.fail("seq", f"{seq} is not a batch number ({limits.SEQ_MIN} to 2**63-1)")
    c.time("t", batch.t)
    if batch.boot_id:
        problem = limits.boot_id_problem(batch.boot_id)
        if problem is not None:
            raise c.fail("boot_id", problem)
        boot_id = batch.boot_id
    c.count("gpus", len(batch.gpus), limits.MAX_GPU_SAMPLES_PER_BATCH)
    c.count("events", len(batch.events), limits.MAX_EVENTS_PER_BATCH)
    c.count("steps", len(batch.steps), limits.MAX_STEPS_PER_BATCH)
    gpu_samples = []
    for i, g in enumerate(batch.gpus):
        at = f"gpus[{i}]"
        _k8s(c, at, g)
        gpu_samples.append(
            GpuSample(
                t=c.time(f"{at}.t", g.t),
                node=node,
                gpu=c.gpu_index(f"{at}.gpu", g.gpu),
                metrics=c.metrics(g.metrics),
                uuid=c.text(f"{at}.uuid", g.uuid, limits.GPU_UUID_MAX_CHARS),
                job=c.text(f"{at}.job", g.job, limits.JOB_MAX_CHARS),
                rank=c.at_most(f"{at}.rank", g.rank, limits.MAX_RANK, "a rank") if g.HasField("rank") else None,
            )
        )
    gpu_rows = None
    if batch.HasField("gpu_columns"):
        if batch.gpus:
            raise c.fail("gpu_columns", "a batch carries gpus or gpu_columns, not both")
        gpu_rows = _gpu_rows(c, batch.gpu_columns)
    host_samples: list[HostSample] = []
    ib_ports: list[dict[str, Any]] = []
    if batch.HasField("host"):
        if batch.hosts:
            raise c.fail("hosts", "a batch carries host or hosts, not both")
        _host(c, "host", batch.host, node, host_samples, ib_ports)
    c.count("hosts", len(batch.hosts), limits.MAX_CYCLES_PER_BATCH)
    for i, host in enumerate(batch.hosts):
        _host(c, f"hosts[{i}]", host, node, host_samples, ib_ports)
    events = []
    for i, e in enumerate(batch.events):
        at = f"events[{i}]"
        if e.kind not in EVENT_KINDS:
            raise c.fail(f"{at}.kind", f"{limits.shown(e.kind)} is not one of {', '.join(sorted(EVENT_KINDS))}")
        xid = None
        if e.HasField("xid"):
            xid = e.xid
            if not limits.XID_MIN <= xid <= limits.XID_MAX:
                raise c.fail(f"{at}.xid", f"{xid} is not an XID ({limits.XID_MIN}-{limits.XID_MAX})")
        elif e.kind == "xid":
            raise c.fail(f"{at}.xid", "an xid event needs its XID")
        if e.source:
            problem = limits.event_source_problem(e.source)
            if problem is not None:
                raise c.fail(f"{at}.source", problem)
        events.append(
            Event(
                t=c.time(f"{at}.t", e.t),
                node=node,
                kind=e.kind,
                gpu=c.gpu_index(f"{at}.gpu", e.gpu) if e.HasField("gpu") else None,
                xid=xid,
                pci_bus_id=c.text(f"{at}.pci_bus_id", e.pci_bus_id, limits.PCI_BUS_ID_MAX_CHARS),
                uuid=c.text(f"{at}.uuid", e.uuid, limits.GPU_UUID_MAX_CHARS),
                message=c.text(f"{at}.message", e.message, limits.EVENT_MESSAGE_MAX_CHARS) or "",
                source=e.source or None,
            )
        )
    steps = []
    for i, s in enumerate(batch.steps):
        at = f"steps[{i}]"
        if not (0.0 < s.seconds < limits.MAX_STEP_SECONDS):  # NaN fails too
            raise c.fail(f"{at}.seconds", f"{s.seconds} is outside (0, {limits.MAX_STEP_SECONDS:g})")
        wall_seconds = s.wall_seconds if s.HasField("wall_seconds") else None
        if wall_seconds is not None and not (0.0 < wall_seconds < limits.MAX_STEP_SECONDS):
            raise c.fail(f"{at}.wall_seconds", f"{wall_seconds} is outside (0, {limits.MAX_STEP_SECONDS:g})")
        steps.append(
            Step(
                t=c.time(f"{at}.t", s.t),
                job=c.text(f"{at}.job", s.job, limits.STEP_JOB_MAX_CHARS, required=True) or "",
                rank=c.at_most(f"{at}.rank", s.rank, limits.MAX_RANK, "a rank"),
                node=node,
                step=c.at_most(f"{at}.step", s.step, limits.MAX_STEP, "a step number"),
                seconds=s.seconds,
                gpu=c.gpu_index(f"{at}.gpu", s.gpu) if s.HasField("gpu") else None,
                dp_rank=c.at_most(f"{at}.dp_rank", s.dp_rank, limits.MAX_RANK, "a rank")
                if s.HasField("dp_rank")
                else None,
                pp_stage=c.at_most(f"{at}.pp_stage", s.pp_stage, limits.MAX_RANK, "a pipeline stage")
                if s.HasField("pp_stage")
                else None,
                tp_rank=c.at_most(f"{at}.tp_rank", s.tp_rank, limits.MAX_RANK, "a rank")
                if s.HasField("tp_rank")
                else None,
                wall_seconds=wall_seconds,
            )
        )
    return IngestBatch(
        node=node,
        boot_id=boot_id,
        seq=seq,
        received_at=received_at,
        gpu_samples=gpu_samples,
        gpu_rows=gpu_rows,
        host_samples=host_samples,
        ib_ports=ib_ports,
        events=events,
        steps=steps,
        # Stored as it came: compaction reads the samples back from it (storage/blocks.py).
        body=batch.SerializeToString(),
        # `held_up_to`: the highest seq the stream's boot had when it said Hello; a seq above it
        # (of that boot) cannot be among the compacted batches.
        may_be_compacted=held_up_to is None or boot_id != stream_boot_id or seq <= held_up_to,
    )
