"""The records detectors read and the findings they return; shared by collector, replay and eval."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

SEVERITIES = ("info", "warning", "critical")
ACTIONS = ("none", "check_app", "reset_gpu", "reboot", "inspect_hardware", "drain")


@dataclass(frozen=True, slots=True)
class GpuSample:
    t: float
    node: str
    gpu: int
    metrics: Mapping[str, float | int]  # canonical names; an unsupported field is absent
    uuid: str | None = None
    job: str | None = None
    rank: int | None = None


@dataclass(frozen=True, slots=True)
class HostSample:
    t: float
    node: str
    metrics: Mapping[str, float | int]


@dataclass(frozen=True, slots=True)
class Event:
    t: float
    node: str
    kind: str  # "xid", "gpu_lost", ...
    gpu: int | None = None
    xid: int | None = None
    pci_bus_id: str | None = None
    uuid: str | None = None
    message: str = ""
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Step:
    t: float
    job: str
    rank: int
    node: str
    step: int
    seconds: float
    gpu: int | None = None


@dataclass(frozen=True, slots=True)
class NodeState:
    node: str
    last_seen: float | None  # time of the newest data from this node
    sampling_interval_seconds: float
    gpu_count: int | None = None
    boot_id: str | None = None
    boot_seen_at: float | None = None  # when the current boot_id was first seen


@dataclass(frozen=True, slots=True)
class Window:
    """Recent data as of `now`; every sequence is oldest first."""

    now: float
    gpu: Mapping[tuple[str, int], Sequence[GpuSample]]
    host: Mapping[str, Sequence[HostSample]]
    events: Sequence[Event]
    steps: Sequence[Step]
    nodes: Mapping[str, NodeState]
    # When the watcher (collector process or replay) began receiving data; lets node_silent tell
    # "the node went quiet" from "we only just started listening".
    watching_since: float


@dataclass(frozen=True, slots=True)
class Finding:
    detector: str
    severity: str
    action: str
    summary: str
    start: float
    node: str | None = None
    gpu: int | None = None
    job: str | None = None
    rank: int | None = None
    end: float | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    # Distinguishes findings of one detector on one entity (e.g. the XID number).
    key: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} not in {SEVERITIES}")
        if self.action not in ACTIONS:
            raise ValueError(f"action {self.action!r} not in {ACTIONS}")

    @property
    def fingerprint(self) -> str:
        parts = (self.detector, self.node, self.gpu, self.job, self.rank, self.key)
        return "|".join("" if p is None else str(p) for p in parts)

    def to_dict(self) -> dict[str, Any]:
        """The DESIGN.md findings shape (one JSON object a line)."""
        return {
            "detector": self.detector,
            "severity": self.severity,
            "action": self.action,
            "node": self.node,
            "gpu": self.gpu,
            "job": self.job,
            "rank": self.rank,
            "start": self.start,
            "end": self.end,
            "summary": self.summary,
            "evidence": dict(self.evidence),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)


class Detector(Protocol):
    """A detector is pure: it reads a Window and returns the findings that hold at window.now."""

    id: str
    # How much history (seconds before now) this detector needs in the window.
    window_seconds: float

    def detect(self, window: Window) -> list[Finding]: ...


def held_episode(
    times: Sequence[float], now: float, hold_seconds: float, boot_seen_at: float | None
) -> Sequence[float]:
    """The occurrences (sorted times, all <= now) of the episode still held at `now`, or empty.

    An episode ends when the node reboots after an occurrence (boot_seen_at later than it) or when
    more than `hold_seconds` pass without a new one; a later occurrence starts a new episode.
    """
    if not times:
        return ()
    last = times[-1]
    if (boot_seen_at is not None and boot_seen_at > last) or now - last > hold_seconds:
        return ()
    first = len(times) - 1
    while first > 0:
        previous = times[first - 1]
        rebooted_between = boot_seen_at is not None and boot_seen_at > previous
        if rebooted_between or times[first] - previous > hold_seconds:
            break
        first -= 1
    return times[first:]
