"""Detectors: one module per detector, pure functions of recent data -> findings; the registry."""

from __future__ import annotations

from fleetwatch.detectors.clocks import ClocksDetector
from fleetwatch.detectors.ecc import EccDetector
from fleetwatch.detectors.gpu_lost import GpuLostDetector
from fleetwatch.detectors.infiniband import InfinibandDetector
from fleetwatch.detectors.model import Detector
from fleetwatch.detectors.node_silent import NodeSilentDetector
from fleetwatch.detectors.nvlink import NvlinkDetector
from fleetwatch.detectors.pcie import PcieDetector
from fleetwatch.detectors.power import PowerDetector
from fleetwatch.detectors.retired_pages import RetiredPagesDetector
from fleetwatch.detectors.row_remap import RowRemapDetector
from fleetwatch.detectors.straggler_stage import StragglerStageDetector
from fleetwatch.detectors.straggler_steps import StragglerStepsDetector
from fleetwatch.detectors.straggler_telemetry import StragglerTelemetryDetector
from fleetwatch.detectors.thermal import ThermalDetector
from fleetwatch.detectors.xid import XidDetector

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
    StragglerStageDetector,
    StragglerTelemetryDetector,
)


def default_detectors() -> list[Detector]:
    """One instance of every registered detector, with its default thresholds."""
    return [cls() for cls in DETECTORS]


def detector_ids() -> list[str]:
    """The ids of the registered detectors, in registry order."""
    return [cls.id for cls in DETECTORS]
