"""Conversions between wire messages and the canonical dicts used everywhere else.

The canonical metric names are the field names of GpuMetrics / HostMetrics / IbPortMetrics in
telemetry.proto; this module derives its lists from the descriptors so there is one source.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from fleetwatch.v1 import telemetry_pb2 as pb

_INTEGER_TYPES = {
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
}

GPU_FIELDS: tuple[str, ...] = tuple(f.name for f in pb.GpuMetrics.DESCRIPTOR.fields)
HOST_FIELDS: tuple[str, ...] = tuple(f.name for f in pb.HostMetrics.DESCRIPTOR.fields)
IB_FIELDS: tuple[str, ...] = tuple(f.name for f in pb.IbPortMetrics.DESCRIPTOR.fields if f.name.startswith("ib_"))
# Fields whose values are whole numbers (counters, bitmasks, flags, link widths).
INTEGER_FIELDS: frozenset[str] = frozenset(
    f.name
    for d in (pb.GpuMetrics.DESCRIPTOR, pb.HostMetrics.DESCRIPTOR, pb.IbPortMetrics.DESCRIPTOR)
    for f in d.fields
    if f.type in _INTEGER_TYPES
)


GPU_FIELD_NUMBERS: dict[str, int] = {f.name: f.number for f in pb.GpuMetrics.DESCRIPTOR.fields}
# The Kubernetes pod of a GPU (GpuSample and GpuLabels, since 0.3): the same keys in a sample dict.
GPU_K8S_FIELDS: tuple[str, ...] = ("k8s_namespace", "k8s_pod", "k8s_container")


def gpu_columns_message(samples: Sequence[Mapping[str, Any]]) -> pb.GpuColumns:
    """GPU sample dicts (t, gpu, uuid, job, rank, k8s_*, metrics) as one GpuColumns, rows in their order.

    Absent and None values are NaN; a metric name GpuMetrics lacks raises KeyError, as fill_metrics.
    """
    names = sorted(
        {name for s in samples for name, value in s["metrics"].items() if value is not None},
        key=GPU_FIELD_NUMBERS.__getitem__,
    )
    column = {name: i for i, name in enumerate(names)}
    width = len(names)
    values = array("d", [math.nan]) * (len(samples) * width)
    msg = pb.GpuColumns(fields=[GPU_FIELD_NUMBERS[name] for name in names])
    label_of: dict[tuple[str, str, int | None, str, str, str], int] = {}
    times, gpus, labels = [], [], []
    for row, sample in enumerate(samples):
        base = row * width
        for name, value in sample["metrics"].items():
            if value is not None:
                values[base + column[name]] = float(value)
        key = (
            sample.get("uuid") or "",
            sample.get("job") or "",
            sample.get("rank"),
            sample.get("k8s_namespace") or "",
            sample.get("k8s_pod") or "",
            sample.get("k8s_container") or "",
        )
        index = label_of.get(key)
        if index is None:
            index = label_of[key] = len(label_of)
            entry = msg.labels.add(uuid=key[0], job=key[1], k8s_namespace=key[3], k8s_pod=key[4], k8s_container=key[5])
            if key[2] is not None:
                entry.rank = int(key[2])
        times.append(float(sample["t"]))
        gpus.append(int(sample["gpu"]))
        labels.append(index)
    if sys.byteorder != "little":
        values.byteswap()
    msg.t.extend(times)
    msg.gpu.extend(gpus)
    msg.label.extend(labels)
    msg.values = values.tobytes()
    return msg


def metrics_to_dict(msg: Any) -> dict[str, float | int]:
    """Present fields only: an unset optional field stays absent."""
    return {f.name: v for f, v in msg.ListFields()}


def fill_metrics(msg: Any, values: Mapping[str, Any]) -> Any:
    """Set each canonical field in `values` that is not None; unknown names raise KeyError."""
    fields = msg.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        if value is None:
            continue
        field = fields.get(name)
        if field is None:
            raise KeyError(f"{type(msg).__name__} has no field {name!r}")
        if field.type in _INTEGER_TYPES:
            value = int(value)
        elif field.type == FieldDescriptor.TYPE_DOUBLE:
            value = float(value)
        setattr(msg, name, value)
    return msg


def event_to_dict(ev: pb.Event) -> dict[str, Any]:
    return {
        "t": ev.t,
        "kind": ev.kind,
        "gpu": ev.gpu if ev.HasField("gpu") else None,
        "uuid": ev.uuid or None,
        "pci_bus_id": ev.pci_bus_id or None,
        "xid": ev.xid if ev.HasField("xid") else None,
        "message": ev.message,
        "source": ev.source or None,
    }


def event_from_dict(d: Mapping[str, Any]) -> pb.Event:
    ev = pb.Event(t=float(d["t"]), kind=str(d["kind"]))
    if d.get("gpu") is not None:
        ev.gpu = int(d["gpu"])
    if d.get("xid") is not None:
        ev.xid = int(d["xid"])
    for key in ("uuid", "pci_bus_id", "message", "source"):
        if d.get(key):
            setattr(ev, key, str(d[key]))
    return ev
