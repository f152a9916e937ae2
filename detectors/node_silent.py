"""Node-silent detector: a node that has sent no data for several of its sampling intervals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fleetwatch.detectors.model import NodeState, Window, fmt_number, sampling_interval_seconds
from fleetwatch.records import Finding


@dataclass(frozen=True, slots=True)
class NodeSilentThresholds:
    # sampling intervals; one or two missed samples are network jitter, three in a row are not
    silent_intervals: float = 3.0
    # s; a floor so sub-second sampling does not turn ordinary batching delay into silence
    min_silent_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.silent_intervals <= 0 or self.min_silent_seconds < 0:
            raise ValueError("silent_intervals must be positive, min_silent_seconds not negative")


@dataclass(slots=True)
class NodeSilentDetector:
    """Node states -> a finding (gpu None) per node silent for `silent_intervals` intervals."""

    thresholds: NodeSilentThresholds = field(default_factory=NodeSilentThresholds)
    id: ClassVar[str] = "node_silent"
    # Reads only NodeState.last_seen, not samples.
    window_seconds: ClassVar[float] = 0.0
    # Warning: the node may be down or hung, or only its agent or network path is; a person has to
    # look, and the GPU detectors raise critical findings when the hardware says so itself.
    severity: ClassVar[str] = "warning"
    action: ClassVar[str] = "inspect_hardware"

    def silent_after_seconds(self, state: NodeState) -> float:
        """How long `state`'s node may send nothing before it counts as silent."""
        silent_seconds = self.thresholds.silent_intervals * sampling_interval_seconds(state)
        return max(silent_seconds, self.thresholds.min_silent_seconds)

    def detect(self, window: Window) -> list[Finding]:
        watched_seconds = window.now - window.watching_since
        findings = []
        for node, state in window.nodes.items():
            limit_seconds = self.silent_after_seconds(state)
            # A watcher that only just started has not had the chance to hear from anyone yet:
            # that is a collector restart, not a silent node.
            if watched_seconds < limit_seconds:
                continue
            # A node known (e.g. from the inventory) but not heard from since we started listening
            # has been silent at least since then.
            since = state.last_seen if state.last_seen is not None else window.watching_since
            silent_seconds = window.now - since
            if silent_seconds < limit_seconds:
                continue
            interval_seconds = sampling_interval_seconds(state)
            if state.last_seen is None:
                summary = f"node {node} silent: no data since watching began {fmt_number(silent_seconds)} s ago"
            else:
                summary = (
                    f"node {node} silent: no data for {fmt_number(silent_seconds)} s "
                    f"({fmt_number(silent_seconds / interval_seconds)} sampling intervals "
                    f"of {fmt_number(interval_seconds)} s)"
                )
            findings.append(
                Finding(
                    detector=self.id,
                    severity=self.severity,
                    action=self.action,
                    summary=summary,
                    start=since,
                    node=node,
                    evidence={
                        "last_seen": state.last_seen,
                        "silent_seconds": silent_seconds,
                        "sampling_interval_seconds": interval_seconds,
                    },
                )
            )
        findings.sort(key=lambda f: (f.start, f.node or ""))
        return findings
