"""The bounds every field an agent sends is held to, shared by the agent's sources and the collector's checks."""

from __future__ import annotations

import math
import re

from google.protobuf.descriptor import FieldDescriptor

from fleetwatch import stepreport
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import GPU_FIELDS, HOST_FIELDS, IB_FIELDS

# The collector refuses a message that breaks one of these (INVALID_ARGUMENT, naming the field,
# collector/validate.py) before anything of it is stored or seen by a detector; the agent's sources
# use the same bounds so that what they produce passes. Text bounds never exceed the database
# column that holds the value (collector/storage/schema.py), so nothing the checks let through can
# fail at the database for its size. The step-report bounds are the client's (base/stepreport.py,
# standard library only, so it cannot import this module).

# -- names ------------------------------------------------------------------------------------

# A DNS name's length (RFC 1035 2.3.4), which host names and Kubernetes node names keep to;
# nodes.node is String(255).
NODE_NAME_MAX_CHARS = 253
# Host-name characters (letters, digits, '-', '.'), '_' (common in practice), and ':', '@', '/',
# '|' for site-qualified names ("rack1|n01" is what 0.1.0 deployments used). No space, control
# or format character: a node name is one token in every log line and a safe metric label.
NODE_NAME_CHARS = "A-Z a-z 0-9 . _ : @ / | -"
_NODE_NAME_RE = re.compile(r"[A-Za-z0-9._:@/|-]+")
# The kernel's boot id (/proc/sys/kernel/random/boot_id) is a 36-character UUID; batches.boot_id
# and nodes.boot_id are String(64).
BOOT_ID_MAX_CHARS = 64
BOOT_ID_CHARS = "A-Z a-z 0-9 . _ : -"
_BOOT_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")
# An InfiniBand device as sysfs names it ("mlx5_0", "ibp12s0"); ib_samples.device is String(64).
IB_DEVICE_MAX_CHARS = 64
_IB_DEVICE_RE = _BOOT_ID_RE
# An event's source ("nvml", "kmsg", "sampler"): a lower-case word; events.source is String(32).
EVENT_SOURCE_MAX_CHARS = 32
EVENT_SOURCE_CHARS = "a-z 0-9 _"
_EVENT_SOURCE_RE = re.compile(r"[a-z0-9_]+")

# -- free text (printable characters only: see text_problem) -----------------------------------

# Slurm job ids, "pod:<uid>", torchrun run ids; gpu_samples.job and steps.job are String(255).
# A step report's job is shorter still (STEP_JOB_MAX_CHARS, 128): it must fit one datagram.
JOB_MAX_CHARS = 255
# The Kubernetes pod a GPU is allocated to (GpuSample.k8s_*, from the kubelet's pod-resources API):
# a namespace and a container name are RFC 1123 labels of at most 63 characters, a pod name an
# RFC 1123 subdomain of at most 253 (kubernetes.io, "Object Names and IDs"). The collector does not
# store them (yet): these bound what it accepts.
K8S_NAMESPACE_MAX_CHARS = 63
K8S_POD_MAX_CHARS = 253
K8S_CONTAINER_MAX_CHARS = 63
# nvml.h's UUID buffer is 80 bytes, but every UUID NVML prints ("GPU-" + 36, "MIG-" + 36) is 40;
# gpus.uuid, gpu_samples.uuid and events.uuid are String(64).
GPU_UUID_MAX_CHARS = 64
# NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE is 32 ("00000000:18:00.0" is 16); the columns are String(32).
PCI_BUS_ID_MAX_CHARS = 32
# NVML_DEVICE_NAME_V2_BUFFER_SIZE is 96; gpus.name is String(255).
GPU_NAME_MAX_CHARS = 96
# NVML_DEVICE_SERIAL_BUFFER_SIZE is 30; gpus.serial is String(64).
GPU_SERIAL_MAX_CHARS = 64
# Driver ("570.124.06"), CUDA ("12.8") and agent versions; their columns are String(64).
VERSION_MAX_CHARS = 64
# A kernel log record is at most 1 KiB of text (CONSOLE_EXT_LOG_MAX less its dictionary); the
# agent joins a multi-line driver message into one, so 4 KiB leaves room. events.message is Text.
EVENT_MESSAGE_MAX_CHARS = 4096
# sysfs port states ("4: ACTIVE", "ACTIVE", "DOWN"); ib_samples.ib_state is String(32).
IB_STATE_MAX_CHARS = 32

# -- numbers ----------------------------------------------------------------------------------

# NVML numbers a node's GPUs 0..count-1; the largest boards hold 16 (HGX-2), so 64 leaves room.
# A GPU index at or above this is not a GPU.
MAX_GPUS_PER_NODE = 64
# XIDs are the driver's 1- to 3-digit error numbers (NVIDIA's XID catalog: 1 to 170 as of R575).
XID_MIN = 1
XID_MAX = 999
# batches.seq is a signed 64-bit column; 0 is "no batch" on the wire (Welcome.last_seq).
SEQ_MIN = 1
SEQ_MAX = 2**63 - 1
# InfiniBand port numbers are 8 bits (IBA PortInfo:LocalPortNum; 0 is a switch's management port).
IB_PORT_MAX = 255
# The agent's sampling interval as it reports it: below 10 ms NVML has nothing new to say (most of
# its counters update every 20 to 100 ms), and node_silent waits three intervals, so an hour at
# most keeps a dead node from going unnoticed for longer than that.
SAMPLING_INTERVAL_MIN_SECONDS = 0.01
SAMPLING_INTERVAL_MAX_SECONDS = 3600.0

# Step reports: the client's bounds (a rank up to 1,000,000, a step that fits a signed 64-bit
# column, seconds in (0, 86,400), a job of at most 128 characters so a report fits its datagram).
MAX_RANK = stepreport.MAX_RANK
MAX_STEP = stepreport.MAX_STEP
MAX_STEP_SECONDS = stepreport.MAX_STEP_SECONDS
STEP_JOB_MAX_CHARS = stepreport.MAX_JOB_CHARS

# -- per batch --------------------------------------------------------------------------------

# A batch of the 0.1.0 form (Batch.gpus, Batch.host) is one sampling cycle: one sample per GPU.
MAX_GPU_SAMPLES_PER_BATCH = MAX_GPUS_PER_NODE
# The dense form (Batch.gpu_columns, Batch.hosts) holds several cycles: at most this many, each
# one sample per GPU (120: a minute of samples every half second).
MAX_CYCLES_PER_BATCH = 120
MAX_GPU_ROWS_PER_BATCH = MAX_CYCLES_PER_BATCH * MAX_GPUS_PER_NODE
# Seconds an agent may gather cycles before it sends them (agent batch_interval_seconds).
BATCH_INTERVAL_MAX_SECONDS = 60.0
# XIDs come one per driver event; a storm of 1,024 in one cycle is already a dead GPU.
MAX_EVENTS_PER_BATCH = 1024
# The step receiver hands over at most 10,000 reports a cycle (StepReceiver max_queued).
MAX_STEPS_PER_BATCH = 10_000
# Host channel adapters per node, two ports each at most, with margin.
MAX_IB_PORTS_PER_BATCH = 64

# -- time -------------------------------------------------------------------------------------

# Defaults of the collector's max_clock_skew_seconds and max_data_age_seconds. A time ahead of
# the collector's clock is a wrong clock (NTP keeps nodes within milliseconds; five minutes
# forgives a drifting one), and a future sample would stand as every window's newest. Past
# times are loose: spooled batches arrive hours late after an outage, and an XID the agent reads
# from the kernel's ring buffer when it starts carries the time it happened, as old as the boot.
DEFAULT_MAX_CLOCK_SKEW_SECONDS = 300.0
DEFAULT_MAX_DATA_AGE_SECONDS = 366 * 86400.0

# -- streams ----------------------------------------------------------------------------------

# Default of the collector's max_agent_streams: above the largest fleet one collector ingests (one
# stream per node), low enough that idle streams cannot pile up without bound.
DEFAULT_MAX_AGENT_STREAMS = 20_000

# -- metric values ----------------------------------------------------------------------------

# The largest storable value of each integer metric: BIGINT for uint64 counters and masks (NVML's
# all-ones "not available" is 2**64 - 1, above it); below all ones for uint32 fields, where all
# ones is NVML's "not available" too (none of them is a count that could reach it: link widths
# and generations, flags, links up).
_INT64_MAX = 2**63 - 1
_UINT32_NOT_AVAILABLE = 2**32 - 1
_METRIC_FIELDS = frozenset(GPU_FIELDS + HOST_FIELDS + IB_FIELDS)
_INTEGER_MAX: dict[str, int] = {
    f.name: (_UINT32_NOT_AVAILABLE - 1 if f.type == FieldDescriptor.TYPE_UINT32 else _INT64_MAX)
    for d in (pb.GpuMetrics.DESCRIPTOR, pb.HostMetrics.DESCRIPTOR, pb.IbPortMetrics.DESCRIPTOR)
    for f in d.fields
    if f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) and f.name in _METRIC_FIELDS
}


def integer_metric_max(name: str) -> int | None:
    """The largest storable value of integer metric `name`; None for a field that is not an integer."""
    return _INTEGER_MAX.get(name)


def storable_metric(name: str, value: float | int) -> float | int | None:
    """`value` as the canonical metric `name` keeps it, or None when it cannot be a measurement.

    None for NaN and infinities, and for an integer field's value beyond what it can hold (NVML's
    all-ones "not available", a float of it such as 1.8e19, a negative count). The agent's NVML
    source and the collector both drop such a value, so a field is absent (never a sentinel) in
    live detection and in storage alike.
    """
    limit = _INTEGER_MAX.get(name)
    if limit is None:
        return value if math.isfinite(value) else None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return None
        value = int(value)
    return value if 0 <= value <= limit else None


# -- checks -----------------------------------------------------------------------------------

# How much of a refused value an error message quotes (escaped): enough to recognise it.
_SHOWN_CHARS = 40


def shown(value: str) -> str:
    """`value` quoted for an error message or a log line: escaped, and cut to a few dozen characters."""
    if len(value) <= _SHOWN_CHARS:
        return ascii(value)
    return f"{value[:_SHOWN_CHARS]!a}... ({len(value)} characters)"


def _first_refused(value: str, pattern: re.Pattern[str]) -> str:
    for i, char in enumerate(value):
        if not pattern.fullmatch(char):
            return f"character {char!a} at {i}"
    return "a character"  # unreachable when fullmatch(value) failed


def _name_problem(value: str, max_chars: int, pattern: re.Pattern[str], chars: str) -> str | None:
    if not value:
        return "is empty"
    if len(value) > max_chars:
        return f"is {len(value)} characters long, at most {max_chars}"
    if pattern.fullmatch(value) is None:
        return f"{shown(value)}: {_first_refused(value, pattern)} is not one of {chars}"
    return None


def node_name_problem(value: str) -> str | None:
    """Why `value` cannot be a node name (1 to 253 of NODE_NAME_CHARS), or None when it can."""
    return _name_problem(value, NODE_NAME_MAX_CHARS, _NODE_NAME_RE, NODE_NAME_CHARS)


def boot_id_problem(value: str) -> str | None:
    """Why `value` cannot be a boot id (1 to 64 of BOOT_ID_CHARS), or None when it can."""
    return _name_problem(value, BOOT_ID_MAX_CHARS, _BOOT_ID_RE, BOOT_ID_CHARS)


def ib_device_problem(value: str) -> str | None:
    """Why `value` cannot be an InfiniBand device name, or None when it can."""
    return _name_problem(value, IB_DEVICE_MAX_CHARS, _IB_DEVICE_RE, BOOT_ID_CHARS)


def event_source_problem(value: str) -> str | None:
    """Why `value` cannot be an event source (a lower-case word), or None when it can."""
    return _name_problem(value, EVENT_SOURCE_MAX_CHARS, _EVENT_SOURCE_RE, EVENT_SOURCE_CHARS)


def text_problem(value: str, max_chars: int, *, required: bool = False) -> str | None:
    """Why `value` cannot be a text field of at most `max_chars` printable characters, or None.

    Printable is str.isprintable(): no control character (NUL, which PostgreSQL text cannot hold;
    newlines and escapes, which forge log lines and drive terminals), no format character
    (bidirectional overrides that make a line read differently than it is) and no separator but
    the ASCII space.
    """
    if not value:
        return "is empty" if required else None
    if len(value) > max_chars:
        return f"is {len(value)} characters long, at most {max_chars}"
    if not value.isprintable():
        refused = next(char for char in value if not char.isprintable())
        return f"{shown(value)}: character {refused!a} at {value.index(refused)} is not printable"
    return None


def printable(value: str, max_chars: int) -> str:
    """`value` made acceptable as a text field: non-printable characters (see text_problem) become
    U+FFFD and the text is cut to `max_chars`, so one odd kernel line cannot get a batch refused."""
    if value.isprintable() and len(value) <= max_chars:
        return value
    return "".join(char if char.isprintable() else "\ufffd" for char in value[:max_chars])
