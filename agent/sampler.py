"""One sampling cycle over every source, each timed and isolated, keeping the agent's state current.

A source that raises is counted and logged and leaves its part of the cycle empty; the others
still report (node_exporter's rule: one broken collector never hides the rest).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetwatch.agent.sources.host import HostSource
from fleetwatch.agent.sources.infiniband import InfinibandSource
from fleetwatch.agent.sources.jobs import JobResolver, job_with_pod
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.agent.sources.podresources import PodRef, PodResourcesSource
from fleetwatch.agent.state import AgentState, SourceStats
from fleetwatch.agent.xid_merge import XidMerger

log = logging.getLogger(__name__)


@dataclass
class Cycle:
    t: float
    gpus: list[dict[str, Any]] = field(default_factory=list)
    host: dict[str, float | int] | None = None
    ib_ports: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)


class Sampler:
    def __init__(
        self,
        state: AgentState,
        *,
        host: HostSource,
        nvml: NvmlSource | None = None,
        infiniband: InfinibandSource | None = None,
        jobs: JobResolver | None = None,
        pods: PodResourcesSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.host = host
        self.nvml = nvml
        self.infiniband = infiniband
        self.jobs = jobs
        self.pods = pods
        self.clock = clock
        # NVML events and the kernel log both report XIDs; each one is sent once.
        self.xids = XidMerger()
        self._pending_steps: list[dict[str, Any]] = []
        self._steps_lock = threading.Lock()
        self._lost_logged: set[int] = set()
        state.nvml_available = nvml is not None
        state.inventory = list(nvml.inventory) if nvml is not None else []

    def _timed(self, name: str, read: Callable[[], Any], empty: Any) -> Any:
        stats = self.state.sources.setdefault(name, SourceStats())
        started = time.perf_counter()
        try:
            result = read()
            stats.last_success = True
        except Exception:
            stats.errors_total += 1
            if stats.last_success:  # log when a source starts failing, not every cycle
                log.exception("source %s failed; its fields are missing until it recovers", name)
            stats.last_success = False
            result = empty
        stats.last_duration_seconds = time.perf_counter() - started
        return result

    def _pod_owners(self, gpus: list[dict[str, Any]]) -> dict[int, PodRef]:
        """The pod of each GPU the kubelet allocated to one; the source logs and counts its own failures."""
        if self.pods is None or not gpus:
            return {}
        started = time.perf_counter()
        owners = self.pods.owners(gpus)
        stats = self.state.sources.setdefault(self.pods.name, SourceStats())
        stats.last_duration_seconds = time.perf_counter() - started
        stats.last_success = not self.pods.failing
        stats.errors_total = self.pods.failures_total
        return owners

    def _attribute_jobs(self, gpus: list[dict[str, Any]]) -> None:
        """Job and rank of each GPU from its processes (the pids never leave the agent) and its pod."""
        owners = self._pod_owners(gpus)
        live: list[int] = []
        for sample in gpus:
            pids = sample.pop("pids", None) or []
            live.extend(pids)
            info = self.jobs.for_gpu(pids) if self.jobs is not None and pids else None
            owner = owners.get(sample["gpu"])
            if owner is not None:
                sample["k8s_namespace"], sample["k8s_pod"] = owner.namespace, owner.pod
                sample["k8s_container"] = owner.container
                if self.jobs is not None:  # job_attribution off names no job, the pod's neither
                    info = job_with_pod(info, owner.job)
            if info is not None:
                sample["job"], sample["rank"] = info.job, info.rank
        if self.jobs is not None:
            self.jobs.forget_missing(live)

    def admit_events(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drops XIDs already reported through the other path; counts and logs the rest."""
        admitted = []
        for event in events:
            if event.get("kind") == "xid":
                if not self.xids.admit(event):
                    continue
                self.state.count_xid(event.get("gpu"), int(event["xid"]))
                log.warning(
                    "XID %s on GPU %s (%s) from %s: %s",
                    event["xid"],
                    event.get("gpu"),
                    event.get("pci_bus_id"),
                    event.get("source"),
                    event.get("message", ""),
                )
            elif event.get("kind") == "gpu_lost":
                log.error(
                    "GPU %s (%s) is lost: %s", event.get("gpu"), event.get("pci_bus_id"), event.get("message", "")
                )
            admitted.append(event)
        return admitted

    def add_steps(self, steps: list[dict[str, Any]]) -> None:
        with self._steps_lock:
            self._pending_steps.extend(steps)

    def _take_steps(self, gpus: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._steps_lock:
            steps, self._pending_steps = self._pending_steps, []
        if steps:
            # A rank reporting steps runs on the GPU whose processes carry that job and rank.
            where = {(g.get("job"), g.get("rank")): g["gpu"] for g in gpus if g.get("job") is not None}
            for s in steps:
                gpu = where.get((s["job"], s["rank"]))
                if gpu is not None:
                    s["gpu"] = gpu
        return steps

    def sample(self) -> Cycle:
        """One cycle (blocking: NVML, psutil and sysfs reads)."""
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        cycle = Cycle(t=self.clock())
        if self.nvml is not None:
            cycle.gpus, events = self._timed("nvml", self.nvml.sample, ([], []))
            self._attribute_jobs(cycle.gpus)
            cycle.events = self.admit_events(events)
        cycle.host = self._timed("host", self.host.sample, None)
        if self.infiniband is not None:
            cycle.ib_ports = self._timed("infiniband", self.infiniband.sample, [])
        cycle.steps = self._take_steps(cycle.gpus)
        with self.state.lock:
            lost = {e.get("gpu") for e in cycle.events if e.get("kind") == "gpu_lost"}
            self.state.gpus = {g["gpu"]: g for g in cycle.gpus if g["gpu"] not in lost}
            self.state.host = dict(cycle.host or {})
            self.state.ib_ports = list(cycle.ib_ports)
            self.state.samples_total += 1
            self.state.sample_cpu_seconds_last = time.process_time() - cpu_started
            self.state.sample_wall_seconds_last = time.perf_counter() - wall_started
        return cycle
