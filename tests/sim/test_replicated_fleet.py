"""The false-alarm soak's big fleets (tests/bench/false_alarms.py --copies): a healthy scenario's
fleet side by side with itself, each copy with its own jobs and noise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fleetwatch.sim.evaluate import evaluate_scenario, load_scenario
from fleetwatch.sim.fleet import SimFleet

BENCH = Path(__file__).resolve().parents[1] / "bench" / "false_alarms.py"
CORPUS = Path(__file__).resolve().parents[1] / "scenarios"


@pytest.fixture(scope="module")
def false_alarms():
    spec = importlib.util.spec_from_file_location("false_alarms", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["false_alarms"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("false_alarms", None)


def test_each_copy_has_its_own_jobs_and_noise(false_alarms) -> None:
    scenario = load_scenario(CORPUS / "healthy_mixed_noise_h200.toml")
    big = false_alarms.replicated(scenario, 3)
    fleet = SimFleet.from_scenario(big)
    assert len(fleet.node_names) == 3 * scenario["fleet"]["nodes"] == 12
    assert sorted(fleet.jobs) == ["j1", "j1-1", "j1-2"]
    # Copy c's job runs on copy c's nodes only, and has the scenario's noise: one restart, one
    # checkpoint pause (the fleet-wide items were given to each copy's job, not to all of them).
    for c, job_id in enumerate(["j1", "j1-1", "j1-2"]):
        job = fleet.jobs[job_id]
        assert job.nodes == [f"n{4 * c + i:02d}" for i in range(1, 5)]
        assert len(job.restarts) == 1 and len(job.pauses) == 1
    # The node-specific hiccup (n02 GPU 2) lands on each copy's second node.
    hiccups = [(job_id, job.ranks[rank]) for job_id, job in fleet.jobs.items() for rank, *_ in job.hiccups]
    assert sorted(hiccups) == [("j1", ("n02", 2)), ("j1-1", ("n06", 2)), ("j1-2", ("n10", 2))]


def test_a_replicated_healthy_fleet_raises_no_alarm(false_alarms) -> None:
    name, scenario = false_alarms.stretched(CORPUS / "healthy_steady_h200.toml", hours=0.05, seed=0)
    result = evaluate_scenario(false_alarms.replicated(scenario, 2), name=name)
    assert result.node_days == pytest.approx(2 * scenario["fleet"]["nodes"] * 180 / 86400)
    assert result.false_alarms == []


def test_scenarios_with_faults_are_not_replicated(false_alarms) -> None:
    with pytest.raises(ValueError, match="only healthy"):
        false_alarms.replicated(load_scenario(CORPUS / "ecc_dbe_h100.toml"), 2)
