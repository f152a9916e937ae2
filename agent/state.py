"""The agent's latest view of its node: what /metrics and `--once --json` read, updated each cycle."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceStats:
    """Per-source health, as node_exporter reports per collector."""

    last_duration_seconds: float = 0.0
    last_success: bool = True
    errors_total: int = 0


@dataclass
class AgentState:
    node: str
    inventory: list[dict[str, Any]] = field(default_factory=list)  # GpuInfo dicts (index, uuid, name, ...)
    # Latest per GPU: {"gpu", "t", "uuid", "job", "rank", "metrics": {canonical: value}}; a lost GPU is removed.
    gpus: dict[int, dict[str, Any]] = field(default_factory=dict)
    host: dict[str, float | int] = field(default_factory=dict)  # latest host metrics
    # Latest per InfiniBand port: {"device", "port", "ib_state", "ib_rate_gbps", ...}
    ib_ports: list[dict[str, Any]] = field(default_factory=list)
    # XIDs seen since the agent started, per (gpu index or None, xid): a Prometheus counter.
    xid_counts: dict[tuple[int | None, int], int] = field(default_factory=dict)
    # The most recent XID per GPU index (DCGM's DCGM_FI_DEV_XID_ERRORS is this value).
    xid_last: dict[int | None, int] = field(default_factory=dict)
    sources: dict[str, SourceStats] = field(default_factory=dict)
    sample_cpu_seconds_last: float = 0.0
    sample_wall_seconds_last: float = 0.0
    samples_total: int = 0
    spool_bytes: int = 0
    spool_batches: int = 0
    spool_dropped_batches_total: int = 0
    spool_quarantined_batches_total: int = 0  # spool files that could not be sent, moved aside
    collector_connected: bool = False
    # The collector streamed to (or last tried): its collector_address entry and the address dialed.
    collector_entry: str = ""
    collector_address: str = ""
    nvml_available: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_xid(self, gpu: int | None, xid: int) -> None:
        with self.lock:
            self.xid_counts[(gpu, xid)] = self.xid_counts.get((gpu, xid), 0) + 1
            self.xid_last[gpu] = xid
