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
  logs for it, 63, is likewise warning / reset_gpu in base/xid_catalog.csv.
- `failure` (critical, inspect_hardware): `remap_failure` is 1, a remapping failed (a bank ran out
  of spare rows). DCGM fails the GPU (DCGM_FR_ROW_REMAP_FAILURE, "run the field diagnostic"),
  gpud suggests HARDWARE_INSPECTION ("row remapping failure requires hardware inspection") and
  Azure NHC fails the node. The flag is persistent: it stays set across resets.

A GPU that does not report the fields (pre-Ampere, MIG with active instances) gets no finding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.counters import flag_raised, unsettled
from fleetwatch.detectors.model import Window, gpu_table
from fleetwatch.detectors.table import COLUMN, Condition
from fleetwatch.records import Finding

PENDING = "remap_pending"
FAILURE = "remap_failure"
_ROW_COUNTS = ("remapped_rows_correctable", "remapped_rows_uncorrectable")
_FIELDS = (PENDING, FAILURE, *_ROW_COUNTS)
# Samples with either flag set: a finding needs a fresh one.
_RAISED = Condition(
    "row_remap.raised", (PENDING, FAILURE), lambda rows: (rows[PENDING] >= 1) | (rows[FAILURE] >= 1), 0.0
)
# (flag, finding key, severity, action, what the summary says while it is set), failure first
_RULES = (
    (
        FAILURE,
        "failure",
        "critical",
        "inspect_hardware",
        "row remapping failed, a memory bank has no spare rows left",
    ),
    (
        PENDING,
        "pending",
        "warning",
        "reset_gpu",
        "row remapping pending, reset the GPU to apply it",
    ),
)


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

    @property
    def gpu_fields(self) -> Mapping[str, float]:
        return dict.fromkeys(_FIELDS, self.window_seconds)

    @property
    def gpu_conditions(self) -> tuple[Condition, ...]:
        return (_RAISED,)

    def detect(self, window: Window) -> list[Finding]:
        now = window.now
        table = gpu_table(window)
        oldest_t = now - self.thresholds.max_sample_age_seconds
        lookback = self.thresholds.field_lookback_samples
        if not len(table) or table.latest_hit_t(_RAISED) < oldest_t:
            return []  # no flag set in any GPU's fresh samples
        # The whole fleet at once: both flags read clear (or are not reported at all) at the
        # newest sample on most GPUs; only the others are looked at one by one.
        newest = table.newest_rows
        look = (newest[:, COLUMN[PENDING]] >= 1) | (newest[:, COLUMN[FAILURE]] >= 1)
        look |= unsettled(table, (PENDING,), _FIELDS) | unsettled(table, (FAILURE,), _FIELDS)
        look &= table.fresh(self.thresholds.max_sample_age_seconds)
        if not np.count_nonzero(look):
            return []
        findings = []
        keys = table.keys
        for p in look.nonzero()[0].tolist():
            node, gpu = keys[p]
            series = table.series(p, _FIELDS)
            index = len(series) - 1
            for flag, key, severity, action, what in _RULES:
                raised = flag_raised(series, index, flag, oldest_t, lookback)
                if raised is None:
                    continue
                latest, start = raised
                findings.append(
                    Finding(
                        detector=self.id,
                        severity=severity,
                        action=action,
                        summary=f"GPU {gpu} on {node}: {what}{_rows(latest)}",
                        start=start,
                        node=node,
                        gpu=gpu,
                        evidence=_evidence(latest),
                        key=key,
                    )
                )
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu, f.key))
        return findings


def _evidence(metrics: Mapping[str, float | int]) -> dict[str, object]:
    return {name: metrics[name] for name in (PENDING, FAILURE, *_ROW_COUNTS) if metrics.get(name) is not None}
