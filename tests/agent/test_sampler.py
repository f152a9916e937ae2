"""One cycle over every source: a failing source is isolated, jobs and steps are attributed to GPUs."""

from __future__ import annotations

from fleetwatch.agent.sampler import Sampler
from fleetwatch.agent.sources.host import HostSource
from fleetwatch.agent.sources.jobs import JobInfo
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.agent.state import AgentState
from fleetwatch.sim.fake_nvml import make_fake_nvml
from fleetwatch.sim.node import SimNode


def nvml_source(gpus: int = 2) -> NvmlSource:
    source = NvmlSource(make_fake_nvml(SimNode("n01", gpu_count=gpus)))
    source.start()
    return source


class BrokenInfiniband:
    name = "infiniband"

    def sample(self):
        raise OSError("sysfs went away")


class FixedJobs:
    """Job attribution with a fixed answer per pid set, standing in for /proc of a real job."""

    def __init__(self) -> None:
        self.forgotten: list[int] = []

    def for_gpu(self, pids):
        return JobInfo(job="4242", rank=min(pids) % 8, scheduler="slurm") if pids else None

    def forget_missing(self, live_pids) -> None:
        self.forgotten = list(live_pids)


def test_a_failing_source_is_counted_and_the_others_still_report() -> None:
    state = AgentState(node="n01")
    sampler = Sampler(state, host=HostSource(), nvml=nvml_source(), infiniband=BrokenInfiniband())
    cycle = sampler.sample()
    assert len(cycle.gpus) == 2 and cycle.host and cycle.ib_ports == []
    assert state.sources["infiniband"].last_success is False and state.sources["infiniband"].errors_total == 1
    assert state.sources["nvml"].last_success and state.sources["host"].last_success
    sampler.sample()
    assert state.sources["infiniband"].errors_total == 2
    assert set(state.gpus) == {0, 1} and state.samples_total == 2


def test_jobs_are_attributed_and_pids_never_leave_the_agent() -> None:
    jobs = FixedJobs()
    sampler = Sampler(AgentState(node="n01"), host=HostSource(), nvml=nvml_source(), jobs=jobs)
    cycle = sampler.sample()
    for gpu in cycle.gpus:
        assert "pids" not in gpu
        assert gpu["job"] == "4242" and gpu["rank"] is not None
    assert jobs.forgotten  # the cache is trimmed to the live pids each cycle


def test_steps_are_forwarded_with_the_gpu_of_their_rank() -> None:
    sampler = Sampler(AgentState(node="n01"), host=HostSource(), nvml=nvml_source(), jobs=FixedJobs())
    first = sampler.sample()
    rank_gpu = {g["rank"]: g["gpu"] for g in first.gpus}
    rank = next(iter(rank_gpu))
    sampler.add_steps(
        [
            {"t": 1.0, "job": "4242", "rank": rank, "step": 7, "seconds": 0.93},
            {"t": 1.0, "job": "other", "rank": 0, "step": 1, "seconds": 1.2},
        ]
    )
    cycle = sampler.sample()
    by_job = {s["job"]: s for s in cycle.steps}
    assert by_job["4242"]["gpu"] == rank_gpu[rank]
    assert "gpu" not in by_job["other"]
    assert sampler.sample().steps == []  # each step is sent once


def test_the_same_xid_from_nvml_and_the_kernel_log_counts_once() -> None:
    state = AgentState(node="n01")
    sampler = Sampler(state, host=HostSource())
    nvml = {"t": 1.0, "kind": "xid", "gpu": 3, "pci_bus_id": "0000:5d:00.0", "xid": 79, "message": "", "source": "nvml"}
    kmsg = dict(nvml, source="kmsg", message="GPU has fallen off the bus.")
    assert len(sampler.admit_events([nvml])) == 1
    assert sampler.admit_events([kmsg]) == []
    assert state.xid_counts == {(3, 79): 1}
