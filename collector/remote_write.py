"""Prometheus remote write: every stored sample, forwarded to the TSDBs a site already runs.

The collector sends each GPU, host and InfiniBand sample it stores to every `remote_write_urls`
receiver (Prometheus with --web.enable-remote-write-receiver, VictoriaMetrics, Mimir, Thanos
Receive) as remote write 1.0 asks: a protobuf prometheus.WriteRequest (proto/fleetwatch/prompb),
snappy block compression, `Content-Encoding: snappy`, `Content-Type: application/x-protobuf`,
`X-Prometheus-Remote-Write-Version: 0.1.0`. Series carry the agent's /metrics names, units and
labels (fleetwatch.metric_names): `fleetwatch_gpu_temperature_celsius{node, gpu, uuid}`, host
series `{node}`, InfiniBand ports `{node, device, port}`, so a dashboard reads the agents or the
TSDB alike. Left out: what the agent derives at scrape time rather than samples (the per-bit
`fleetwatch_gpu_clock_event_reason` series, `fleetwatch_ib_port_state`, XID counts, info series).

The path, after Prometheus's queue manager (storage/remote/queue_manager.go):

- `enqueue` runs on the event loop for every committed group of batches (CollectorApp._on_stored)
  and never waits. The group's samples are encoded at once, one block per kind, with numpy,
  straight into the wire format: a sample with a millisecond timestamp between 1971 and 2109 is
  always the same 18 bytes, and GPUs whose entries share a layout (nearly all: every field in
  every cycle) are written as one matrix, a row per GPU and a band per field, so Python does work
  per batch, not per series. About 0.1 us a value, compression included, against the 0.77 us a
  value of storing it (tests/bench/remote_write.py; README, Performance).
- Series are sharded by (node, GPU): every sample of a series goes through one shard, whose
  requests go out one at a time and in order, so a receiver sees each series in time order.
  Samples no newer than what was already queued for their GPU (a late, spooled batch) are
  dropped and counted: Prometheus would refuse the whole request for them (out of order).
- A shard fills a request up to `max_samples_per_send` samples, or sends what it has after
  `batch_send_deadline`; the request is compressed once and queued for every receiver (shared
  bytes: N receivers cost one encoding and, while they keep up, one copy). Queued requests are
  snappy-compressed, about 5 bytes a sample.
- Each receiver's shard queue holds at most capacity / shards samples; past that the oldest
  requests are dropped and counted (queue_full). Prometheus blocks on its WAL instead; here the
  database already holds everything, and ingest must never wait for a TSDB.
- A 5xx, a 408, 425 or 429, or no answer is retried with exponential backoff from `min_backoff` to
  `max_backoff` (doubling, as Prometheus does), or after the answer's Retry-After; any other
  answer (400: out of order, too old, malformed) drops the request and counts it (rejected).

Metrics follow prometheus_remote_storage_*: samples sent, retried (each retry of a request counts
its samples) and dropped by reason, requests by HTTP code, bytes sent, queue depth and capacity,
and the newest sample timestamp queued and sent (their difference is the lag).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import operator
import struct
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import cramjam
import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fleetwatch import __version__
from fleetwatch.asyncwait import wait_any
from fleetwatch.collector.notify.webhook import ANSWER_CHARS, RETRYABLE_CLIENT_ERRORS, scrub, split_userinfo
from fleetwatch.collector.storage.store import GpuRows, IngestBatch
from fleetwatch.configfile import url_origin
from fleetwatch.metric_names import GPU_METRICS, HOST_METRICS, IB_ACTIVE, IB_METRICS, FieldMetric
from fleetwatch.records import GpuSample, HostSample
from fleetwatch.wire import GPU_FIELDS, HOST_FIELDS

log = logging.getLogger(__name__)

HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "User-Agent": f"fleetwatch/{__version__}",
}
# A Retry-After beyond this is cut to it: the shard waits no longer than its queue could hold data.
MAX_RETRY_AFTER_SECONDS = 300.0
# Warnings about one receiver (rejected requests, failures) at most this often; the rest at debug.
WARN_EVERY_SECONDS = 60.0
# The per-series bookkeeping (newest timestamp queued) is cleared past this many series: a fleet
# of 10,000 8-GPU nodes has 90,000; GPUs that left would otherwise stay for ever.
MAX_TRACKED_SERIES = 1_000_000
DROP_REASONS = ("queue_full", "out_of_order", "rejected", "shutdown", "error")

# ---- the wire format (prompb: WriteRequest.timeseries = 1, TimeSeries.labels = 1 / samples = 2,
# Label.name = 1 / value = 2, Sample.value = 1 (double) / timestamp = 2 (int64 varint)) --------------

# The fast path's timestamps: milliseconds in [2^35, 2^42) are varints of exactly 6 bytes.
_FAST_MIN_MS = 1 << 35
_FAST_MAX_MS = 1 << 42
_TS_BYTES = 6
# One sample as TimeSeries.samples: tag 0x12, length 16, then Sample: 0x09 + 8-byte double, 0x10 + varint.
_CELL = 3 + 8 + 1 + _TS_BYTES
_CELL_HEAD = np.frombuffer(bytes([0x12, 2 + 8 + _TS_BYTES, 0x09]), dtype=np.uint8)


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; a negative int64 as its 64-bit two's complement (10 bytes)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Varints of the lengths an entry has (a series' run in one batch is far below 16 KiB): a lookup, not a loop.
_VARINTS = [varint(i) for i in range(1 << 14)]


def _length(n: int) -> bytes:
    return _VARINTS[n] if n < 16384 else varint(n)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _length(len(payload)) + payload


def label_bytes(name: str, value: str) -> bytes:
    """One TimeSeries.labels entry; an empty value is no label (Prometheus drops it too)."""
    if not value:
        return b""
    return _field(0x0A, _field(0x0A, name.encode()) + _field(0x12, value.encode()))


def _sample_bytes(value: float, timestamp_ms: int) -> bytes:
    """The slow path's sample (any timestamp), as the fast path writes it."""
    return _field(0x12, b"\x09" + struct.pack("<d", value) + b"\x10" + varint(timestamp_ms))


@dataclass(frozen=True)
class _Table:
    """A metric table aligned to the columns it is fed: name labels and the unit scaling."""

    names: tuple[bytes, ...]  # the `__name__` label entry of each column
    scaled: np.ndarray  # the columns whose unit changes (percent to ratio, MHz to Hz, ...)
    numerator: np.ndarray  # of those columns
    denominator: np.ndarray

    @classmethod
    def of(cls, specs: Sequence[FieldMetric]) -> _Table:
        scaled = [i for i, s in enumerate(specs) if s.scale != 1]
        return cls(
            names=tuple(label_bytes("__name__", s.name) for s in specs),
            scaled=np.array(scaled, dtype=np.int64),
            # FieldMetric.convert's arithmetic, column-wise: value * numerator / denominator.
            numerator=np.array([float(specs[i].scale.numerator) for i in scaled]),
            denominator=np.array([float(specs[i].scale.denominator) for i in scaled]),
        )

    def convert(self, values: np.ndarray) -> np.ndarray:
        """`values` (rows by the table's columns) in the metrics' units, in place."""
        if len(self.scaled):
            values[:, self.scaled] = values[:, self.scaled] * self.numerator / self.denominator
        return values


_GPU_SPECS = {spec.canonical: spec for spec in GPU_METRICS}
_GPU_TABLE = _Table.of([_GPU_SPECS[name] for name in GPU_FIELDS])  # GpuRows.values' columns
_GPU_COLUMN = {name: i for i, name in enumerate(GPU_FIELDS)}
_HOST_SPECS = {spec.canonical: spec for spec in HOST_METRICS}
_HOST_TABLE = _Table.of([_HOST_SPECS[name] for name in HOST_FIELDS])
_HOST_VALUES = operator.itemgetter(*HOST_FIELDS)
# InfiniBand: the state text becomes fleetwatch_ib_port_up (1 for ACTIVE), as on the agent's /metrics.
_IB_TABLE = _Table.of(IB_METRICS)
_IB_KEYS = tuple(spec.canonical for spec in IB_METRICS)


# One entity's entries of one block, for one shard: (WriteRequest.timeseries entries, one after
# the other; where each ends in those bytes; each one's sample count; the samples in all; the
# newest timestamp in ms). Entries stay whole: a request may end between two of them.
Chunk = tuple[bytes, list[int], list[int], int, int]
# A class of groups (same layout) is written as a matrix from this many groups up; fewer, entry
# by entry (each band costs two numpy calls: worth it for several groups, not for one).
_CLASS_MIN_GROUPS = 4
# The reused matrix buffer at most (a commit group of 64 8-GPU batches is about 7 MB).
_SCRATCH_MAX_BYTES = 8 << 20


@dataclass(frozen=True)
class _Group:
    """The rows of one entity (a GPU, a host, a port) in a block: its labels, shard and series key."""

    labels: bytes  # every label after __name__, sorted by name
    shard: int
    key: tuple[Any, ...]


class _Rows:
    """One kind's rows from the batches of one enqueue call, and the groups they belong to."""

    def __init__(self) -> None:
        self.t: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.group: list[np.ndarray] = []  # per row, an index into groups
        self.groups: list[_Group] = []
        self._index: dict[tuple[Any, ...], int] = {}

    def index(self, group: _Group) -> int:
        g = self._index.get(group.key)
        if g is None:
            g = self._index[group.key] = len(self.groups)
            self.groups.append(group)
        return g

    def add(self, t: np.ndarray, values: np.ndarray, group: np.ndarray) -> None:
        self.t.append(t)
        self.values.append(values)
        self.group.append(group)


class Encoder:
    """Stored batches into TimeSeries entries per shard, in the wire format (event loop only)."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        # Series key -> newest timestamp (ms) queued: later samples only, per GPU, host or port.
        self.newest: dict[tuple[Any, ...], int] = {}
        # (kind, node, ...) -> its _Group: label bytes and shard are made once per GPU, not per batch.
        self._groups: dict[tuple[Any, ...], _Group] = {}
        self.out_of_order = 0  # samples dropped as no newer than what was queued
        self._buffer = np.empty(0, dtype=np.uint8)
        self.chunks: list[list[Chunk]] = [[] for _ in range(shards)]  # per shard, filled by encode()

    def _group(self, key: tuple[Any, ...]) -> _Group:
        """("gpu", node, gpu, uuid), ("host", node) or ("ib", node, device, port)."""
        group = self._groups.get(key)
        if group is not None:
            return group
        if len(self._groups) > MAX_TRACKED_SERIES:
            self._groups.clear()
        kind, node = key[0], key[1]
        node_label = label_bytes("node", node)
        gpu = -1
        if kind == "gpu":
            gpu = key[2]
            labels = label_bytes("gpu", str(gpu)) + node_label + label_bytes("uuid", key[3])
        elif kind == "ib":
            labels = label_bytes("device", key[2]) + node_label + label_bytes("port", str(key[3]))
        else:
            labels = node_label
        # A node's GPUs on consecutive shards, its host and ports with GPU -1's.
        shard = (zlib.crc32(node.encode()) + gpu + 1) % self.shards
        group = self._groups[key] = _Group(labels, shard, key)
        return group

    def encode(self, items: Sequence[IngestBatch], stored: Sequence[bool]) -> list[list[Chunk]]:
        """The new batches' samples as chunks per shard, in time order per series.

        The rows of every batch in the call are encoded together, one block per kind (GPUs, hosts,
        ports): numpy's fixed cost per operation is paid once per commit group, not per batch.
        """
        self.chunks = [[] for _ in range(self.shards)]
        if len(self.newest) > MAX_TRACKED_SERIES:
            self.newest.clear()
        gpus, hosts, ports = _Rows(), _Rows(), _Rows()
        for item, new in zip(items, stored):
            if not new:
                continue
            if item.gpu_rows is not None and len(item.gpu_rows):
                self._gpu_rows(gpus, item.node, item.gpu_rows)
            if item.gpu_samples:
                self._gpu_samples(gpus, item.node, item.gpu_samples)
            if item.host_samples:
                self._host(hosts, item.node, item.host_samples)
            if item.ib_ports:
                self._ib(ports, item.node, item.ib_ports)
        for rows, table in ((gpus, _GPU_TABLE), (hosts, _HOST_TABLE), (ports, _IB_TABLE)):
            if rows.t:
                self._block(
                    np.concatenate(rows.t), np.concatenate(rows.values), np.concatenate(rows.group), rows.groups, table
                )
        return self.chunks

    # -- per kind -----------------------------------------------------------------------------

    def _gpu_rows(self, out: _Rows, node: str, rows: GpuRows) -> None:
        # One group per (GPU, uuid) the rows hold: found over the few distinct (GPU, label entry)
        # pairs, not row by row (a label entry changes with the job; the uuid does not).
        width = max(len(rows.labels), 1)
        pair = rows.gpu * width + rows.label
        lookup = np.zeros(int(pair.max()) + 1, dtype=np.int64)
        for key in np.flatnonzero(np.bincount(pair)).tolist():
            gpu, label = divmod(key, width)
            lookup[key] = out.index(self._group(("gpu", node, gpu, rows.labels[label][0] or "")))
        out.add(rows.t, rows.values, lookup[pair])

    def _gpu_samples(self, out: _Rows, node: str, samples: Sequence[GpuSample]) -> None:
        """The per-sample form (0.1.0 agents): one row each."""
        values = np.full((len(samples), len(GPU_FIELDS)), math.nan)
        row_group = np.empty(len(samples), dtype=np.int64)
        for row, sample in enumerate(samples):
            for name, value in sample.metrics.items():
                values[row, _GPU_COLUMN[name]] = value  # check_batch kept canonical fields only
            row_group[row] = out.index(self._group(("gpu", node, sample.gpu, sample.uuid or "")))
        out.add(np.array([s.t for s in samples]), values, row_group)

    def _host(self, out: _Rows, node: str, samples: Sequence[HostSample]) -> None:
        try:  # a host reports every field (psutil has them all): one C call a sample
            rows = [_HOST_VALUES(s.metrics) for s in samples]
        except KeyError:
            rows = [tuple(s.metrics.get(name, math.nan) for name in HOST_FIELDS) for s in samples]
        values = np.array(rows, dtype=np.float64).reshape(len(samples), len(HOST_FIELDS))
        g = out.index(self._group(("host", node)))
        out.add(np.array([s.t for s in samples]), values, np.full(len(samples), g, dtype=np.int64))

    def _ib(self, out: _Rows, node: str, ports: Sequence[Mapping[str, Any]]) -> None:
        row_group = np.empty(len(ports), dtype=np.int64)
        rows = []
        for row, port in enumerate(ports):
            row_group[row] = out.index(self._group(("ib", node, str(port["device"]), int(port["port"]))))
            state = port.get("ib_state")
            rows.append(
                [
                    (math.nan if not state else float(state == IB_ACTIVE))
                    if key == "ib_state"
                    else (math.nan if port.get(key) is None else float(port[key]))
                    for key in _IB_KEYS
                ]
            )
        values = np.array(rows, dtype=np.float64).reshape(len(ports), len(_IB_KEYS))
        out.add(np.array([float(p["t"]) for p in ports]), values, row_group)

    # -- the encoding -------------------------------------------------------------------------

    def _block(
        self, t: np.ndarray, values: np.ndarray, row_group: np.ndarray, groups: list[_Group], table: _Table
    ) -> None:
        """Rows (time, canonical values with NaN absent, group) into one entry per group and field."""
        n = len(t)
        if not n:
            return
        order = np.lexsort((t, row_group))
        ts = np.rint(t[order] * 1000.0).astype(np.int64)
        gid = row_group[order]
        raw = values[order]
        bounds = (np.flatnonzero(gid[1:] != gid[:-1]) + 1).tolist()
        starts, ends = [0, *bounds], [*bounds, n]
        stamps = ts.tolist()
        # Later samples only: a second sample at one time, or one no newer than the series' newest
        # already queued (a late batch), would make Prometheus refuse the whole request.
        keep: np.ndarray | None = None
        repeated = (ts[1:] == ts[:-1]) & (gid[1:] == gid[:-1])
        if repeated.any():
            keep = np.concatenate(([True], ~repeated))
        for a, b, g in zip(starts, ends, gid[starts].tolist()):
            key = groups[g].key
            last = self.newest.get(key)
            if last is not None and stamps[a] <= last:
                if keep is None:
                    keep = np.ones(n, dtype=bool)
                keep[a:b] &= ts[a:b] > last
            if last is None or stamps[b - 1] > last:
                self.newest[key] = stamps[b - 1]
        present = ~np.isnan(raw)
        if keep is not None:
            self.out_of_order += int(np.count_nonzero(present[~keep]))
            present &= keep[:, None]
        if not present.any():
            return
        names = table.names
        converted = table.convert(raw)  # raw is a copy (fancy-indexed); a field no row has just has no entries
        counts = np.add.reduceat(present, starts, axis=0, dtype=np.int64)
        fast = _FAST_MIN_MS <= int(ts.min()) and int(ts.max()) < _FAST_MAX_MS  # noqa: SIM300
        first = gid[starts].tolist()
        # Groups whose fields are each in every row or in none, by (labels' length, rows, fields):
        # their entries have one layout, written for the whole class at once (_write_class).
        sizes = np.subtract(ends, starts)
        whole = ((counts == sizes[:, None]) | (counts == 0)).all(axis=1).tolist() if fast else [False] * len(starts)
        classes: dict[tuple[int, int, bytes], list[int]] = {}
        loose: list[int] = []
        totals = counts.sum(axis=1).tolist()
        for i, g in enumerate(first):
            if not totals[i]:  # every row of it late, or no field at all
                continue
            if whole[i]:
                classes.setdefault((len(groups[g].labels), ends[i] - starts[i], (counts[i] > 0).tobytes()), []).append(
                    i
                )
            else:
                loose.append(i)
        for (_, rows, _), members in classes.items():
            if len(members) >= _CLASS_MIN_GROUPS:
                self._write_class(members, rows, starts, first, counts, ts, converted, groups, names)
            else:
                loose.extend(members)
        if not loose:
            return
        # The rest entry by entry: a GPU that missed a field in some rows, or a class too small to
        # be worth its numpy calls.
        blob = _cells(ts, converted).tobytes() if fast else b""
        column_step = n * _CELL
        count_lists = counts.tolist()
        for i in loose:
            a, b, group = starts[i], ends[i], groups[first[i]]
            labels = group.labels
            entries: list[bytes] = []
            sample_counts: list[int] = []
            for j, count in enumerate(count_lists[i]):
                if not count:
                    continue
                if fast and count == b - a:
                    base = a * _CELL + j * column_step
                    samples = blob[base : base + count * _CELL]
                elif fast:
                    picked = (np.flatnonzero(present[a:b, j]) + (j * n + a)).tolist()
                    samples = b"".join([blob[r * _CELL : (r + 1) * _CELL] for r in picked])
                else:
                    picked = (np.flatnonzero(present[a:b, j]) + a).tolist()
                    samples = b"".join([_sample_bytes(converted[r, j], stamps[r]) for r in picked])
                name = names[j]
                entries.append(b"\x0a" + _length(len(name) + len(labels) + len(samples)) + name + labels + samples)
                sample_counts.append(count)
            if entries:
                offsets = np.cumsum([len(e) for e in entries]).tolist()
                data = b"".join(entries)
                self.chunks[group.shard].append((data, offsets, sample_counts, sum(sample_counts), stamps[b - 1]))

    def _write_class(
        self,
        members: list[int],
        rows: int,
        starts: list[int],
        first: list[int],
        counts: np.ndarray,
        ts: np.ndarray,
        converted: np.ndarray,
        groups: list[_Group],
        names: Sequence[bytes],
    ) -> None:
        """The entries of groups with one layout, as a matrix: a row per group, a band per field.

        Every group's entries have the same lengths, so one template row holds what they share
        (tags, lengths, name labels); the groups' labels and samples are copied in band by band,
        2 numpy calls a field instead of Python work per entry.
        """
        columns = np.flatnonzero(counts[members[0]] > 0)
        width = len(members)
        if width * rows == len(ts):  # the class is the whole block (the usual case): no gathering
            class_ts, class_values = ts, converted
        else:
            row_index = (np.asarray([starts[i] for i in members])[:, None] + np.arange(rows)).ravel()
            class_ts, class_values = ts[row_index], converted[row_index]
        if len(columns) < class_values.shape[1]:
            class_values = class_values[:, columns]
        cells = _cells(class_ts, class_values).reshape(len(columns), width, rows * _CELL)
        labels = [groups[first[i]].labels for i in members]
        label_size = len(labels[0])
        span = rows * _CELL
        bands: list[tuple[int, np.ndarray]] = []  # per field: where its entry starts in a row, its head
        offsets: list[int] = []
        at = 0
        for j in columns.tolist():
            name = names[j]
            head = b"\x0a" + _length(len(name) + label_size + span) + name
            bands.append((at, np.frombuffer(head, dtype=np.uint8)))
            at += len(head) + label_size + span
            offsets.append(at)
        out = self._scratch(width * at).reshape(width, at)
        label_matrix = np.frombuffer(b"".join(labels), dtype=np.uint8).reshape(width, label_size)
        for k, (start, head_bytes) in enumerate(bands):
            label_at = start + len(head_bytes)
            out[:, start:label_at] = head_bytes
            out[:, label_at : label_at + label_size] = label_matrix
            out[:, label_at + label_size : label_at + label_size + span] = cells[k]
        sample_counts = [rows] * len(columns)
        samples = rows * len(columns)
        for r, i in enumerate(members):
            group = groups[first[i]]
            newest = int(ts[starts[i] + rows - 1])
            self.chunks[group.shard].append((out[r].tobytes(), offsets, sample_counts, samples, newest))

    def _scratch(self, size: int) -> np.ndarray:
        """A reused buffer: a fresh one of megabytes costs its page faults on every call."""
        if size > _SCRATCH_MAX_BYTES:  # a rare huge group of batches: not kept afterwards
            return np.empty(size, dtype=np.uint8)
        if len(self._buffer) < size:
            self._buffer = np.empty(min(max(size, 2 * len(self._buffer)), _SCRATCH_MAX_BYTES), dtype=np.uint8)
        return self._buffer[:size]


_TS_SHIFTS = np.arange(_TS_BYTES, dtype=np.int64) * 7
_TS_CONTINUE = np.array([0x80] * (_TS_BYTES - 1) + [0], dtype=np.int64)


def _cells(ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Every (column, row) sample as its 18 wire bytes, a row per column: a series' run is contiguous.

    A row's cell (header, timestamp varint) is made once and copied to every column as whole rows;
    the doubles go in through a strided float view: numpy never moves single bytes.
    """
    n, k = values.shape
    row = np.empty((n, _CELL), dtype=np.uint8)
    row[:, :3] = _CELL_HEAD
    row[:, 11] = 0x10
    row[:, 12:] = ((ts[:, None] >> _TS_SHIFTS) & 0x7F) | _TS_CONTINUE
    out = np.empty((k, n * _CELL), dtype=np.uint8)
    out[...] = row.reshape(1, n * _CELL)
    np.ndarray((k, n), dtype="<f8", buffer=out, offset=3, strides=(n * _CELL, _CELL))[...] = values.T
    return out


# ---- the queue and the senders ----------------------------------------------------------------------


@dataclass
class _Request:
    """One WriteRequest, snappy-compressed, shared by every receiver's queue."""

    body: bytes
    samples: int
    newest_ms: int


@dataclass
class _Open:
    """A shard's request being filled."""

    parts: list[bytes] = field(default_factory=list)
    samples: int = 0
    newest_ms: int = 0
    opened_at: float = 0.0  # time.monotonic() of its first entry


@dataclass
class _Receiver:
    """One remote-write URL: a queue and a sender per shard, and what happened to its samples."""

    url: str  # without userinfo, which is sent as `authorization`
    authorization: str | None
    configured: str  # as configured: what scrub() hides in error texts
    name: str  # scheme://host:port/... (the `url` label; #N when two share it)
    queues: list[deque[_Request]]
    queued: list[int]  # samples per shard queue
    inflight: list[_Request | None]
    wakes: list[asyncio.Event]
    samples: Counter[str] = field(default_factory=Counter)  # sent, retried
    dropped: Counter[str] = field(default_factory=Counter)  # by DROP_REASONS
    requests: Counter[str] = field(default_factory=Counter)  # by HTTP code; "error": no answer
    bytes_sent: int = 0
    queued_bytes: int = 0
    failures: int = 0  # requests failed in a row (retried)
    last_success: float | None = None
    highest_sent_ms: int | None = None
    warned_at: float = -math.inf

    def pending(self) -> int:
        return sum(self.queued) + sum(r.samples for r in self.inflight if r is not None)


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110); None when absent or past."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    return seconds if seconds > 0 and math.isfinite(seconds) else None


class RemoteWriter:
    """Sends stored samples to remote-write receivers; `enqueue` on the event loop, senders as its tasks."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        shards: int = 4,
        max_samples_per_send: int = 10_000,
        batch_send_deadline_seconds: float = 5.0,
        capacity_samples: int = 10_000_000,
        min_backoff_seconds: float = 0.03,
        max_backoff_seconds: float = 5.0,
        timeout_seconds: float = 30.0,
        clock: Any = time.time,
    ) -> None:
        self.shards = shards
        self.max_samples_per_send = max_samples_per_send
        self.deadline_seconds = batch_send_deadline_seconds
        # Per receiver and shard; never below one full request, which is always kept.
        self.shard_capacity = max(capacity_samples // shards, max_samples_per_send)
        self.capacity_samples = self.shard_capacity * shards
        self.min_backoff = min_backoff_seconds
        self.max_backoff = max(max_backoff_seconds, min_backoff_seconds)
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self.encoder = Encoder(shards)
        self.receivers: list[_Receiver] = []
        names: Counter[str] = Counter()
        for configured in dict.fromkeys(urls):
            url, authorization = split_userinfo(configured)
            origin = url_origin(configured)
            names[origin] += 1
            self.receivers.append(
                _Receiver(
                    url=url,
                    authorization=authorization,
                    configured=configured,
                    name=origin if names[origin] == 1 else f"{origin}#{names[origin]}",
                    queues=[deque() for _ in range(shards)],
                    queued=[0] * shards,
                    inflight=[None] * shards,
                    wakes=[asyncio.Event() for _ in range(shards)],
                )
            )
        self._open = [_Open() for _ in range(shards)]
        self._sealer_wake = asyncio.Event()
        self.highest_enqueued_ms: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    # -- ingest side (event loop) -----------------------------------------------------------------

    def enqueue(self, items: Sequence[IngestBatch], stored: Sequence[bool]) -> None:
        """Queue the samples of the newly stored batches for every receiver; never waits."""
        late = self.encoder.out_of_order
        try:
            encoded = self.encoder.encode(items, stored)
        except Exception:  # a fault of our own must not reach the ingest path
            log.exception("remote write: cannot encode %d batches; their samples are not sent", len(items))
            return
        for shard, chunks in enumerate(encoded):
            for chunk in chunks:
                self._add(shard, chunk)
        late = self.encoder.out_of_order - late
        if late:
            for receiver in self.receivers:
                receiver.dropped["out_of_order"] += late

    def _add(self, shard: int, chunk: Chunk) -> None:
        data, offsets, counts, samples, newest_ms = chunk
        buffer = self._open[shard]
        if buffer.samples + samples <= self.max_samples_per_send:  # usually: the chunk whole
            if not buffer.samples:
                buffer.opened_at = time.monotonic()
                self._sealer_wake.set()
            buffer.parts.append(data)
            buffer.samples += samples
            buffer.newest_ms = max(buffer.newest_ms, newest_ms)
        else:  # the request fills up within it: split between entries
            i, total, cut = 0, len(counts), 0
            while i < total:
                room = self.max_samples_per_send - buffer.samples
                j, taken = i, 0
                # Whole entries while they fit; an empty request takes at least one, however large.
                while j < total and (taken + counts[j] <= room or not (buffer.samples or taken)):
                    taken += counts[j]
                    j += 1
                if j == i:
                    self._seal(shard)
                    buffer = self._open[shard]
                    continue
                if not buffer.samples:
                    buffer.opened_at = time.monotonic()
                    self._sealer_wake.set()
                buffer.parts.append(data[cut : offsets[j - 1]])
                cut = offsets[j - 1]
                buffer.samples += taken
                buffer.newest_ms = max(buffer.newest_ms, newest_ms)
                i = j
                if buffer.samples >= self.max_samples_per_send:
                    self._seal(shard)
                    buffer = self._open[shard]
        if self.highest_enqueued_ms is None or newest_ms > self.highest_enqueued_ms:
            self.highest_enqueued_ms = newest_ms
        if buffer.samples >= self.max_samples_per_send:
            self._seal(shard)

    def _seal(self, shard: int) -> None:
        """The shard's open request compressed and queued for every receiver (oldest dropped past capacity)."""
        buffer = self._open[shard]
        if not buffer.samples:
            return
        request = _Request(bytes(cramjam.snappy.compress_raw(b"".join(buffer.parts))), buffer.samples, buffer.newest_ms)
        self._open[shard] = _Open()
        for receiver in self.receivers:
            queue = receiver.queues[shard]
            queue.append(request)
            receiver.queued[shard] += request.samples
            receiver.queued_bytes += len(request.body)
            while receiver.queued[shard] > self.shard_capacity and len(queue) > 1:
                oldest = queue.popleft()
                receiver.queued[shard] -= oldest.samples
                receiver.queued_bytes -= len(oldest.body)
                receiver.dropped["queue_full"] += oldest.samples
            receiver.wakes[shard].set()

    # -- sending (tasks on the event loop) -------------------------------------------------------

    def start(self) -> None:
        """Starts the senders; call from a coroutine on the collector's event loop."""
        if self._tasks:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # at most one request per shard and receiver anyway
            timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
        )
        self._tasks = [asyncio.create_task(self._sealer(), name="remote-write-batches")]
        for receiver in self.receivers:
            for shard in range(self.shards):
                self._tasks.append(
                    asyncio.create_task(self._sender(receiver, shard), name=f"remote-write {receiver.name} {shard}")
                )

    async def _sealer(self) -> None:
        """Sends a shard's partial request once its first sample waited batch_send_deadline."""
        while True:
            now = time.monotonic()
            due_at: float | None = None
            for shard, buffer in enumerate(self._open):
                if not buffer.samples:
                    continue
                at = buffer.opened_at + self.deadline_seconds
                if at <= now:
                    self._seal(shard)
                elif due_at is None or at < due_at:
                    due_at = at
            self._sealer_wake.clear()
            await wait_any(self._sealer_wake, timeout_seconds=self.deadline_seconds if due_at is None else due_at - now)

    async def _sender(self, receiver: _Receiver, shard: int) -> None:
        queue, wake = receiver.queues[shard], receiver.wakes[shard]
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
                continue
            request = queue.popleft()
            receiver.queued[shard] -= request.samples
            receiver.queued_bytes -= len(request.body)
            receiver.inflight[shard] = request
            try:
                await self._deliver(receiver, request)
            except Exception:  # a fault of our own: this request is lost, the shard goes on
                receiver.dropped["error"] += request.samples
                log.exception("remote write: sending %d samples to %s failed", request.samples, receiver.name)
            finally:
                receiver.inflight[shard] = None

    async def _deliver(self, receiver: _Receiver, request: _Request) -> None:
        """Until the receiver takes the request or refuses it for good; retries wait with backoff."""
        backoff = self.min_backoff
        while True:
            code, retry_after, problem = await self._post(receiver, request)
            receiver.requests[code] += 1
            if problem is None:
                receiver.samples["sent"] += request.samples
                receiver.bytes_sent += len(request.body)
                receiver.last_success = self.clock()
                if receiver.highest_sent_ms is None or request.newest_ms > receiver.highest_sent_ms:
                    receiver.highest_sent_ms = request.newest_ms
                if receiver.failures:
                    log.info(
                        "remote write: %s takes samples again (after %d failed requests)",
                        receiver.name,
                        receiver.failures,
                    )
                    receiver.failures = 0
                return
            if code != "error" and not code.startswith("5") and int(code) not in RETRYABLE_CLIENT_ERRORS:
                receiver.dropped["rejected"] += request.samples
                self._warn(
                    receiver,
                    "remote write: %s refused %d samples (%s); dropped",
                    receiver.name,
                    request.samples,
                    problem,
                )
                return
            receiver.failures += 1
            delay = backoff if retry_after is None else min(retry_after, MAX_RETRY_AFTER_SECONDS)
            self._warn(receiver, "remote write: %s failed (%s); retrying in %.2f s", receiver.name, problem, delay)
            await asyncio.sleep(delay)
            receiver.samples["retried"] += request.samples
            # Prometheus doubles the delay it just waited, Retry-After included, up to max_backoff.
            backoff = min(self.max_backoff, max(delay, self.min_backoff) * 2)

    async def _post(self, receiver: _Receiver, request: _Request) -> tuple[str, float | None, str | None]:
        """(HTTP code or "error", Retry-After seconds, problem or None when taken)."""
        assert self._session is not None
        headers = HEADERS if receiver.authorization is None else {**HEADERS, "Authorization": receiver.authorization}
        try:
            async with self._session.post(receiver.url, data=request.body, headers=headers) as response:
                if 200 <= response.status < 300:
                    await response.read()
                    return str(response.status), None, None
                answer = (await response.content.read(ANSWER_CHARS)).decode(errors="replace").strip()
                retry_after = _retry_after(response.headers.get("Retry-After"), self.clock())
                return (
                    str(response.status),
                    retry_after,
                    f"HTTP {response.status}: {scrub(answer, receiver.configured)}",
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return "error", None, scrub(f"{type(exc).__name__}: {exc}", receiver.configured)

    def _warn(self, receiver: _Receiver, message: str, *args: Any) -> None:
        now = time.monotonic()
        level = logging.WARNING if now - receiver.warned_at >= WARN_EVERY_SECONDS else logging.DEBUG
        if level == logging.WARNING:
            receiver.warned_at = now
        log.log(level, message, *args)

    async def close(self, flush_seconds: float = 2.0) -> None:
        """Sends what is queued for up to `flush_seconds`, then stops; what is left is counted dropped."""
        for shard in range(self.shards):
            self._seal(shard)
        deadline = time.monotonic() + flush_seconds
        while self._tasks and time.monotonic() < deadline and any(r.pending() for r in self.receivers):
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for receiver in self.receivers:
            left = receiver.pending()
            if left:
                receiver.dropped["shutdown"] += left
                log.warning("remote write: %d samples for %s not sent before shutdown", left, receiver.name)
            for shard in range(self.shards):
                receiver.queues[shard].clear()
                receiver.queued[shard] = 0
                receiver.inflight[shard] = None
            receiver.queued_bytes = 0
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- /metrics ------------------------------------------------------------------------------

    def open_samples(self) -> int:
        """Samples in requests still being filled (waiting for every receiver)."""
        return sum(buffer.samples for buffer in self._open)

    def metrics(self) -> Iterator[Metric]:
        samples = CounterMetricFamily(
            "fleetwatch_remote_write_samples",
            "Samples by what became of them: sent (the receiver took them), retried (each retry of a failed "
            "request counts its samples again), dropped (see fleetwatch_remote_write_samples_dropped_total).",
            labels=["url", "result"],
        )
        dropped = CounterMetricFamily(
            "fleetwatch_remote_write_samples_dropped",
            "Samples never sent, by reason: queue_full (the oldest, past remote_write_capacity_samples), "
            "out_of_order (no newer than what was already queued for their series: a late batch), rejected "
            "(a 4xx answer other than 408, 425 or 429), shutdown (queued when the collector stopped), error "
            "(a fault in the collector, logged).",
            labels=["url", "reason"],
        )
        requests = CounterMetricFamily(
            "fleetwatch_remote_write_requests",
            "Remote-write requests by HTTP status code (error: no answer, a refused connection or a timeout).",
            labels=["url", "code"],
        )
        sent_bytes = CounterMetricFamily(
            "fleetwatch_remote_write_sent_bytes", "Bytes of requests the receiver took, compressed.", labels=["url"]
        )
        queued = GaugeMetricFamily(
            "fleetwatch_remote_write_queue_samples",
            "Samples waiting for the receiver: queued, in flight (retries included) and in requests being filled.",
            labels=["url"],
        )
        queued_bytes = GaugeMetricFamily(
            "fleetwatch_remote_write_queue_bytes",
            "Bytes of compressed requests queued for the receiver (shared between receivers in memory).",
            labels=["url"],
        )
        capacity = GaugeMetricFamily(
            "fleetwatch_remote_write_queue_capacity_samples",
            "Samples the receiver's queue holds before the oldest are dropped.",
            labels=["url"],
        )
        last = GaugeMetricFamily(
            "fleetwatch_remote_write_last_success_timestamp_seconds",
            "When the receiver last took a request (absent: never).",
            labels=["url"],
        )
        highest_sent = GaugeMetricFamily(
            "fleetwatch_remote_write_highest_sent_timestamp_seconds",
            "Newest sample timestamp the receiver took (Prometheus's queue_highest_sent_timestamp_seconds); "
            "fleetwatch_remote_write_highest_timestamp_seconds minus this is how far it lags.",
            labels=["url"],
        )
        highest = GaugeMetricFamily(
            "fleetwatch_remote_write_highest_timestamp_seconds",
            "Newest sample timestamp queued for remote write (Prometheus's highest_timestamp_in_seconds).",
            labels=["url"],
        )
        filling = self.open_samples()
        for r in self.receivers:
            for result in ("sent", "retried"):
                samples.add_metric([r.name, result], r.samples[result])
            samples.add_metric([r.name, "dropped"], sum(r.dropped.values()))
            for reason in DROP_REASONS:
                dropped.add_metric([r.name, reason], r.dropped[reason])
            for code, n in sorted(r.requests.items()):
                requests.add_metric([r.name, code], n)
            sent_bytes.add_metric([r.name], r.bytes_sent)
            queued.add_metric([r.name], r.pending() + filling)
            queued_bytes.add_metric([r.name], r.queued_bytes)
            capacity.add_metric([r.name], self.capacity_samples)
            if r.last_success is not None:
                last.add_metric([r.name], r.last_success)
            if r.highest_sent_ms is not None:
                highest_sent.add_metric([r.name], r.highest_sent_ms / 1000.0)
            if self.highest_enqueued_ms is not None:
                highest.add_metric([r.name], self.highest_enqueued_ms / 1000.0)
        yield from (samples, dropped, requests, sent_bytes, queued, queued_bytes, capacity, last, highest_sent, highest)
