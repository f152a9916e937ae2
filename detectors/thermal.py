"""Thermal detector: a GPU held in hardware thermal slowdown or at its slowdown temperature."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from detectors.model import Finding, GpuSample, Window

# nvmlClocksEventReasonHwThermalSlowdown (NVML clock event reasons; nvidia-smi "HW Thermal
# Slowdown"): the GPU halves its clocks or worse because it is too hot.
HW_THERMAL_SLOWDOWN = 0x40


@dataclass(frozen=True, slots=True)
class ThermalThresholds:
    # samples; the last 3 samples (3 s at the 1 s default interval) judge "now" (our choice)
    recent_samples: int = 3
    # samples; 2 of 3 so a single sample caught mid-transition does not fire (our choice)
    min_hot_samples: int = 2
    # s; older samples say nothing about now; a quiet node is node_silent's finding (our choice)
    max_sample_age_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_hot_samples <= self.recent_samples:
            raise ValueError("need 1 <= min_hot_samples <= recent_samples")
        if self.max_sample_age_seconds <= 0:
            raise ValueError("max_sample_age_seconds must be positive")


def _number(metrics: Mapping[str, float | int], name: str) -> float | None:
    value = metrics.get(name)
    return None if value is None else float(value)


def _hw_thermal_slowdown(metrics: Mapping[str, float | int]) -> bool:
    reasons = metrics.get("clock_event_reasons")
    return reasons is not None and int(reasons) & HW_THERMAL_SLOWDOWN != 0


def _at_slowdown_temperature(metrics: Mapping[str, float | int]) -> bool:
    temp_celsius = _number(metrics, "temp_gpu_celsius")
    slowdown_celsius = _number(metrics, "temp_slowdown_celsius")
    if temp_celsius is None or slowdown_celsius is None:
        return False
    return temp_celsius >= slowdown_celsius


def _is_hot(metrics: Mapping[str, float | int]) -> bool:
    return _hw_thermal_slowdown(metrics) or _at_slowdown_temperature(metrics)


def _fmt(value: float) -> str:
    return f"{round(value, 1):g}"


@dataclass(slots=True)
class ThermalDetector:
    """Recent GPU samples -> a finding per GPU that is mostly hot over its last few samples."""

    thresholds: ThermalThresholds = field(default_factory=ThermalThresholds)
    id: ClassVar[str] = "thermal"
    # Warning, not critical: the GPU still computes, at half speed or less; Azure NHC logs HW
    # thermal slowdown as a warning (azurehpc-health-checks azure_gpu_clock_throttling.nhc).
    severity: ClassVar[str] = "warning"
    # Thermal slowdown on one GPU of a node is cooling: fans, airflow, heatsink, inlet temperature.
    action: ClassVar[str] = "inspect_hardware"

    @property
    def window_seconds(self) -> float:
        return self.thresholds.max_sample_age_seconds

    def detect(self, window: Window) -> list[Finding]:
        oldest_t = window.now - self.thresholds.max_sample_age_seconds
        findings = []
        for (node, gpu), series in window.gpu.items():
            recent: list[GpuSample] = []
            # Newest first, stopping early: only the tail of a long series is read.
            for sample in reversed(series):
                if sample.t > window.now:
                    continue
                if sample.t < oldest_t or len(recent) == self.thresholds.recent_samples:
                    break
                recent.append(sample)
            hot = [s for s in recent if _is_hot(s.metrics)]
            if len(hot) < self.thresholds.min_hot_samples:
                continue
            findings.append(self._finding(node, gpu, hot, len(recent)))
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu))
        return findings

    def _finding(
        self, node: str, gpu: int, hot_newest_first: list[GpuSample], recent: int
    ) -> Finding:
        latest = hot_newest_first[0].metrics
        hw = _hw_thermal_slowdown(latest)
        temp_celsius = _number(latest, "temp_gpu_celsius")
        slowdown_celsius = _number(latest, "temp_slowdown_celsius")
        sm_clock_mhz = _number(latest, "sm_clock_mhz")
        sm_clock_max_mhz = _number(latest, "sm_clock_max_mhz")

        details = []
        if sm_clock_mhz is not None:
            clock = f"SM clock {_fmt(sm_clock_mhz)} MHz"
            if sm_clock_max_mhz is not None:
                clock += f" of {_fmt(sm_clock_max_mhz)} MHz max"
            details.append(clock)
        if temp_celsius is not None:
            temp = f"{_fmt(temp_celsius)} C"
            if slowdown_celsius is not None:
                temp += f" (slowdown at {_fmt(slowdown_celsius)} C)"
            details.append(temp)
        state = "in hardware thermal slowdown" if hw else "at its slowdown temperature"
        summary = f"GPU {gpu} {state}" + (": " + ", ".join(details) if details else "")

        evidence: dict[str, object] = {
            "hot_samples": len(hot_newest_first),
            "recent_samples": recent,
            "hw_thermal_slowdown": hw,
        }
        for name, value in (
            ("temp_gpu_celsius", temp_celsius),
            ("temp_slowdown_celsius", slowdown_celsius),
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
            start=hot_newest_first[-1].t,
            node=node,
            gpu=gpu,
            evidence=evidence,
        )
