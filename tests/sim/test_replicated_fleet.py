"""The false-alarm soak's big fleets (tests/bench/false_alarms.py --copies): a healthy scenario's
fleet side by side with itself, each copy with its own jobs and noise."""

from __future__ import annotations

import importlib.util
import json
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


def _soak(false_alarms, monkeypatch, capsys, *args: str) -> tuple[dict, str]:
    argv = ["false_alarms.py", "--hours", "0.01", "--seeds", "2", "--jobs", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--scenario", "healthy_steady_h200", *args])
    false_alarms.main()
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), err


def test_a_soak_with_a_ledger_goes_on_where_it_stopped(false_alarms, monkeypatch, capsys, tmp_path) -> None:
    ledger = tmp_path / "soak.jsonl"
    first, _ = _soak(false_alarms, monkeypatch, capsys, "--ledger", str(ledger))
    assert first["healthy_runs"] == 2 and len(ledger.read_text().splitlines()) == 2
    # Cut short: one run lost. The next invocation runs it alone and reports all of them.
    lines = ledger.read_text().splitlines()
    ledger.write_text(lines[0] + "\n")
    second, err = _soak(false_alarms, monkeypatch, capsys, "--ledger", str(ledger))
    assert "1 runs of this code" in err and err.count("node-days in") == 1
    assert second["healthy_runs"] == 2 and second["node_days"] == first["node_days"]
    assert second["code"] == first["code"] and len(ledger.read_text().splitlines()) == 2
    # Runs of other code never count: a changed detector starts the soak over.
    ledger.write_text("\n".join(line.replace(first["code"], "0" * 16) for line in ledger.read_text().splitlines()))
    third, err = _soak(false_alarms, monkeypatch, capsys, "--ledger", str(ledger))
    assert "0 runs of this code" in err and "2 lines of other code" in err and err.count("node-days in") == 2
    assert third["healthy_runs"] == 2


def test_a_broken_ledger_line_is_named(false_alarms, monkeypatch, capsys, tmp_path) -> None:
    ledger = tmp_path / "soak.jsonl"
    ledger.write_text('{"run": "x"}\n')
    with pytest.raises(SystemExit, match=r"soak.jsonl:1: not a ledger line"):
        _soak(false_alarms, monkeypatch, capsys, "--ledger", str(ledger))
