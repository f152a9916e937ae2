"""GPU-lost detector: a GPU the driver reports lost, or one that stopped reporting, until a reboot.

Two signs, one finding per (node, GPU):
- a `gpu_lost` event: NVML answers GPU_IS_LOST for the GPU (held until the node reboots);
- fewer GPUs than the node had: a GPU that had samples sends none for several sampling intervals
  while the node's other GPUs keep reporting (held while it stays missing, across reboots, up to
  the hold limit). When every GPU of the node goes quiet it is the node or its agent, not a GPU:
  node_silent's finding, not this one.

XID 79 ("fallen off the bus") is the kernel's word for the same failure and already raises a
critical `xid` finding with action reboot; a GPU that stopped reporting around an XID 79 is left to
that finding, so one fault pages once.

A GPU still missing after the node rebooted (last seen before the new boot, its peers reporting in
it) did not come back with a reboot: the action becomes inspect_hardware, as gpud's gpu-counts
component suggests a hardware inspection when the GPU count stays wrong across reboots.

Caveat: NVML numbers GPUs from 0 at boot, so after a reboot without GPU 5 the old GPU 6 reports as
5 and the finding names the highest index; the count of GPUs is right, the uuid in the evidence
(where known) names the board.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

from fleetwatch.detectors.model import Window, fmt_number, gpu_table, held_episode, sampling_interval_seconds
from fleetwatch.records import Event, Finding

# XID 79: GPU has fallen off the bus (base/xid_catalog.csv); the xid detector reports it.
XID_FALLEN_OFF_THE_BUS = 79


@dataclass(frozen=True, slots=True)
class GpuLostThresholds:
    # s; a lost GPU returns only after a reboot; a day bounds a missed reboot signal (as xid's)
    hold_limit_seconds: float = 86400.0
    # sampling intervals; node_silent's 3 missed samples plus 2 for a GPU's slow NVML calls (ours)
    missing_intervals: float = 5.0
    # s; a floor: sub-second sampling must not turn batching delay into a lost GPU (node_silent's)
    min_missing_seconds: float = 5.0
    # s; an XID 79 this long before the GPU's last sample or later is the same failure (our choice)
    xid_grace_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.missing_intervals <= 0 or self.min_missing_seconds < 0:
            raise ValueError("missing_intervals must be positive, min_missing_seconds not negative")
        if self.hold_limit_seconds <= 0 or self.xid_grace_seconds < 0:
            raise ValueError("hold_limit_seconds must be positive, xid_grace_seconds not negative")


@dataclass(slots=True)
class GpuLostDetector:
    """`gpu_lost` events and GPUs gone quiet -> a critical finding per (node, GPU)."""

    thresholds: GpuLostThresholds = field(default_factory=GpuLostThresholds)
    id: ClassVar[str] = "gpu_lost"

    @property
    def window_seconds(self) -> float:
        # The engine keeps each GPU's newest sample time (NodeState.gpu_last_seen) beyond sample
        # retention; the samples themselves are read only for a uuid, and where a caller's window
        # has no gpu_last_seen. A minute covers the missing limit at the default interval.
        return 60.0

    # The samples' times and uuids only, no fields (RecentData.for_detectors).
    gpu_fields: ClassVar[Mapping[str, float]] = MappingProxyType({})

    @property
    def event_window_seconds(self) -> float:
        return self.thresholds.hold_limit_seconds

    def detect(self, window: Window) -> list[Finding]:
        lost_events: dict[tuple[str, int | None], list[Event]] = {}
        xid79: dict[str, list[Event]] = {}
        for event in window.events:
            if event.t > window.now:
                continue
            if event.kind == "gpu_lost":
                lost_events.setdefault((event.node, event.gpu), []).append(event)
            elif event.kind == "xid" and event.xid == XID_FALLEN_OFF_THE_BUS:
                xid79.setdefault(event.node, []).append(event)

        findings = self._from_events(window, lost_events)
        reported = {(f.node, f.gpu) for f in findings}
        findings += [f for f in self._missing(window, xid79) if (f.node, f.gpu) not in reported]
        findings.sort(key=lambda f: (f.start, f.node or "", -1 if f.gpu is None else f.gpu))
        return findings

    # --- the driver says so ----------------------------------------------------------------------

    def _from_events(self, window: Window, events: dict[tuple[str, int | None], list[Event]]) -> list[Finding]:
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
                    uuid=latest.uuid,
                    pci_bus_id=latest.pci_bus_id,
                )
            )
        return findings

    # --- fewer GPUs than the node had ------------------------------------------------------------

    def _missing(self, window: Window, xid79: dict[str, list[Event]]) -> list[Finding]:
        now = window.now
        table = gpu_table(window)
        newest_sample: dict[str, dict[int, float]] = {}
        if not table.last_seen_in_states:  # else the nodes' gpu_last_seen already hold these
            for (node, gpu), t in zip(table.keys, table.newest_t.tolist()):
                newest_sample.setdefault(node, {})[gpu] = t
        findings = []
        for node in set(window.nodes) | set(newest_sample):
            state = window.nodes.get(node)
            seen: Mapping[int, float] = state.gpu_last_seen if state is not None else {}
            from_samples = newest_sample.get(node)
            if from_samples:
                merged = dict(seen)
                for gpu, t in from_samples.items():
                    if t > merged.get(gpu, float("-inf")):
                        merged[gpu] = t
                seen = merged
            if len(seen) < 2:
                continue  # one GPU alone going quiet is the node going quiet
            interval = sampling_interval_seconds(state)
            limit = max(self.thresholds.missing_intervals * interval, self.thresholds.min_missing_seconds)
            # A sample from a clock ahead of ours is reporting now, not in the future.
            newest = min(max(seen.values()), now)
            if now - newest >= limit:
                continue  # every GPU is quiet: the node or its agent (node_silent), not a GPU
            if newest - min(min(seen.values()), now) < limit:
                continue  # every GPU reported lately: none missing (the common case)
            last_seen = {gpu: min(t, now) for gpu, t in seen.items()}
            missing = {
                gpu: t
                for gpu, t in last_seen.items()
                if newest - t >= limit and now - t <= self.thresholds.hold_limit_seconds
            }
            if not missing:
                continue
            boot_seen_at = state.boot_seen_at if state is not None else None
            reporting = sum(1 for t in last_seen.values() if newest - t < limit)
            for gpu, t in sorted(missing.items()):
                if any(
                    e.t >= t - self.thresholds.xid_grace_seconds
                    and (e.gpu is None or e.gpu == gpu)
                    # The xid finding ends with a reboot after it: from then on a GPU still
                    # missing is this detector's to report.
                    and (boot_seen_at is None or boot_seen_at <= e.t)
                    for e in xid79.get(node, ())
                ):
                    continue  # XID 79: the xid detector's finding for the same failure
                findings.append(
                    self._missing_finding(window, node, gpu, t, interval, reporting, len(last_seen), boot_seen_at)
                )
        return findings

    def _missing_finding(
        self,
        window: Window,
        node: str,
        gpu: int,
        last_seen: float,
        interval: float,
        reporting: int,
        known: int,
        boot_seen_at: float | None,
    ) -> Finding:
        silent_seconds = window.now - last_seen
        survived_reboot = boot_seen_at is not None and last_seen < boot_seen_at
        summary = (
            f"GPU {gpu} on {node} stopped reporting: {reporting} of {known} GPUs sampled, "
            f"none from GPU {gpu} for {fmt_number(silent_seconds)} s"
        )
        if survived_reboot:
            summary += "; still missing after the node rebooted"
        evidence: dict[str, object] = {
            "last_seen": last_seen,
            "silent_seconds": silent_seconds,
            "gpus_reporting": reporting,
            "gpus_known": known,
            "sampling_interval_seconds": interval,
        }
        if survived_reboot:
            evidence["boot_seen_at"] = boot_seen_at
        table = gpu_table(window)
        position = table.position((node, gpu))
        if position is not None:
            uuid = table.ident(position, int(table.end[position]) - 1)[0]
            if uuid is not None:
                evidence["uuid"] = uuid
        return Finding(
            detector=self.id,
            severity="critical",
            # Reboot first (a GPU that fell off the bus comes back only with one); if it did not
            # come back across a reboot, a person has to look at the board.
            action="inspect_hardware" if survived_reboot else "reboot",
            summary=summary,
            # The first sample it missed.
            start=min(last_seen + interval, window.now),
            node=node,
            gpu=gpu,
            evidence=evidence,
        )
