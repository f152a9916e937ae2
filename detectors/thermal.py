"""Thermal detector: a GPU held in thermal slowdown, or at its temperature limits, for a while.

Per sample, a GPU is hot when NVML's clock event reasons show HW thermal slowdown (0x40, clocks cut
by half or more because the GPU is too hot) or SW thermal slowdown (0x20, clocks trimmed to keep
the core under its max operating and the HBM under its max operating temperature), when the core
is at or above its own slowdown threshold (`temp_slowdown_celsius`), or when the HBM is at or
above its max operating temperature. A finding needs the GPU hot for a sustained stretch
(detectors.model.sustained): most of the last 20 s, or in 6 of the last 10 minutes. A single
blip, a short spike or a GPU warming up to just under its threshold never fires.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.counters import float_reading
from fleetwatch.detectors.model import Sustained, SustainedThresholds, Window, fmt_number
from fleetwatch.detectors.table import Condition, Rows, reasons_mask
from fleetwatch.nvml_bits import HW_THERMAL_SLOWDOWN, SW_THERMAL_SLOWDOWN
from fleetwatch.records import Finding

# Either bit makes a sample hot; the nvidia-smi help text in tests/fixtures/nvidia-smi has both.
THERMAL_REASONS = SW_THERMAL_SLOWDOWN | HW_THERMAL_SLOWDOWN
_CONDITION_FIELDS = ("clock_event_reasons", "temp_gpu_celsius", "temp_slowdown_celsius", "temp_mem_celsius")
# What a finding reads from its newest hot sample.
_FIELDS = (*_CONDITION_FIELDS, "sm_clock_mhz", "sm_clock_max_mhz")


@dataclass(frozen=True, slots=True)
class ThermalThresholds(SustainedThresholds):
    """The shared sustained rule's defaults (detectors.model), plus the HBM limit."""

    # C; HBM "Memory Max Operating Temp" nvidia-smi -q prints for A100/H100 (95 C; sim profiles.py)
    temp_mem_max_celsius: float = 95.0


@dataclass(slots=True)
class ThermalDetector:
    """Recent GPU samples -> a finding per GPU held hot for a sustained stretch."""

    thresholds: ThermalThresholds = field(default_factory=ThermalThresholds)
    id: ClassVar[str] = "thermal"
    # Warning, not critical: the GPU still computes, at half speed or less; Azure NHC logs HW
    # thermal slowdown as a warning (azurehpc-health-checks azure_gpu_clock_throttling.nhc).
    severity: ClassVar[str] = "warning"
    # Thermal slowdown on one GPU of a node is cooling: fans, airflow, heatsink, inlet temperature;
    # gpud suggests a hardware inspection for sustained HW slowdown (hw-slowdown component.go).
    action: ClassVar[str] = "inspect_hardware"

    @property
    def window_seconds(self) -> float:
        return self.thresholds.window_seconds

    @property
    def gpu_window_seconds(self) -> float:
        """Full samples for the fast window; the long one reads the `hot` condition's times."""
        return self.thresholds.short_seconds

    @property
    def gpu_fields(self) -> Mapping[str, float]:
        return dict.fromkeys(_FIELDS, self.thresholds.short_seconds)

    @property
    def gpu_conditions(self) -> tuple[Condition, ...]:
        return (self.hot,)

    @property
    def hot(self) -> Condition:
        """A sample is hot: thermal slowdown bits, the core at its slowdown threshold, or the HBM at
        its max operating temperature."""
        temp_mem_max = self.thresholds.temp_mem_max_celsius

        def test(rows: Rows) -> np.ndarray:
            hot = (reasons_mask(rows) & THERMAL_REASONS) != 0
            hot |= rows["temp_gpu_celsius"] >= rows["temp_slowdown_celsius"]
            hot |= rows["temp_mem_celsius"] >= temp_mem_max
            return hot

        return Condition(f"thermal.hot:{temp_mem_max!r}", _CONDITION_FIELDS, test, self.thresholds.long_seconds)

    def detect(self, window: Window) -> list[Finding]:
        findings = [
            self._finding(node, gpu, held) for node, gpu, _, held in self.thresholds.held_gpus(window, self.hot)
        ]
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu))
        return findings

    def _finding(self, node: str, gpu: int, held: Sustained) -> Finding:
        latest = held.latest.metrics
        reasons_value = latest.get("clock_event_reasons")
        reasons = None if reasons_value is None else int(reasons_value)
        hw = reasons is not None and reasons & HW_THERMAL_SLOWDOWN != 0
        sw = reasons is not None and reasons & SW_THERMAL_SLOWDOWN != 0
        temp_celsius = float_reading(latest, "temp_gpu_celsius")
        slowdown_celsius = float_reading(latest, "temp_slowdown_celsius")
        temp_mem_celsius = float_reading(latest, "temp_mem_celsius")
        sm_clock_mhz = float_reading(latest, "sm_clock_mhz")
        sm_clock_max_mhz = float_reading(latest, "sm_clock_max_mhz")
        mem_max = self.thresholds.temp_mem_max_celsius
        at_slowdown = temp_celsius is not None and slowdown_celsius is not None and temp_celsius >= slowdown_celsius
        if hw:
            condition, state = "hw_thermal_slowdown", "in hardware thermal slowdown"
        elif at_slowdown:
            condition, state = "at_slowdown_temperature", "at its slowdown temperature"
        elif sw:
            condition, state = "sw_thermal_slowdown", "in software thermal slowdown"
        else:
            condition, state = "hbm_at_max_temperature", "with HBM at its max operating temperature"

        details = []
        if sm_clock_mhz is not None:
            clock = f"SM clock {fmt_number(sm_clock_mhz)} MHz"
            if sm_clock_max_mhz is not None:
                clock += f" of {fmt_number(sm_clock_max_mhz)} MHz max"
            details.append(clock)
        if temp_celsius is not None:
            temp = f"{fmt_number(temp_celsius)} C"
            if slowdown_celsius is not None:
                temp += f" (slowdown at {fmt_number(slowdown_celsius)} C)"
            details.append(temp)
        if temp_mem_celsius is not None and (condition == "hbm_at_max_temperature" or temp_mem_celsius >= mem_max):
            details.append(f"HBM {fmt_number(temp_mem_celsius)} C (max {fmt_number(mem_max)} C)")
        summary = f"GPU {gpu} {state}{held.how_long}" + (": " + ", ".join(details) if details else "")

        evidence: dict[str, object] = {
            "condition": condition,
            "sustained_by": held.by,
            "hot_samples": held.recent_hits,
            "recent_samples": held.recent_samples,
            "recent_seconds": self.thresholds.recent_seconds,
            "hw_thermal_slowdown": hw,
            "sw_thermal_slowdown": sw,
        }
        if held.long_hit_buckets is not None:
            evidence["hot_minutes"] = held.long_hit_buckets
        if reasons is not None:
            evidence["clock_event_reasons"] = reasons
        # The job goes in the evidence, not the identity: a job restarting mid-episode must not
        # close this hardware finding and open another.
        if held.latest.job is not None:
            evidence["job"] = held.latest.job
        for name, value in (
            ("temp_gpu_celsius", temp_celsius),
            ("temp_slowdown_celsius", slowdown_celsius),
            ("temp_mem_celsius", temp_mem_celsius),
            ("sm_clock_mhz", sm_clock_mhz),
            ("sm_clock_max_mhz", sm_clock_max_mhz),
        ):
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
