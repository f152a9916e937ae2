"""GPU-lost detector: a GPU the driver reports lost (NVML GPU_IS_LOST), held until a reboot.

XID 79 ("fallen off the bus") is the kernel's word for the same failure and already raises a
critical `xid` finding with action reboot; counting it here too would page twice for one fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from detectors.model import Event, Finding, Window, held_episode


@dataclass(frozen=True, slots=True)
class GpuLostThresholds:
    # s; a lost GPU returns only after a reboot; a day bounds a missed reboot signal (as xid's)
    hold_limit_seconds: float = 86400.0


@dataclass(slots=True)
class GpuLostDetector:
    """`gpu_lost` events -> a critical finding per (node, GPU), action reboot."""

    thresholds: GpuLostThresholds = field(default_factory=GpuLostThresholds)
    id: ClassVar[str] = "gpu_lost"
    # Reads only events, which RecentData keeps for event_retention_seconds, not samples.
    window_seconds: ClassVar[float] = 0.0

    @property
    def event_window_seconds(self) -> float:
        return self.thresholds.hold_limit_seconds

    def detect(self, window: Window) -> list[Finding]:
        events: dict[tuple[str, int | None], list[Event]] = {}
        for event in window.events:
            if event.t <= window.now and event.kind == "gpu_lost":
                events.setdefault((event.node, event.gpu), []).append(event)

        findings = []
        for (node, gpu), lost in events.items():
            state = window.nodes.get(node)
            boot_seen_at = state.boot_seen_at if state is not None else None
            times = [e.t for e in lost]
            hold_seconds = self.thresholds.hold_limit_seconds
            episode = held_episode(times, window.now, hold_seconds, boot_seen_at)
            if not episode:
                continue
            held = lost[len(lost) - len(episode) :]
            latest = held[-1]
            who = f"GPU {gpu}" if gpu is not None else "a GPU"
            evidence: dict[str, object] = {"count": len(held)}
            if latest.pci_bus_id is not None:
                evidence["pci_bus_id"] = latest.pci_bus_id
            if latest.uuid is not None:
                evidence["uuid"] = latest.uuid
            findings.append(
                Finding(
                    detector=self.id,
                    severity="critical",
                    action="reboot",
                    summary=f"{who} on {node} lost: the driver reports GPU is lost",
                    start=episode[0],
                    node=node,
                    gpu=gpu,
                    evidence=evidence,
                )
            )
        findings.sort(key=lambda f: (f.start, f.node or "", -1 if f.gpu is None else f.gpu))
        return findings
