"""XID detector: a finding per (node, GPU, XID) from the kernel log, graded by the XID catalog.

Escalation: a reboot-class XID (the catalog's action reboot, reset_gpu or inspect_hardware) that
comes back on the same GPU after the node rebooted (one occurrence before the current boot, one in
it, both still within the event retention) did not go away with the reboot: the finding's action
becomes inspect_hardware and its summary says so. gpud's gpu-counts component does the same with a
GPU fault that survives reboots (reboot first, then a hardware inspection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fleetwatch.detectors.model import Window, fmt_number, held_episode
from fleetwatch.records import Finding
from fleetwatch.xid_catalog import lookup

# Actions that need someone to touch the node: the condition does not clear by itself, so the
# finding holds until the node reboots (or the hold limit passes).
REBOOT_CLASS_ACTIONS = frozenset({"reboot", "reset_gpu", "inspect_hardware"})


@dataclass(frozen=True, slots=True)
class XidThresholds:
    # s; app XIDs (13, 31, 43) repeat per failing launch: one finding a burst (our choice)
    hold_seconds: float = 600.0
    # s; until reboot, at most a day (Azure NHC azure_gpu_xid.nhc reads the log since boot)
    reboot_hold_limit_seconds: float = 86400.0


@dataclass(slots=True)
class XidDetector:
    """XID events -> findings; severity and action from base/xid_catalog.csv."""

    thresholds: XidThresholds = field(default_factory=XidThresholds)
    id: ClassVar[str] = "xid"
    # Reads only events, which RecentData keeps for event_retention_seconds, not samples.
    window_seconds: ClassVar[float] = 0.0

    @property
    def event_window_seconds(self) -> float:
        """How far back events must be kept for the longest hold to work."""
        return max(self.thresholds.hold_seconds, self.thresholds.reboot_hold_limit_seconds)

    def detect(self, window: Window) -> list[Finding]:
        # An XID whose GPU index is unknown (a kernel log read without an inventory) is told apart
        # by its board's PCI bus id, so two boards' XIDs never merge into one finding.
        times: dict[tuple[str, int | None, str | None, int], list[float]] = {}
        boards: dict[tuple[str, int | None, str | None, int], tuple[str | None, str | None]] = {}
        for event in window.events:
            if event.kind != "xid" or event.xid is None or event.t > window.now:
                continue
            bus = event.pci_bus_id if event.gpu is None else None
            key = (event.node, event.gpu, bus, event.xid)
            times.setdefault(key, []).append(event.t)
            known = boards.get(key, (None, None))
            boards[key] = (event.pci_bus_id or known[0], event.uuid or known[1])

        findings = []
        for (node, gpu, bus, xid), occurrences in times.items():
            pci_bus_id, uuid = boards[(node, gpu, bus, xid)]
            info = lookup(xid)
            if info.action in REBOOT_CLASS_ACTIONS:
                hold_seconds = self.thresholds.reboot_hold_limit_seconds
            else:
                hold_seconds = self.thresholds.hold_seconds
            state = window.nodes.get(node)
            # A reboot clears every XID: the process that caused an application XID is gone too.
            boot_seen_at = state.boot_seen_at if state is not None else None
            episode = held_episode(occurrences, window.now, hold_seconds, boot_seen_at)
            if not episode:
                continue
            action = info.action
            summary = f"XID {xid}: {info.meaning}"
            evidence: dict[str, object] = {"xid": xid, "count": len(episode)}
            if info.action in REBOOT_CLASS_ACTIONS and boot_seen_at is not None:
                before = [t for t in occurrences if t < boot_seen_at]
                if before and episode[0] >= boot_seen_at:
                    action = "inspect_hardware"
                    summary += (
                        f"; again after the node rebooted ({len(before)} before the reboot, "
                        f"the last {fmt_number(episode[0] - before[-1])} s before this one): "
                        "the reboot did not clear it"
                    )
                    evidence["count_before_reboot"] = len(before)
                    evidence["last_before_reboot"] = before[-1]
                    evidence["boot_seen_at"] = boot_seen_at
            findings.append(
                Finding(
                    detector=self.id,
                    severity=info.severity,
                    action=action,
                    summary=summary,
                    start=episode[0],
                    node=node,
                    gpu=gpu,
                    evidence=evidence,
                    key=str(xid) if bus is None else f"{xid}@{bus}",
                    uuid=uuid,
                    pci_bus_id=pci_bus_id,
                )
            )
        findings.sort(key=lambda f: (f.start, f.node or "", -1 if f.gpu is None else f.gpu, f.key))
        return findings
