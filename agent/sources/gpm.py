"""NVML GPU Performance Monitoring (GPM, Hopper and newer): DCGM's profiling metrics without DCGM.

GPM metrics are rates over the time between two samples the caller takes (nvmlGpmSampleGet):
each cycle takes a new sample and asks nvmlGpmMetricsGet for the metrics between it and the
previous cycle's, so every value covers one sampling interval, as dcgm-exporter's DCGM_FI_PROF_*
cover DCGM's. The first cycle only primes the sample pair and reports none of these fields.

Used by the NVML source as one of its read routes: a GPU (or library) without GPM raises
GpmUnsupported, which the source learns once and does not ask again.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024

# (pynvml constant, canonical field, factor to the field's unit). Percentages stay 0-100 as NVML
# gives them (the agent's /metrics shows ratios); bandwidths come in MiB/s.
GPM_METRICS: tuple[tuple[str, str, float], ...] = (
    ("NVML_GPM_METRIC_GRAPHICS_UTIL", "graphics_active_percent", 1.0),
    ("NVML_GPM_METRIC_SM_UTIL", "sm_active_percent", 1.0),
    ("NVML_GPM_METRIC_SM_OCCUPANCY", "sm_occupancy_percent", 1.0),
    ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", "tensor_active_percent", 1.0),
    ("NVML_GPM_METRIC_DRAM_BW_UTIL", "dram_active_percent", 1.0),
    ("NVML_GPM_METRIC_FP64_UTIL", "fp64_active_percent", 1.0),
    ("NVML_GPM_METRIC_FP32_UTIL", "fp32_active_percent", 1.0),
    ("NVML_GPM_METRIC_FP16_UTIL", "fp16_active_percent", 1.0),
    ("NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", "nvlink_tx_bytes_per_second", float(MIB)),
    ("NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", "nvlink_rx_bytes_per_second", float(MIB)),
)
GPM_FIELDS: tuple[str, ...] = tuple(name for _, name, _ in GPM_METRICS)


class GpmUnsupported(Exception):
    """This GPU or NVML library has no GPM (before Hopper, or an old driver or pynvml)."""


@dataclass
class _Pair:
    """One GPU's two GPM samples: the last cycle's and the one being taken; the metrics it lacks."""

    older: Any
    newer: Any
    primed: bool = False
    lacks: set[str] = field(default_factory=set)


class GpmReader:
    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self._metrics = [
            (getattr(nvml, const), name, factor) for const, name, factor in GPM_METRICS if hasattr(nvml, const)
        ]
        self._available = bool(self._metrics) and all(
            hasattr(nvml, name)
            for name in ("nvmlGpmQueryDeviceSupport", "nvmlGpmSampleAlloc", "nvmlGpmSampleGet", "nvmlGpmMetricsGet")
        )
        self._pairs: dict[int, _Pair] = {}  # by GPU index
        # A metric's return codes that mean "never on this GPU" (an NVLink metric on a PCIe board).
        self._never = {
            getattr(nvml, name)
            for name in ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_INVALID_ARGUMENT")
            if hasattr(nvml, name)
        }

    def unsupported(self, index: int) -> set[str]:
        """GPM fields learned missing on GPU `index` while the others answer."""
        pair = self._pairs.get(index)
        return set(pair.lacks) if pair is not None else set()

    def read(self, index: int, handle: Any, out: dict[str, float | int]) -> None:
        """Take this cycle's sample of GPU `index` and put the metrics since the last one into `out`."""
        nvml = self.nvml
        pair = self._pairs.get(index)
        if pair is None:
            if not self._available:
                raise GpmUnsupported("this NVML library has no GPM calls")
            if not nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                raise GpmUnsupported("GPM needs a Hopper or newer GPU")
            pair = self._pairs[index] = _Pair(nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc())
        nvml.nvmlGpmSampleGet(handle, pair.newer)
        if pair.primed:
            self._metrics_between(pair, out)
        pair.older, pair.newer = pair.newer, pair.older
        pair.primed = True

    def _metrics_between(self, pair: _Pair, out: dict[str, float | int]) -> None:
        nvml = self.nvml
        asked = [m for m in self._metrics if m[1] not in pair.lacks]
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(asked)
        request.sample1 = pair.older
        request.sample2 = pair.newer
        for i, (metric_id, _, _) in enumerate(asked):
            request.metrics[i].metricId = metric_id
        nvml.nvmlGpmMetricsGet(request)
        for i, (_, name, factor) in enumerate(asked):
            metric = request.metrics[i]
            # A metric this GPU lacks answers its own return code; the others still count.
            if metric.nvmlReturn == nvml.NVML_SUCCESS:
                if math.isfinite(metric.value) and metric.value >= 0:
                    out[name] = float(metric.value) * factor
            elif metric.nvmlReturn in self._never:
                pair.lacks.add(name)

    def close(self) -> None:
        """Free every GPU's samples."""
        for pair in self._pairs.values():
            for sample in (pair.older, pair.newer):
                # A lost GPU may refuse; nothing else can be done with the sample then.
                with contextlib.suppress(self.nvml.NVMLError):
                    self.nvml.nvmlGpmSampleFree(sample)
        self._pairs.clear()
