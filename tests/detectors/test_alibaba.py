"""Real step times from Alibaba PAI (tests/fixtures/alibaba) through the straggler detectors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetwatch.detectors import detector_ids
from fleetwatch.detectors.replay import replay
from fleetwatch.detectors.straggler_steps import StragglerStepsDetector
from fleetwatch.detectors.straggler_telemetry import StragglerTelemetryDetector
from fleetwatch.records import Step
from tests.detectors.alibaba_traces import steps_from_alibaba_csv

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "alibaba"
T0 = 1_700_000_000.0


def load(job_number: int) -> list[Step]:
    with open(FIXTURES / f"job_{job_number}_norm.csv", encoding="utf-8") as lines:
        return steps_from_alibaba_csv(lines, f"j{job_number}")


def t_of(steps: list[Step], iteration: int) -> float:
    return next(s.t for s in steps if s.step == iteration)


def straggler_findings(steps: list[Step]):
    return replay(steps, [StragglerStepsDetector(), StragglerTelemetryDetector()])


# --- the converter -------------------------------------------------------------------------------


def test_rows_become_step_reports_of_a_synchronous_job():
    steps = load(2)
    assert len(steps) == 2401  # one per row
    first = steps[:10]
    # Iteration 1: worker -> rank, its own node, GPU 0; normalised 691 -> 0.691 s; the job
    # finishes the iteration when its slowest worker does (910 -> 0.910 s).
    assert first[0] == Step(t=T0 + 0.91, job="j2", rank=0, node="w00", step=1, seconds=0.691, gpu=0)
    assert [s.rank for s in first] == list(range(10))
    assert [s.node for s in first] == [f"w{w:02d}" for w in range(10)]
    assert {s.t for s in first} == {T0 + 0.91}
    # Iteration 11: 10 more iterations at the slowest worker's 933 -> 9.33 s later.
    assert [s.t for s in steps[10:20]] == [pytest.approx(T0 + 0.91 + 9.33)] * 10
    assert [s.t for s in steps] == sorted(s.t for s in steps)


def test_options_scale_time_and_fix_the_interval():
    text = ",worker,gpu,time,batch_time_norm\n0,0,20,1,500\n1,1,20,1,1000\n2,0,20,11,400\n"
    steps = steps_from_alibaba_csv(io.StringIO(text), "x", seconds_per_unit=0.002, start=100.0)
    assert [(s.t, s.rank, s.step, s.seconds) for s in steps] == [
        (102.0, 0, 1, 1.0),
        (102.0, 1, 1, 2.0),
        (102.0 + 10 * 0.8, 0, 11, 0.8),
    ]
    fixed = steps_from_alibaba_csv(io.StringIO(text), "x", start=0.0, step_interval_seconds=0.5)
    assert [s.t for s in fixed] == [0.5, 0.5, 5.5]


def test_job_3_worker_0_joins_at_iteration_11():
    steps = load(3)
    assert {s.rank for s in steps if s.step == 1} == set(range(1, 10))
    assert min(s.step for s in steps if s.rank == 0) == 11


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worker,time\n0,1\n", "missing column"),
        (",worker,gpu,time,batch_time_norm\n0,0,20,one,500\n", "line 2"),
        (",worker,gpu,time,batch_time_norm\n0,0,20,1,-5\n", "line 2"),
    ],
)
def test_bad_input_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        steps_from_alibaba_csv(io.StringIO(text), "x")


# --- the replays ---------------------------------------------------------------------------------


def test_job_2_steady_offsets_give_no_straggler_finding():
    # Worker 5 runs at ~0.80 of the fastest workers' pace from the first iteration to the last
    # (906 vs ~747): a steady offset, not an episode.
    assert straggler_findings(load(2)) == []


def assert_job_3_late_slowdown(findings, steps):
    """Workers 6 and 7 slow from iteration ~2131-2141, 8 and 9 from ~2181-2191: one episode each,
    opening in the last ~15% of the trace; workers 0-5 (0 and 1 steadily ~10% slower) never."""
    assert sorted(f["rank"] for f in findings) == [6, 7, 8, 9]
    for f in findings:
        assert f["detector"] == "straggler.steps" and f["job"] == "j3"
        assert (f["node"], f["gpu"]) == (f"w{f['rank']:02d}", 0)
        assert t_of(steps, 2121) <= f["start"] <= t_of(steps, 2241), f
        assert f["start"] - T0 >= 0.8 * (steps[-1].t - T0)
        assert 0.7 < f["evidence"]["score"] < 0.85
        assert f["evidence"]["baseline_score"] > f["evidence"]["score"] * 1.1
        assert f"rank {f['rank']} of job j3 (GPU 0 on w0{f['rank']}) runs at 0." in f["summary"]


def test_job_3_late_slowdown_of_several_workers_is_found():
    steps = load(3)
    findings = straggler_findings(steps)
    assert_job_3_late_slowdown([f.to_dict() for f in findings], steps)
    by_rank = {f.rank: f for f in findings}
    assert by_rank[6].start < by_rank[8].start and by_rank[7].start < by_rank[9].start


# --- through fleetwatchctl -----------------------------------------------------------------------


def write_replay(steps: list[Step], path: Path) -> Path:
    """DESIGN.md replay records, one JSON object a line."""
    with open(path, "w", encoding="utf-8") as out:
        for s in steps:
            record = {
                "t": s.t,
                "kind": "step",
                "job": s.job,
                "rank": s.rank,
                "node": s.node,
                "step": s.step,
                "seconds": s.seconds,
                "gpu": s.gpu,
            }
            out.write(json.dumps(record) + "\n")
    return path


def fleetwatchctl_detect(path: Path) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", "detect", "--replay", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    findings = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    # Every registered detector runs; on step records only the straggler detectors may speak
    # (node_silent must not read the gaps between steps as a silent node).
    assert all(f["detector"].startswith("straggler.") for f in findings), {f["detector"] for f in findings}
    return findings


def test_the_straggler_detectors_are_registered():
    assert {"straggler.steps", "straggler.telemetry"} <= set(detector_ids())


def test_fleetwatchctl_replay_of_job_2_reports_no_straggler(tmp_path):
    assert fleetwatchctl_detect(write_replay(load(2), tmp_path / "job2.jsonl")) == []


def test_fleetwatchctl_replay_of_job_3_reports_the_late_stragglers(tmp_path):
    steps = load(3)
    findings = fleetwatchctl_detect(write_replay(steps, tmp_path / "job3.jsonl"))
    assert_job_3_late_slowdown(findings, steps)
