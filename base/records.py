"""The records every layer shares: samples, events and step times as they travel, and findings.

The agent builds them, the wire carries them, the collector stores them and the detectors read
them; they live here, under every layer, so none of those depends on another for its data types.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "critical")
ACTIONS = ("none", "check_app", "reset_gpu", "reboot", "inspect_hardware", "drain")
# Hex digits of SHA-256 kept in Finding.fingerprint: 64 bits, so a collision within a fleet is negligible.
FINGERPRINT_HEX_DIGITS = 16


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
class IbSample:
    """One InfiniBand (or RoCE) port of a node at one time, as the agent reads it from sysfs.

    metrics: `ib_state` (text: "ACTIVE", "DOWN", "INIT", "ARMED", ...), `ib_rate_gbps`, and the
    PortCounters `ib_link_downed_total` and `ib_link_error_recovery_total` (8 bits),
    `ib_symbol_error_total` and `ib_rcv_errors_total` (16 bits); the counters saturate at their
    maximum instead of wrapping and restart from 0 when the driver reloads. A field the port
    cannot report is absent.
    """

    t: float
    node: str
    device: str  # e.g. "mlx5_0"
    port: int  # 1-based, as under /sys/class/infiniband/<device>/ports/
    metrics: Mapping[str, float | int | str]

    @property
    def active(self) -> bool | None:
        """Whether the port is ACTIVE (or ACTIVE_DEFER); None when its state is unknown."""
        state = self.metrics.get("ib_state")
        if state == "ACTIVE":
            return True  # the common case, first
        if not isinstance(state, str) or not state:
            return None
        return state.upper().startswith("ACTIVE")


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
    seconds: float  # the rank's own compute time
    gpu: int | None = None
    # Where the job says it: the rank's data-parallel replica, pipeline stage and tensor-parallel
    # rank, and the step's wall time (compute and collective waits) as the rank saw it.
    dp_rank: int | None = None
    pp_stage: int | None = None
    tp_rank: int | None = None
    wall_seconds: float | None = None


@functools.lru_cache(maxsize=65536)
def _fingerprint(detector: str, node: str | None, gpu: int | None, job: str | None, rank: int | None, key: str) -> str:
    # Cached: every detection pass asks every open finding for it, and a hash of JSON is not free.
    digest = hashlib.sha256(json.dumps([detector, node, gpu, job, rank, key], separators=(",", ":")).encode())
    return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]


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
    # The board, where known (fleetwatch.inventory): not part of the finding's identity, which
    # the node and index (or, before the index is known, the key) already give.
    uuid: str | None = None
    pci_bus_id: str | None = None
    serial: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} not in {SEVERITIES}")
        if self.action not in ACTIONS:
            raise ValueError(f"action {self.action!r} not in {ACTIONS}")

    @property
    def fingerprint(self) -> str:
        """Which alert this finding is: 16 hex digits of a hash of detector, node, gpu, job, rank, key.

        Opaque, like Alertmanager's; hashing a JSON array keeps names containing any character apart.
        The collector stores it: a change needs a migration that recomputes stored alerts' (as 0002).
        """
        return _fingerprint(
            self.detector,
            self.node,
            None if self.gpu is None else int(self.gpu),
            self.job,
            None if self.rank is None else int(self.rank),
            self.key,
        )

    def to_dict(self) -> dict[str, Any]:
        """The DESIGN.md findings shape (one JSON object a line)."""
        return {
            "detector": self.detector,
            "severity": self.severity,
            "action": self.action,
            "node": self.node,
            "gpu": self.gpu,
            "uuid": self.uuid,
            "pci_bus_id": self.pci_bus_id,
            "serial": self.serial,
            "model": self.model,
            "job": self.job,
            "rank": self.rank,
            "start": self.start,
            "end": self.end,
            "summary": self.summary,
            "evidence": dict(self.evidence),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)
