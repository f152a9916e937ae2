"""Detectors: one module per detector, pure functions of recent data -> findings; the registry."""

from __future__ import annotations

from detectors.clocks import ClocksDetector
from detectors.ecc import EccDetector
from detectors.gpu_lost import GpuLostDetector
from detectors.infiniband import InfinibandDetector
from detectors.model import Detector
from detectors.node_silent import NodeSilentDetector
from detectors.nvlink import NvlinkDetector
from detectors.pcie import PcieDetector
from detectors.power import PowerDetector
from detectors.retired_pages import RetiredPagesDetector
from detectors.row_remap import RowRemapDetector
from detectors.straggler_steps import StragglerStepsDetector
from detectors.straggler_telemetry import StragglerTelemetryDetector
from detectors.thermal import ThermalDetector
from detectors.xid import XidDetector

# The registry: every detector the collector and replay run by default, in evaluation order.
# Adding a detector is one line here; importing this package registers nothing else.
DETECTORS: tuple[type[Detector], ...] = (
    XidDetector,
    EccDetector,
    RowRemapDetector,
    RetiredPagesDetector,
    PcieDetector,
    NvlinkDetector,
    ThermalDetector,
    PowerDetector,
    ClocksDetector,
    GpuLostDetector,
    NodeSilentDetector,
    InfinibandDetector,
    StragglerStepsDetector,
    StragglerTelemetryDetector,
)


def default_detectors() -> list[Detector]:
    """One instance of every registered detector, with its default thresholds."""
    return [cls() for cls in DETECTORS]


def detector_ids() -> list[str]:
    """The ids of the registered detectors, in registry order."""
    return [cls.id for cls in DETECTORS]
