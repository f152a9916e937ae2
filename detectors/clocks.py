"""Clocks detector: sustained HW slowdown (clock event reason 0x8) that nothing else explains.

NVML sets HW slowdown (clocks cut by half or more) together with its cause where the GPU knows
it: HW thermal slowdown (0x40, the `thermal` detector's) or HW power brake slowdown (0x80, the
`power` detector's). One fault must give one hardware finding, so a sample counts here only when
HW slowdown is set without either, and no finding is raised while either shows anywhere in the
window judged. What is left is HW slowdown from a cause NVML does not name (e.g. a board-level
slowdown signal), which gpud treats like the others: sustained -> hardware inspection.

Sustained means what it means for thermal and power (detectors.model.sustained): in 80 % of the
last 20 s over at least 10 s, or in 6 of the last 10 minutes.

Deliberately not findings here:
- SW thermal slowdown (0x20): a temperature condition (the GPU or its HBM above its max operating
  temperature, per NVML), so it is the `thermal` detector's, in the same finding as HW thermal.
- SW power cap (0x4): the GPU holding its own power limit, normal at full load.
- An SM clock far below its maximum while busy with no reason bit set: NVML documents "no active
  reason" as "clocks are as high as possible", and locked clocks (`nvidia-smi -lgc`) or
  application clocks lower the clock without a hardware fault, so this rule would raise false
  alarms on healthy GPUs; a GPU slower than its peers is the straggler detectors' concern.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.counters import float_reading
from fleetwatch.detectors.model import Sustained, SustainedThresholds, Window, fmt_number, gpu_table
from fleetwatch.detectors.table import Condition, Rows, reasons_mask
from fleetwatch.nvml_bits import HW_POWER_BRAKE_SLOWDOWN, HW_SLOWDOWN, HW_THERMAL_SLOWDOWN
from fleetwatch.records import Finding

# HW slowdown with either cause bit is the thermal or the power detector's finding, not ours.
EXPLAINED_ELSEWHERE = HW_THERMAL_SLOWDOWN | HW_POWER_BRAKE_SLOWDOWN


@dataclass(frozen=True, slots=True)
class ClocksThresholds(SustainedThresholds):
    """The shared sustained rule's defaults (detectors.model)."""


def _unexplained_slowdown(rows: Rows) -> np.ndarray:
    reasons = reasons_mask(rows)
    return ((reasons & HW_SLOWDOWN) != 0) & ((reasons & EXPLAINED_ELSEWHERE) == 0)


def _explained(rows: Rows) -> np.ndarray:
    """HW thermal or power brake slowdown: the thermal or the power detector's finding."""
    return (reasons_mask(rows) & EXPLAINED_ELSEWHERE) != 0


# What a finding reads from its newest slowed sample.
_FIELDS = ("clock_event_reasons", "sm_clock_mhz", "sm_clock_max_mhz")


@dataclass(slots=True)
class ClocksDetector:
    """Recent GPU samples -> a finding per GPU held in HW slowdown with no thermal/brake cause."""

    thresholds: ClocksThresholds = field(default_factory=ClocksThresholds)
    id: ClassVar[str] = "clocks"
    # Warning: the GPU runs at half speed or less but computes; Azure NHC
    # (azure_gpu_clock_throttling.nhc) logs HW slowdown as a warning.
    severity: ClassVar[str] = "warning"
    # gpud hw-slowdown: "Hardware slowdown are often caused by GPU overheating or power supply unit
    # (PSU) failing, please do a hardware inspection".
    action: ClassVar[str] = "inspect_hardware"

    @property
    def window_seconds(self) -> float:
        return self.thresholds.window_seconds

    @property
    def gpu_window_seconds(self) -> float:
        """Full samples for the fast window; the long one reads the conditions' times."""
        return self.thresholds.short_seconds

    @property
    def gpu_fields(self) -> Mapping[str, float]:
        return dict.fromkeys(_FIELDS, self.thresholds.short_seconds)

    @property
    def gpu_conditions(self) -> tuple[Condition, ...]:
        return (self.slowed, self.explained)

    @property
    def slowed(self) -> Condition:
        """A sample shows HW slowdown without the thermal or the power brake bit."""
        return Condition(
            "clocks.unexplained", ("clock_event_reasons",), _unexplained_slowdown, self.thresholds.long_seconds
        )

    @property
    def explained(self) -> Condition:
        """A sample shows HW thermal or power brake slowdown (which clears this detector)."""
        return Condition("clocks.explained", ("clock_event_reasons",), _explained, self.thresholds.long_seconds)

    def detect(self, window: Window) -> list[Finding]:
        t = self.thresholds
        findings = []
        for node, gpu, p, held in t.held_gpus(window, self.slowed):
            judged = t.recent_seconds if held.by == "recent" else t.long_seconds
            # Whether a sample in (now - judged, now] shows HW thermal or power brake slowdown.
            if gpu_table(window).hits(self.explained, p, window.now - judged):
                continue  # thermal's or power's finding, not a second one here
            findings.append(self._finding(node, gpu, held))
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu))
        return findings

    def _finding(self, node: str, gpu: int, held: Sustained) -> Finding:
        latest = held.latest.metrics
        sm_clock_mhz = float_reading(latest, "sm_clock_mhz")
        sm_clock_max_mhz = float_reading(latest, "sm_clock_max_mhz")
        summary = f"GPU {gpu} in hardware slowdown{held.how_long}, not thermal or power brake"
        if sm_clock_mhz is not None:
            summary += f": SM clock {fmt_number(sm_clock_mhz)} MHz"
            if sm_clock_max_mhz is not None:
                summary += f" of {fmt_number(sm_clock_max_mhz)} MHz max"

        evidence: dict[str, object] = {
            "sustained_by": held.by,
            "slowed_samples": held.recent_hits,
            "recent_samples": held.recent_samples,
            "recent_seconds": self.thresholds.recent_seconds,
            "clock_event_reasons": int(latest["clock_event_reasons"]),
        }
        if held.long_hit_buckets is not None:
            evidence["slowed_minutes"] = held.long_hit_buckets
        if held.latest.job is not None:
            evidence["job"] = held.latest.job  # evidence, not identity: see thermal
        for name, value in (("sm_clock_mhz", sm_clock_mhz), ("sm_clock_max_mhz", sm_clock_max_mhz)):
            if value is not None:
                evidence[name] = value
        return Finding(
            detector=self.id,
            severity=self.severity,
            action=self.action,
            summary=summary,
            start=held.start,
            node=node,
            gpu=gpu,
            evidence=evidence,
        )
