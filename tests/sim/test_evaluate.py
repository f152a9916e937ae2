"""The corpus evaluator: scoring rules (tests/scenarios/README.md), scenario validation, the report."""

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest

from fleetwatch.ctl.main import main
from fleetwatch.detectors.replay import Episode, replay_episodes
from fleetwatch.detectors.xid import XidDetector
from fleetwatch.records import Event, Finding, GpuSample
from fleetwatch.sim.evaluate import (
    Expectation,
    ScenarioError,
    evaluate_corpus,
    evaluate_scenario,
    load_scenario,
    percentile,
    score,
    summarize,
)

START = 1_700_000_000.0

REPORT_KEYS = {
    "precision",
    "recall",
    "false_alarms_per_1000_node_days",
    "latency_p50_s",
    "latency_p95_s",
    "per_detector",
    "scenarios",
    "node_days",
    "healthy_false_alarm_rate_per_1000_node_days",
    "failures",
    "matches",
}
PER_DETECTOR_KEYS = {
    "precision",
    "recall",
    "true_positives",
    "false_positives",
    "false_negatives",
    "latency_p50_s",
    "latency_p95_s",
}
FAILURE_KEYS = {"scenario", "kind", "detector", "node", "gpu", "rank", "detail"}


def episode(detector="xid", node="n01", gpu=3, opened=100.0, rank=None, job=None, start=None):
    finding = Finding(
        detector=detector,
        severity="critical",
        action="reboot",
        summary=f"{detector} finding",
        start=START + (opened if start is None else start),
        node=node,
        gpu=gpu,
        job=job,
        rank=rank,
    )
    return Episode(finding, START + opened)


def expect(detector="xid", node="n01", gpu=3, after=100.0, within=2.0, rank=None, job=None):
    return Expectation(detector, node, after, within, gpu=gpu, job=job, rank=rank)


# --- scoring -------------------------------------------------------------------------------------


def test_a_finding_opened_in_the_window_matches_with_its_latency():
    matches, misses, false_alarms = score([expect(after=100, within=2)], [episode(opened=101.5)], START)
    assert misses == [] and false_alarms == []
    (match,) = matches
    assert match.latency_seconds == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("opened", "matched"),
    [(100.0, True), (102.0, True), (99.99, False), (102.01, False)],
)
def test_window_edges_are_inclusive(opened, matched):
    matches, misses, false_alarms = score([expect(after=100, within=2)], [episode(opened=opened)], START)
    assert bool(matches) is matched
    assert len(misses) == len(false_alarms) == (0 if matched else 1)


def test_the_open_time_is_what_counts_not_the_findings_start():
    # The detector dates the condition back to its first hot sample; the alert opened later.
    late = episode(opened=140.0, start=100.0)
    matches, misses, _ = score([expect(after=100, within=30)], [late], START)
    assert matches == [] and len(misses) == 1
    early_start = episode(opened=101.0, start=95.0)
    (match,), _, _ = score([expect(after=100, within=30)], [early_start], START)
    assert match.latency_seconds == pytest.approx(1.0)


@pytest.mark.parametrize(
    "other",
    [
        episode(detector="ecc"),
        episode(node="n02"),
        episode(gpu=4),
    ],
)
def test_detector_node_and_gpu_must_agree(other):
    matches, misses, false_alarms = score([expect()], [other], START)
    assert matches == [] and misses == [expect()] and false_alarms == [other]


def test_gpu_rank_and_job_are_only_checked_when_given():
    node_level = expect(detector="infiniband", gpu=None)
    (match,), _, _ = score([node_level], [episode(detector="infiniband", gpu=None)], START)
    assert match.expectation == node_level
    straggler = expect(detector="straggler.steps", gpu=None, rank=11, job="j1", within=30)
    right = episode(detector="straggler.steps", gpu=None, rank=11, job="j1", opened=120)
    wrong_rank = episode(detector="straggler.steps", gpu=None, rank=10, job="j1", opened=110)
    wrong_job = episode(detector="straggler.steps", gpu=None, rank=11, job="j2", opened=110)
    matches, misses, false_alarms = score([straggler], [wrong_rank, wrong_job, right], START)
    assert [m.episode for m in matches] == [right]
    assert misses == [] and false_alarms == [wrong_rank, wrong_job]


def test_each_finding_and_each_expectation_match_once():
    one = expect()
    # Two findings, one expectation: the earlier one matches, the other is a false alarm.
    first, second = episode(opened=100.5), episode(opened=101.0)
    matches, misses, false_alarms = score([one], [second, first], START)
    assert [m.episode for m in matches] == [first] and false_alarms == [second] and misses == []
    # Two expectations, one finding: one is missed.
    matches, misses, false_alarms = score([one, one], [first], START)
    assert len(matches) == 1 and len(misses) == 1 and false_alarms == []


def test_an_optional_expectation_allows_one_finding_and_requires_none():
    borderline = dataclasses.replace(expect(after=100, within=30), optional=True)
    # None: no miss.
    assert score([borderline], [], START) == ([], [], [])
    # One: no false alarm, and no hit either in the report.
    first, second = episode(opened=110), episode(opened=120)
    matches, misses, false_alarms = score([borderline], [first], START)
    assert [m.episode for m in matches] == [first] and misses == [] and false_alarms == []
    report = summarize([_result("borderline", False, matches)])
    assert report["per_detector"] == {} and report["matches"] == [] and report["recall"] == 1.0
    # Two: the second is a false alarm.
    matches, misses, false_alarms = score([borderline], [first, second], START)
    assert false_alarms == [second]


def test_matching_is_maximal_not_greedy():
    # The first expectation could take either finding; taking the early one would starve the
    # second expectation, whose window only holds the early one.
    wide = expect(after=100, within=30)
    narrow = expect(after=100, within=2)
    early, late = episode(opened=101), episode(opened=120)
    matches, misses, false_alarms = score([wide, narrow], [early, late], START)
    assert misses == [] and false_alarms == []
    pairs = sorted((m.expectation.within_seconds, m.episode.opened_at) for m in matches)
    assert pairs == [(2.0, early.opened_at), (30.0, late.opened_at)]


def test_no_expectations_makes_every_finding_a_false_alarm():
    alarm = episode()
    assert score([], [alarm], START) == ([], [], [alarm])
    assert score([], [], START) == ([], [], [])


def test_percentiles_interpolate_and_are_none_without_values():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


# --- replay episodes -----------------------------------------------------------------------------


def test_replay_episodes_say_when_the_engine_opened_each_finding():
    records = [GpuSample(START + i, "n01", 0, {"gpu_util_percent": 99}) for i in range(10)]
    records.append(Event(START + 4.4, "n01", "xid", gpu=0, xid=79))
    (ep,) = replay_episodes(records, [XidDetector()])
    assert ep.finding.detector == "xid" and ep.opened_at == START + 4.4  # events evaluate at once


# --- the report ----------------------------------------------------------------------------------


def _result(name, healthy, matches=(), misses=(), false_alarms=(), node_days=1.0):
    from fleetwatch.sim.evaluate import ScenarioResult

    return ScenarioResult(
        scenario=name,
        title=name,
        healthy=healthy,
        node_days=node_days,
        start=START,
        matches=list(matches),
        misses=list(misses),
        false_alarms=list(false_alarms),
    )


def test_report_shape_and_numbers():
    e1, e2 = expect(after=100), expect(detector="thermal", after=200, within=30)
    m1, _, _ = score([e1], [episode(opened=101)], START)
    m2, _, _ = score([e2], [episode(detector="thermal", opened=210)], START)
    missed = expect(detector="ecc", after=50)
    alarm = episode(detector="power", node="n02", gpu=1, opened=70)
    report = summarize(
        [
            _result("faulty", False, m1 + m2, [missed], node_days=0.5),
            _result("quiet", True, false_alarms=[alarm], node_days=0.25),
        ]
    )
    assert set(report) == REPORT_KEYS
    assert json.loads(json.dumps(report)) == report
    assert report["scenarios"] == 2
    assert report["node_days"] == pytest.approx(0.75)
    assert report["precision"] == pytest.approx(2 / 3)
    assert report["recall"] == pytest.approx(2 / 3)
    assert report["false_alarms_per_1000_node_days"] == pytest.approx(1000 / 0.75)
    assert report["healthy_false_alarm_rate_per_1000_node_days"] == pytest.approx(1000 / 0.25)
    assert report["latency_p50_s"] == pytest.approx(5.5)
    assert [(m["scenario"], m["detector"], m["node"], m["latency_s"]) for m in report["matches"]] == [
        ("faulty", "xid", "n01", 1.0),
        ("faulty", "thermal", "n01", 10.0),
    ]
    assert set(report["per_detector"]) == {"xid", "thermal", "ecc", "power"}
    for stats in report["per_detector"].values():
        assert set(stats) == PER_DETECTOR_KEYS
    assert report["per_detector"]["xid"] == {
        "precision": 1.0,
        "recall": 1.0,
        "true_positives": 1,
        "false_positives": 0,
        "false_negatives": 0,
        "latency_p50_s": 1.0,
        "latency_p95_s": 1.0,
    }
    ecc, power = report["per_detector"]["ecc"], report["per_detector"]["power"]
    assert (ecc["precision"], ecc["recall"], ecc["false_negatives"]) == (1.0, 0.0, 1)
    assert (power["precision"], power["recall"], power["false_positives"]) == (0.0, 1.0, 1)
    assert ecc["latency_p50_s"] is None
    miss, false_alarm = report["failures"]
    assert set(miss) == set(false_alarm) == FAILURE_KEYS
    assert (miss["scenario"], miss["kind"], miss["detector"], miss["node"], miss["gpu"]) == (
        "faulty",
        "miss",
        "ecc",
        "n01",
        3,
    )
    assert (false_alarm["scenario"], false_alarm["kind"], false_alarm["detector"]) == (
        "quiet",
        "false_alarm",
        "power",
    )
    assert false_alarm["node"] == "n02" and false_alarm["gpu"] == 1
    assert "70.0 s" in false_alarm["detail"]


def test_precision_and_recall_are_one_when_there_is_nothing_to_count():
    report = summarize([_result("quiet", True)])
    assert (report["precision"], report["recall"]) == (1.0, 1.0)
    assert report["per_detector"] == {} and report["failures"] == []
    assert report["latency_p50_s"] is None


# --- scenario files ------------------------------------------------------------------------------

GOOD = """
name = "XID 79 on n02 GPU 3"
healthy = false
duration_seconds = 60
sample_interval_seconds = 1.0
seed = 1

[fleet]
nodes = 2
gpus_per_node = 4
model = "H100"

[[jobs]]
id = "j1"
nodes = ["n01", "n02"]
step_seconds = 0.9
report_steps = true

[[faults]]
kind = "xid"
node = "n02"
gpu = 3
at_seconds = 20
xid = 79

[[expect]]
detector = "xid"
node = "n02"
gpu = 3
after_seconds = 20
within_seconds = 2
"""

HEALTHY = """
name = "quiet"
healthy = true
duration_seconds = 60
[fleet]
nodes = 2
gpus_per_node = 4
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_scenario_reads_a_good_file(tmp_path):
    scenario = load_scenario(write(tmp_path, GOOD))
    assert scenario["fleet"]["nodes"] == 2 and scenario["expect"][0]["detector"] == "xid"
    assert load_scenario(write(tmp_path, HEALTHY, "h.toml"))["healthy"] is True


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        (lambda s: s.replace("seed = 1", "seeds = 1"), "seeds", "unknown key"),
        (lambda s: s.replace('model = "H100"', 'modle = "H100"'), "fleet.modle", "unknown key"),
        (lambda s: s.replace("duration_seconds = 60", ""), "duration_seconds", "missing"),
        (lambda s: s.replace("within_seconds = 2", "within_seconds = -2"), "expect[0].within_seconds", "positive"),
        (lambda s: s.replace("within_seconds = 2", "within = 2"), "expect[0].within", "unknown key"),
        (
            lambda s: s.replace('node = "n02"\ngpu = 3\nafter', 'node = "n07"\ngpu = 3\nafter'),
            "expect[0].node",
            "unknown node",
        ),
        (lambda s: s.replace("gpu = 3\nafter", "gpu = 4\nafter"), "expect[0].gpu", "must be < 4"),
        (lambda s: s.replace("after_seconds = 20", "after_seconds = 600"), "expect[0].after_seconds", "<= 60"),
        (lambda s: s.replace("at_seconds = 20", 'at_seconds = "20"'), "faults[0].at_seconds", "number"),
        (lambda s: s.replace('kind = "xid"', ""), "faults[0].kind", "missing"),
        (lambda s: s.replace('nodes = ["n01", "n02"]', 'nodes = ["n01", "n09"]'), "jobs[0].nodes[1]", "unknown node"),
        (lambda s: s.replace("report_steps = true", "pipeline_stages = 0"), "jobs[0].pipeline_stages", ">= 1"),
        (lambda s: s.replace("report_steps = true", 'tensor_parallel = "2"'), "jobs[0].tensor_parallel", "integer"),
        (
            lambda s: s.replace("report_steps = true", 'report_coordinates = "yes"'),
            "jobs[0].report_coordinates",
            "true or false",
        ),
        (lambda s: s.replace("healthy = false", "healthy = true"), "expect", "healthy scenario"),
        (lambda s: s.replace("healthy = false", 'healthy = "no"'), "healthy", "true or false"),
        (lambda s: s.split("[[expect]]")[0], "expect", "at least one"),
        (lambda s: s.replace("[fleet]", "[flet]"), "flet", "unknown key"),
    ],
)
def test_load_scenario_errors_name_the_file_and_the_key(tmp_path, change, key, reason):
    path = write(tmp_path, change(GOOD))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert reason in message
    assert info.value.key == key


def test_load_scenario_reports_bad_toml_and_missing_files(tmp_path):
    path = write(tmp_path, "name = \n")
    with pytest.raises(ScenarioError, match=f"^{path}: not valid TOML"):
        load_scenario(path)
    with pytest.raises(ScenarioError, match="No such file"):
        load_scenario(tmp_path / "absent.toml")


# --- evaluate_scenario / corpus / ctl with a stand-in simulator ----------------------------------


class FakeFleet:
    """Stands in for fleetwatch.sim.fleet.SimFleet: 1 Hz samples on every GPU, XIDs from the faults."""

    def __init__(self, scenario):
        self.scenario = scenario
        self.start = START

    @classmethod
    def from_scenario(cls, scenario):
        return cls(scenario)

    def records(self):
        s = self.scenario
        nodes = [f"n{i:02d}" for i in range(1, s["fleet"]["nodes"] + 1)]
        xids = sorted((self.start + f["at_seconds"], f) for f in s.get("faults", []) if f["kind"] == "xid")
        for i in range(int(s["duration_seconds"])):
            t = self.start + i
            while xids and xids[0][0] <= t:
                at, f = xids.pop(0)
                yield Event(at, f["node"], "xid", gpu=f["gpu"], xid=f["xid"])
            for node in nodes:
                for gpu in range(s["fleet"].get("gpus_per_node", 8)):
                    yield GpuSample(t, node, gpu, {"gpu_util_percent": 98})

    def batches(self):
        """What evaluate_scenario replays (SimFleet's records with GPU samples in bulk)."""
        return self.records()


@pytest.fixture
def fake_sim(monkeypatch):
    module = types.ModuleType("fleetwatch.sim.fleet")
    module.SimFleet = FakeFleet
    monkeypatch.setitem(sys.modules, "fleetwatch.sim.fleet", module)
    return module


def test_evaluate_scenario_runs_the_detectors_over_the_simulated_records(tmp_path, fake_sim):
    scenario = load_scenario(write(tmp_path, GOOD))
    result = evaluate_scenario(scenario, [XidDetector()], name="xid79")
    assert result.misses == [] and result.false_alarms == []
    (match,) = result.matches
    assert match.latency_seconds == 0.0 and match.episode.finding.evidence["xid"] == 79
    assert result.scenario == "xid79" and result.node_days == pytest.approx(2 * 60 / 86400)


def test_a_scenario_the_simulator_rejects_is_an_error_naming_the_file(tmp_path, fake_sim):
    class Rejecting(FakeFleet):
        @classmethod
        def from_scenario(cls, scenario):
            raise ValueError("faults[0].kind: unknown fault kind 'xid'")

    fake_sim.SimFleet = Rejecting
    path = write(tmp_path, GOOD)
    with pytest.raises(ScenarioError) as info:
        evaluate_scenario(load_scenario(path), [XidDetector()], path=path)
    assert str(info.value) == f"{path}: the simulator rejects it: faults[0].kind: unknown fault kind 'xid'"


def test_a_scenario_that_crashes_the_simulator_is_an_error_not_a_quiet_pass(tmp_path, fake_sim):
    class Crashing(FakeFleet):
        def records(self):
            yield from ()
            raise KeyError("n09")

    fake_sim.SimFleet = Crashing
    path = write(tmp_path, HEALTHY)
    with pytest.raises(ScenarioError, match="simulating it failed: KeyError"):
        evaluate_scenario(load_scenario(path), [XidDetector()], path=path)


def test_scenario_errors_cross_process_boundaries():
    import pickle

    error = pickle.loads(pickle.dumps(ScenarioError("a.toml", "expect[0].node", "unknown node")))
    assert (str(error), error.key) == ("a.toml: expect[0].node: unknown node", "expect[0].node")


def test_late_and_early_findings_are_reported_as_failures(tmp_path, fake_sim):
    late = GOOD.replace("after_seconds = 20", "after_seconds = 10").replace("within_seconds = 2", "within_seconds = 5")
    report = summarize([evaluate_scenario(load_scenario(write(tmp_path, late)), [XidDetector()], name="late")])
    assert (report["precision"], report["recall"]) == (0.0, 0.0)
    kinds = sorted(f["kind"] for f in report["failures"])
    assert kinds == ["false_alarm", "miss"]
    miss = next(f for f in report["failures"] if f["kind"] == "miss")
    assert "[10, 15] s" in miss["detail"] and "opened at 20.0 s" in miss["detail"]


def test_evaluate_corpus_and_ctl_eval(tmp_path, fake_sim, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus, GOOD, "xid79.toml")
    write(corpus, HEALTHY, "quiet.toml")
    report = evaluate_corpus(corpus, jobs=1)
    assert set(report) == REPORT_KEYS
    assert report["scenarios"] == 2 and report["failures"] == []
    assert (report["precision"], report["recall"]) == (1.0, 1.0)
    assert report["per_detector"]["xid"]["true_positives"] == 1

    assert main(["eval", "--corpus", str(corpus), "--json", "--jobs", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # The command adds its speed: the node-days it simulated over the seconds it took.
    wall_seconds, rate = printed.pop("wall_seconds"), printed.pop("node_days_per_hour")
    assert printed == report
    assert rate > 0 and report["node_days"] / rate * 3600 == pytest.approx(wall_seconds, abs=0.006)

    assert main(["eval", "--corpus", str(corpus), "--jobs", "1", "--scenario", "quiet"]) == 0
    table = capsys.readouterr().out
    assert "1 scenarios" in table and "PRECISION" in table
    assert "simulated node-days an hour" in table.splitlines()[-1]

    assert main(["eval", "--corpus", str(corpus), "--scenario", "nope"]) == 1
    assert "no scenario 'nope'" in capsys.readouterr().err


def test_ctl_eval_names_a_bad_scenario_file(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    bad = write(corpus, GOOD.replace("seed = 1", "sead = 1"), "bad.toml")
    assert main(["eval", "--corpus", str(corpus), "--json"]) == 1
    assert f"{bad}: sead: unknown key" in capsys.readouterr().err


def test_ctl_eval_help():
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", "eval", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--corpus" in proc.stdout and "--jobs" in proc.stdout


def test_parallel_evaluation_gives_the_same_report(tmp_path, fake_sim):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, at in enumerate((20, 22, 25)):
        write(corpus, GOOD.replace("at_seconds = 20", f"at_seconds = {at}"), f"s{i}.toml")
    write(corpus, HEALTHY, "quiet.toml")
    serial = evaluate_corpus(corpus, jobs=1)
    assert evaluate_corpus(corpus, jobs=2) == serial
    assert serial["scenarios"] == 4 and serial["recall"] == 2 / 3  # s2: the XID is late for its window
