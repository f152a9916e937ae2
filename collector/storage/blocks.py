"""Agent batches (serialized pb.Batch) into blocks of one node's samples, and blocks back into records.

A GPU block holds every GPU of a node, each GPU's fields in the columns of its slot (the GPU's
index); a host block the node's host fields; an InfiniBand block every port, each in the slot of
its place in the block's port list. Values that cannot be measurements (NaN, an integer field's
"not available") are left absent, as the collector's checks and the agent leave them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetwatch import limits
from fleetwatch.collector.storage.chunks import (
    RAW,
    SERIES_STRIDE,
    STATS,
    Block,
    body_message,
    column_id,
    split_column_id,
)
from fleetwatch.records import GpuSample, HostSample
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import INTEGER_FIELDS

_DESCRIPTORS = {
    "gpu": pb.GpuMetrics.DESCRIPTOR,
    "host": pb.HostMetrics.DESCRIPTOR,
    "ib": pb.IbPortMetrics.DESCRIPTOR,
}
FIELD_NUMBERS: dict[str, dict[str, int]] = {
    kind: {f.name: f.number for f in d.fields if kind != "ib" or f.name.startswith("ib_")}
    for kind, d in _DESCRIPTORS.items()
}
FIELD_NAMES: dict[str, dict[int, str]] = {kind: {n: name for name, n in m.items()} for kind, m in FIELD_NUMBERS.items()}
# Field descriptor -> its RAW column id in slot 0.
_COLUMN_OF = {f: f.number * STATS + RAW for d in _DESCRIPTORS.values() for f in d.fields}
_IB_STATE = pb.IbPortMetrics.DESCRIPTOR.fields_by_name["ib_state"]
_IB_COLUMNS = frozenset(FIELD_NUMBERS["ib"].values())


def _limits(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per field number: whether it is an integer field, and its largest storable value."""
    size = max(FIELD_NUMBERS[kind].values()) + 1
    integer = np.zeros(size, dtype=bool)
    most = np.full(size, np.inf)
    for name, number in FIELD_NUMBERS[kind].items():
        if name in INTEGER_FIELDS:
            integer[number] = True
            limit = limits.integer_metric_max(name) or 2**63 - 1
            # 2**63 - 1 is 2**63 as a float: the largest float at or below the limit instead.
            most[number] = float(limit) if float(limit) <= limit else float(np.nextafter(float(limit), 0.0))
    return integer, most


# Per kind, indexed by field number: whether the field is an integer, its largest storable value.
FIELD_LIMITS = {kind: _limits(kind) for kind in _DESCRIPTORS}


def storable(kind: str, numbers: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Which values of `matrix` (a column per field number in `numbers`) can be measurements.

    Finite, and for an integer field a whole number from 0 to its limit: what
    limits.storable_metric keeps, for a whole matrix at once.
    """
    integer, most = FIELD_LIMITS[kind]
    kept = np.isfinite(matrix)
    is_integer = integer[numbers]
    if is_integer.any():  # comparisons with NaN are False, without a warning
        whole = matrix[:, is_integer]
        kept[:, is_integer] &= (whole >= 0) & (whole <= most[numbers][is_integer]) & (np.floor(whole) == whole)
    return kept


@dataclass
class _Cells:
    """Flat cells of one kind of one node as decoded: one time per sample, (column, value) per cell."""

    times: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    bases: list[int] = field(default_factory=list)  # per sample: its slot's first column id

    def add(self, t: float, slot_base: int, fields: Sequence[tuple[Any, Any]]) -> None:
        self.times.append(t)
        self.lengths.append(len(fields))
        # The hot loop of compaction: one dict lookup per value, numbers added up in numpy later.
        self.ids.extend([_COLUMN_OF[d] for d, _ in fields])
        self.bases.append(slot_base)
        self.values.extend([v for _, v in fields])

    def block(self, kind: str, text: dict[str, Any]) -> Block | None:
        if not self.times:
            return None
        sample_times = np.asarray(self.times, dtype=np.float64)
        lengths = np.asarray(self.lengths, dtype=np.int64)
        bases = np.asarray(self.bases, dtype=np.int64)
        rows = np.unique(sample_times)
        sample_rows = np.searchsorted(rows, sample_times)
        # Two samples of one series at one time (a resend, a clock that stood still): the later
        # one stands, whole, as a row of a table would be replaced.
        series_key = sample_rows * (int(bases.max()) // SERIES_STRIDE + 1) + bases // SERIES_STRIDE
        _, last_reversed = np.unique(series_key[::-1], return_index=True)
        kept_sample = np.zeros(len(sample_times), dtype=bool)
        kept_sample[len(sample_times) - 1 - last_reversed] = True
        kept_cell = np.repeat(kept_sample, lengths)
        ids = (np.asarray(self.ids, dtype=np.int64) + np.repeat(bases, lengths))[kept_cell]
        values = np.asarray(self.values, dtype=np.float64)[kept_cell]
        row_of = np.repeat(sample_rows, lengths)[kept_cell]
        columns, column_of = np.unique(ids, return_inverse=True)
        matrix = np.zeros((len(rows), len(columns)))
        present = np.zeros((len(rows), len(columns)), dtype=bool)
        matrix[row_of, column_of] = values
        present[row_of, column_of] = True
        present &= storable(kind, (columns % SERIES_STRIDE) // STATS, matrix)
        keep = present.any(axis=0)
        return Block(rows, columns[keep], matrix[:, keep], present[:, keep], text)


_GPU_WIDTH = max(FIELD_NUMBERS["gpu"].values()) + 1  # a row holds every GpuMetrics field at its number


@dataclass
class _GpuRows:
    """One node's GPU samples as decoded, whole rows: a time, a GPU and every field by its number.

    The dense form arrives as such rows and is placed with a few array operations; a 0.1.0
    batch's GpuSamples become rows one by one.
    """

    times: list[np.ndarray] = field(default_factory=list)
    gpus: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)  # each (rows, _GPU_WIDTH), NaN: absent
    labels: list[tuple[str | None, str | None, int | None]] = field(default_factory=list)  # one per row

    def add_samples(self, samples: Sequence[pb.GpuSample]) -> None:
        if not samples:
            return
        values = np.full((len(samples), _GPU_WIDTH), np.nan)
        for row, sample in zip(values, samples):
            for descriptor, value in sample.metrics.ListFields():
                row[descriptor.number] = value
        self.times.append(np.array([sample.t for sample in samples], dtype=np.float64))
        self.gpus.append(np.array([sample.gpu for sample in samples], dtype=np.int64))
        self.values.append(values)
        self.labels.extend(
            (sample.uuid or None, sample.job or None, sample.rank if sample.HasField("rank") else None)
            for sample in samples
        )

    def add_columns(self, columns: pb.GpuColumns) -> None:
        rows, numbers = len(columns.t), list(columns.fields)
        sent = np.frombuffer(columns.values, dtype="<f8")
        if not rows or len(sent) != rows * len(numbers) or any(n >= _GPU_WIDTH for n in numbers):
            return  # nothing to keep (the collector refuses a malformed one before it is stored)
        values = np.full((rows, _GPU_WIDTH), np.nan)
        values[:, numbers] = sent.reshape(rows, len(numbers))
        self.times.append(np.array(columns.t, dtype=np.float64))
        self.gpus.append(np.array(columns.gpu, dtype=np.int64))
        self.values.append(values)
        labels = [
            (label.uuid or None, label.job or None, label.rank if label.HasField("rank") else None)
            for label in columns.labels
        ]
        unknown = (None, None, None)
        self.labels.extend(labels[i] if i < len(labels) else unknown for i in columns.label)

    def block(self) -> Block | None:
        if not self.times:
            return None
        times, gpus, values = np.concatenate(self.times), np.concatenate(self.gpus), np.concatenate(self.values)
        rows, row_of = np.unique(times, return_inverse=True)
        slots, slot_of = np.unique(gpus, return_inverse=True)
        # Two samples of one GPU at one time (a resend, a clock that stood still): the later one
        # stands, whole, as a row of a table would be replaced.
        key = row_of * len(slots) + slot_of
        _, last_reversed = np.unique(key[::-1], return_index=True)
        kept = np.sort(len(key) - 1 - last_reversed)
        cube = np.full((len(rows), len(slots), _GPU_WIDTH), np.nan)
        cube[row_of[kept], slot_of[kept]] = values[kept]
        matrix = cube.reshape(len(rows), len(slots) * _GPU_WIDTH)
        numbers = np.tile(np.arange(_GPU_WIDTH), len(slots))
        present = storable("gpu", numbers, matrix)
        keep = present.any(axis=0)
        ids = (slots[:, None] * SERIES_STRIDE + np.arange(_GPU_WIDTH)[None, :] * STATS + RAW).ravel()
        runs: dict[str, list[list[Any]]] = {}
        last: dict[int, tuple[Any, ...]] = {}
        # In time order (a spooled batch may arrive after newer ones), the kept sample of each row.
        for sample in sorted(kept.tolist(), key=lambda i: (row_of[i], i)):
            gpu, label = int(gpus[sample]), self.labels[sample]
            if last.get(gpu) != label:
                last[gpu] = label
                runs.setdefault(str(gpu), []).append([int(row_of[sample]), *label])
        return Block(
            rows,
            ids[keep],
            np.where(present, matrix, 0.0)[:, keep],
            present[:, keep],
            {"runs": runs} if runs else {},
        )


@dataclass
class NodeBlocks:
    """The samples of one node's batches, gathered; `blocks()` gives one Block per kind present."""

    node: str
    gpu: _GpuRows = field(default_factory=_GpuRows)
    host: _Cells = field(default_factory=_Cells)
    ib: _Cells = field(default_factory=_Cells)
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)  # InfiniBand port states seen, by their code

    def add_body(self, body: bytes) -> None:
        self.add_batch(pb.Batch.FromString(body_message(body)))

    def add_batch(self, batch: pb.Batch) -> None:
        if batch.HasField("gpu_columns"):
            self.gpu.add_columns(batch.gpu_columns)
        self.gpu.add_samples(batch.gpus)
        for host in batch.hosts:
            self._add_host(host)
        if batch.HasField("host"):
            self._add_host(batch.host)

    def _add_host(self, host: pb.HostSample) -> None:
        if host.HasField("metrics"):
            self.host.add(host.t, 0, host.metrics.ListFields())
        for port in host.ib_ports:
            key = (port.device, port.port)
            slot = self.ports.setdefault(key, len(self.ports))
            # The state is a column too (its place in the block's list of states), so a row
            # says whether the port reported then, state or counters.
            fields = [
                (d, self.states.setdefault(v, len(self.states)) if d is _IB_STATE else v)
                for d, v in port.ListFields()
                if d.number in _IB_COLUMNS and (d is not _IB_STATE or v)
            ]
            self.ib.add(host.t, slot * SERIES_STRIDE, fields)

    def blocks(self) -> dict[str, Block]:
        out: dict[str, Block] = {}
        gpu = self.gpu.block()
        if gpu is not None and len(gpu.ids):
            out["gpu"] = gpu
        for kind, cells, text in (
            ("host", self.host, {}),
            ("ib", self.ib, {"ports": [list(key) for key in self.ports], "states": list(self.states)}),
        ):
            block = cells.block(kind, text)
            if block is not None and len(block.ids):
                out[kind] = block
        return out


def blocks_from_bodies(node: str, bodies: Iterable[bytes]) -> dict[str, Block]:
    gathered = NodeBlocks(node)
    for body in bodies:
        gathered.add_body(body)
    return gathered.blocks()


def _runs_at(runs: Sequence[Sequence[Any]], row: int) -> Sequence[Any] | None:
    """The strings of the run that holds at `row` (runs sorted by their first row)."""
    current = None
    for run in runs:
        if run[0] > row:
            break
        current = run
    return None if current is None else current[1:]


def gpu_samples(node: str, block: Block, since: float = -np.inf) -> list[GpuSample]:
    """The GPU samples of a GPU block at or after `since`, oldest first (records for the detectors)."""
    names = FIELD_NAMES["gpu"]
    parts = [split_column_id(int(c)) for c in block.ids]
    slots = sorted({slot for slot, _, stat in parts if stat == RAW})
    runs = block.text.get("runs", {})
    out: list[GpuSample] = []
    for slot in slots:
        columns = [j for j, (s, _, stat) in enumerate(parts) if s == slot and stat == RAW]
        keys = [names.get(parts[j][1]) for j in columns]
        slot_runs = runs.get(str(slot), [])
        values = block.values[:, columns]
        present = block.present[:, columns]
        for row in np.flatnonzero(present.any(axis=1) & (block.t >= since)):
            metrics = _metrics(keys, values[row], present[row])
            labels = _runs_at(slot_runs, int(row)) or (None, None, None)
            out.append(
                GpuSample(
                    t=float(block.t[row]),
                    node=node,
                    gpu=slot,
                    metrics=metrics,
                    uuid=labels[0],
                    job=labels[1],
                    rank=labels[2],
                )
            )
    out.sort(key=lambda s: (s.t, s.gpu))
    return out


def host_samples(node: str, block: Block, since: float = -np.inf) -> list[HostSample]:
    names = FIELD_NAMES["host"]
    keys = [names.get(split_column_id(int(c))[1]) for c in block.ids]
    return [
        HostSample(t=float(block.t[row]), node=node, metrics=_metrics(keys, block.values[row], block.present[row]))
        for row in np.flatnonzero(block.present.any(axis=1) & (block.t >= since))
    ]


def ib_ports(block: Block, since: float = -np.inf) -> list[dict[str, Any]]:
    """InfiniBand port samples as the ingest dicts: t, device, port, ib_state and the numeric fields."""
    names = FIELD_NAMES["ib"]
    ports = block.text.get("ports", [])
    states = block.text.get("states", [])
    parts = [split_column_id(int(c)) for c in block.ids]
    out: list[dict[str, Any]] = []
    for slot, (device, port) in enumerate(ports):
        columns = [j for j, (s, _, stat) in enumerate(parts) if s == slot and stat == RAW]
        keys = [names.get(parts[j][1]) for j in columns]
        values = block.values[:, columns]
        present = block.present[:, columns]
        for row in np.flatnonzero(present.any(axis=1) & (block.t >= since)):
            entry: dict[str, Any] = {"t": float(block.t[row]), "device": device, "port": int(port)}
            for key, value, has in zip(keys, values[row].tolist(), present[row].tolist()):
                if not has or key is None:
                    continue
                if key == "ib_state":
                    if 0 <= int(value) < len(states):
                        entry["ib_state"] = states[int(value)]
                else:
                    entry[key] = int(value) if key in INTEGER_FIELDS else value
            out.append(entry)
    out.sort(key=lambda p: (p["t"], p["device"], p["port"]))
    return out


def _metrics(keys: Sequence[str | None], values: np.ndarray, present: np.ndarray) -> dict[str, float | int]:
    metrics: dict[str, float | int] = {}
    for key, value, has in zip(keys, values.tolist(), present.tolist()):
        if has and key is not None:
            metrics[key] = int(value) if key in INTEGER_FIELDS else value
    return metrics


def series_columns(kind: str, slot: int, fields: Sequence[str] | None) -> dict[int, str]:
    """RAW column id -> field name of `fields` (all of the kind's, when None) in `slot`."""
    numbers = FIELD_NUMBERS[kind]
    names = list(numbers) if not fields else list(fields)
    return {column_id(numbers[name], RAW, slot): name for name in names if name in numbers and name != "ib_state"}
