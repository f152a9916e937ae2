"""Row-remap detector: HBM rows waiting for a GPU reset to be remapped, or a failed remapping.

Ampere and later GPUs replace a memory row that had an uncorrectable (or repeated correctable)
error with a spare row of the same bank; pre-Ampere boards retire pages instead (retired_pages).
Two findings per GPU, told apart by `key`, each holding while the newest sample shows it:

- `pending` (warning, reset_gpu): `remap_pending` is 1. NVIDIA: the remapping "will happen at the
  next GPU reset"; until then "unaffected applications can continue running without affecting
  accuracy and performance, and new workloads can be launched" (A100/H100 GPU memory error
  management, error recovery and response flags). gpud reports it unhealthy with "row remapping
  pending requires GPU reset or system reboot" and Azure NHC fails the node (azure_gpu_ecc.nhc):
  the GPU must be reset, but it need not be pulled mid-job, hence warning. The XID the driver
  logs for it, 63, is likewise warning / reset_gpu in detectors/xid_catalog.csv.
- `failure` (critical, inspect_hardware): `remap_failure` is 1, a remapping failed (a bank ran out
  of spare rows). DCGM fails the GPU (DCGM_FR_ROW_REMAP_FAILURE, "run the field diagnostic"),
  gpud suggests HARDWARE_INSPECTION ("row remapping failure requires hardware inspection") and
  Azure NHC fails the node. The flag is persistent: it stays set across resets.

A GPU that does not report the fields (pre-Ampere, MIG with active instances) gets no finding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import ClassVar, Iterator, Mapping, Sequence

from detectors.model import Finding, GpuSample, Window

PENDING = "remap_pending"
FAILURE = "remap_failure"
_ROW_COUNTS = ("remapped_rows_correctable", "remapped_rows_uncorrectable")


@dataclass(frozen=True, slots=True)
class RowRemapThresholds:
    # s; the newest sample must be this recent to say anything about now; a quiet node is
    # node_silent's finding (as thermal)
    max_sample_age_seconds: float = 30.0
    # samples; a field missing from the newest sample (a failed read) is read from the newest of
    # this many, so one bad read does not close a finding (our choice)
    field_lookback_samples: int = 3

    def __post_init__(self) -> None:
        if self.max_sample_age_seconds <= 0:
            raise ValueError("max_sample_age_seconds must be positive")
        if self.field_lookback_samples < 1:
            raise ValueError("field_lookback_samples must be at least 1")


def _flag(metrics: Mapping[str, float | int], name: str) -> bool:
    value = metrics.get(name)
    return value is not None and value >= 1


def _rows(metrics: Mapping[str, float | int]) -> str:
    correctable = metrics.get(_ROW_COUNTS[0])
    uncorrectable = metrics.get(_ROW_COUNTS[1])
    if correctable is None or uncorrectable is None:
        return ""
    return f" (rows remapped: {correctable:g} correctable, {uncorrectable:g} uncorrectable)"


@dataclass(slots=True)
class RowRemapDetector:
    """Newest GPU samples -> per GPU a `pending` and a `failure` finding while the flags are set."""

    thresholds: RowRemapThresholds = field(default_factory=RowRemapThresholds)
    id: ClassVar[str] = "row_remap"

    @property
    def window_seconds(self) -> float:
        return self.thresholds.max_sample_age_seconds

    def detect(self, window: Window) -> list[Finding]:
        now = window.now
        oldest_t = now - self.thresholds.max_sample_age_seconds
        findings = []
        for (node, gpu), series in window.gpu.items():
            index = len(series) - 1
            while index >= 0 and series[index].t > now:
                index -= 1
            if index < 0 or series[index].t < oldest_t:
                continue
            lookback = self.thresholds.field_lookback_samples
            failed = _latest(series, index, FAILURE, oldest_t, lookback)
            if failed >= 0 and _flag(series[failed].metrics, FAILURE):
                latest = series[failed].metrics
                findings.append(
                    Finding(
                        detector=self.id,
                        severity="critical",
                        action="inspect_hardware",
                        summary=(
                            f"GPU {gpu} on {node}: row remapping failed, a memory bank has no "
                            f"spare rows left{_rows(latest)}"
                        ),
                        start=_first_of_run(series, failed, FAILURE, oldest_t),
                        node=node,
                        gpu=gpu,
                        evidence=_evidence(latest),
                        key="failure",
                    )
                )
            pending = _latest(series, index, PENDING, oldest_t, lookback)
            if pending >= 0 and _flag(series[pending].metrics, PENDING):
                latest = series[pending].metrics
                findings.append(
                    Finding(
                        detector=self.id,
                        severity="warning",
                        action="reset_gpu",
                        summary=(
                            f"GPU {gpu} on {node}: row remapping pending, reset the GPU to apply "
                            f"it{_rows(latest)}"
                        ),
                        start=_first_of_run(series, pending, PENDING, oldest_t),
                        node=node,
                        gpu=gpu,
                        evidence=_evidence(latest),
                        key="pending",
                    )
                )
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu, f.key))
        return findings


def _back_from(series: Sequence[GpuSample], index: int) -> Iterator[GpuSample]:
    """The samples from `index` back to the oldest, newest first; a window's views iterate this
    way without indexing into the middle of their deque."""
    return islice(reversed(series), len(series) - 1 - index, None)


def _latest(
    series: Sequence[GpuSample], index: int, name: str, oldest_t: float, lookback: int
) -> int:
    """Index of the newest of the `lookback` samples ending at `index` (none older than
    `oldest_t`) that carries `name`; -1 when none does."""
    if series[index].metrics.get(name) is not None:
        return index  # the fast path: the newest sample has it
    if series[0].metrics.get(name) is None:
        return -1  # nor the oldest: a field the GPU does not report at all
    stop = max(index - lookback, -1)
    while index > stop:
        sample = series[index]
        if sample.t < oldest_t:
            break
        if sample.metrics.get(name) is not None:
            return index
        index -= 1
    return -1


def _first_of_run(series: Sequence[GpuSample], index: int, name: str, oldest_t: float) -> float:
    """The time of the first sample of the run of flagged samples that ends at `index` (a sample
    without the field does not break the run; the window's edge does)."""
    start = series[index].t
    for sample in _back_from(series, index - 1):
        if sample.t < oldest_t:
            break
        value = sample.metrics.get(name)
        if value is None:
            continue
        if value < 1:
            break
        start = sample.t
    return start


def _evidence(metrics: Mapping[str, float | int]) -> dict[str, object]:
    return {
        name: metrics[name]
        for name in (PENDING, FAILURE, *_ROW_COUNTS)
        if metrics.get(name) is not None
    }
