"""GPU-lost detector: a GPU the driver cannot reach (NVML GPU_IS_LOST, XID 79) until a reboot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from detectors.model import Event, Finding, Window, held_episode

FALLEN_OFF_THE_BUS_XID = 79


@dataclass(frozen=True, slots=True)
class GpuLostThresholds:
    # s; a lost GPU returns only after a reboot; a day bounds a missed reboot signal (as xid's)
    hold_limit_seconds: float = 86400.0


def _is_gpu_lost(event: Event) -> bool:
    return event.kind == "gpu_lost" or (event.kind == "xid" and event.xid == FALLEN_OFF_THE_BUS_XID)


@dataclass(slots=True)
class GpuLostDetector:
    """`gpu_lost` events and XID 79 -> a critical finding per (node, GPU), action reboot."""

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
            if event.t <= window.now and _is_gpu_lost(event):
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
            xid_count = sum(1 for e in held if e.kind == "xid")
            latest = held[-1]
            # Name what told us: the kernel's XID 79 is the clearest reason a person can act on.
            reason = "XID 79, fallen off the bus" if xid_count else "the driver reports GPU is lost"
            who = f"GPU {gpu}" if gpu is not None else "a GPU"
            evidence: dict[str, object] = {
                "count": len(held),
                "xid_79_count": xid_count,
                "gpu_lost_count": len(held) - xid_count,
            }
            if latest.pci_bus_id is not None:
                evidence["pci_bus_id"] = latest.pci_bus_id
            if latest.uuid is not None:
                evidence["uuid"] = latest.uuid
            findings.append(
                Finding(
                    detector=self.id,
                    severity="critical",
                    action="reboot",
                    summary=f"{who} on {node} lost: {reason}",
                    start=episode[0],
                    node=node,
                    gpu=gpu,
                    evidence=evidence,
                )
            )
        findings.sort(key=lambda f: (f.start, f.node or "", -1 if f.gpu is None else f.gpu))
        return findings
