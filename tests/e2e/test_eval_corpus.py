"""The labelled fault corpus, end to end: `fleetwatchctl eval` over tests/scenarios meets the targets.

Targets (the issue): precision and recall of at least 0.99 overall and for every detector; event
findings (XID, ECC double-bit, GPU lost) open within 2 s of the fault, stragglers within 10 of the
straggler's steps (30 s for jobs stepping faster than every 3 s or so); at least 40 scenarios, at least a third of them healthy. On failure the assertion message lists
the report's `failures` (scenario, miss or false alarm, detector, where, what happened) so a
developer can rerun one with `fleetwatchctl eval --corpus tests/scenarios --scenario NAME`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "scenarios"

MIN_SCENARIOS = 40
MIN_PRECISION = 0.99
MIN_RECALL = 0.99
EVENT_LATENCY_SECONDS = 2.0
STRAGGLER_LATENCY_SECONDS = 30.0
MAX_WINDOW_SECONDS = 60.0
STRAGGLER_DETECTORS = ("straggler.steps", "straggler.stage", "straggler.telemetry")
# Every detector the corpus must exercise, each in at least two faulty scenarios.
COVERED_DETECTORS = (
    "xid",
    "ecc",
    "row_remap",
    "pcie",
    "nvlink",
    "thermal",
    "power",
    "clocks",
    "gpu_lost",
    "node_silent",
    "infiniband",
    "straggler.steps",
    "straggler.stage",
    "straggler.telemetry",
)


def _scenarios() -> dict[str, dict]:
    return {p.stem: tomllib.loads(p.read_text()) for p in sorted(CORPUS.glob("*.toml"))}


def _straggler_latency_bound(scenario: dict, e: dict) -> float:
    """Seconds a straggler expectation may take: 10 of the straggler's steps, plus the step in
    progress at its onset (issue 10: "opened within 10 steps"), and never under 30 s (a job
    stepping every 0.2 s is judged per step too; the bound is for slow steppers' sake)."""
    jobs = scenario.get("jobs", [])
    job = next((j for j in jobs if j["id"] == e.get("job")), None)
    if job is None:
        job = next((j for j in jobs if e.get("node") in j["nodes"]), None)
    if job is None:
        return STRAGGLER_LATENCY_SECONDS
    step = float(job["step_seconds"])
    factor = max(job.get("stage_factors", [1.0]))
    for fault in scenario.get("faults", []):
        if (
            fault["kind"] == "slow_rank"
            and fault["at_seconds"] == e["after_seconds"]
            and fault["node"] == e.get("node")
        ):
            factor *= float(fault.get("factor", 1.0))
    return max(STRAGGLER_LATENCY_SECONDS, 10 * step * factor + step)


MAX_FAILURES_SHOWN = 60


def _failures_text(report: dict) -> str:
    """Counts by detector and kind, then each failure (the first MAX_FAILURES_SHOWN)."""
    failures = report["failures"]
    counts = Counter((f["detector"], f["kind"]) for f in failures)
    lines = [f"{len(failures)} failures: " + ", ".join(f"{d} {k} x{n}" for (d, k), n in sorted(counts.items()))]
    for f in failures[:MAX_FAILURES_SHOWN]:
        where = f"{f['node']} gpu {f['gpu']} rank {f['rank']}"
        lines.append(f"  {f['scenario']}: {f['kind']} {f['detector']} on {where}: {f['detail']}")
    if len(failures) > MAX_FAILURES_SHOWN:
        lines.append(
            f"  ... and {len(failures) - MAX_FAILURES_SHOWN} more: "
            "fleetwatchctl eval --corpus tests/scenarios [--scenario NAME] lists them all"
        )
    return "\n".join(lines)


# --- the corpus itself (no simulation needed) ----------------------------------------------------


def test_corpus_size_and_healthy_share():
    scenarios = _scenarios()
    healthy = [name for name, s in scenarios.items() if s.get("healthy")]
    assert len(scenarios) >= MIN_SCENARIOS, f"{len(scenarios)} scenarios"
    assert 3 * len(healthy) >= len(scenarios), f"{len(healthy)} of {len(scenarios)} healthy"
    for name in healthy:
        assert not scenarios[name].get("expect") and not scenarios[name].get("faults"), name


def test_corpus_files_are_valid():
    from fleetwatch.sim.evaluate import load_scenario

    for path in sorted(CORPUS.glob("*.toml")):
        load_scenario(path)  # raises naming the file and the key


def test_every_detector_is_exercised_by_two_faulty_scenarios():
    counts: Counter[str] = Counter()
    models: dict[str, set[str]] = {}
    for scenario in _scenarios().values():
        detectors = {e["detector"] for e in scenario.get("expect", [])}
        counts.update(detectors)
        for detector in detectors:
            models.setdefault(detector, set()).add(scenario["fleet"].get("model", "H100"))
    thin = {d: counts[d] for d in COVERED_DETECTORS if counts[d] < 2}
    assert not thin, f"detectors with fewer than two faulty scenarios: {thin}"
    one_model = {d: sorted(models[d]) for d in COVERED_DETECTORS if len(models[d]) < 2}
    assert not one_model, f"detectors exercised on one GPU model only: {one_model}"


def _event_expectations(scenario: dict) -> list[dict]:
    """The expectations for event findings: every XID, and the ECC / GPU-lost findings of
    double-bit ECC and GPU-lost faults (a GPU that merely vanishes from NVML is no event)."""
    events = {"ecc_dbe": "ecc", "gpu_lost": "gpu_lost"}
    picked = []
    for e in scenario.get("expect", []):
        if e["detector"] == "xid":
            picked.append(e)
            continue
        for f in scenario.get("faults", []):
            if events.get(f["kind"]) == e["detector"] and (f["node"], f.get("gpu")) == (e["node"], e.get("gpu")):
                picked.append(e)
                break
    return picked


def test_expectation_windows_encode_the_latency_targets():
    """A finding matches only when it opens within `within_seconds` of the fault, so these bounds
    make recall imply the latency targets for every event finding, whichever detector reports it
    (the report's latencies are per detector, and gpu_lost also covers vanished GPUs)."""
    for name, scenario in _scenarios().items():
        events = _event_expectations(scenario)
        for e in scenario.get("expect", []):
            what = f"{name}: {e['detector']} on {e.get('node') or 'job ' + e['job']} gpu {e.get('gpu')}"
            if e in events:
                assert e["within_seconds"] <= EVENT_LATENCY_SECONDS, what
            elif e.get("optional"):
                continue  # a borderline rank: may open at any time, or never
            elif e["detector"] in STRAGGLER_DETECTORS:
                assert e["within_seconds"] <= _straggler_latency_bound(scenario, e), what
            else:
                assert e["within_seconds"] <= MAX_WINDOW_SECONDS, what
        for fault in scenario.get("faults", []):
            if fault["kind"] in ("ecc_dbe", "gpu_lost", "xid"):
                assert any((e["node"], e.get("gpu")) == (fault["node"], fault.get("gpu")) for e in events), (
                    f"{name}: no event expectation for the {fault['kind']} fault"
                )


# --- the evaluation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", "eval", "--corpus", str(CORPUS), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_eval_covers_the_corpus(report):
    assert report["scenarios"] == len(_scenarios()) >= MIN_SCENARIOS
    assert report["node_days"] > 0


def test_overall_precision_and_recall(report):
    summary = f"precision {report['precision']:.3f}, recall {report['recall']:.3f}\n"
    assert report["precision"] >= MIN_PRECISION, summary + _failures_text(report)
    assert report["recall"] >= MIN_RECALL, summary + _failures_text(report)


def test_per_detector_precision_and_recall(report):
    weak = {
        detector: (round(d["precision"], 3), round(d["recall"], 3))
        for detector, d in report["per_detector"].items()
        if d["precision"] < MIN_PRECISION or d["recall"] < MIN_RECALL
    }
    missing = [d for d in COVERED_DETECTORS if d not in report["per_detector"]]
    assert not weak and not missing, (
        f"below target (precision, recall): {weak}; never scored: {missing}\n" + _failures_text(report)
    )


def test_healthy_scenarios_raise_no_alarms(report):
    assert report["healthy_false_alarm_rate_per_1000_node_days"] == 0.0, _failures_text(report)


def test_event_and_straggler_latencies(report):
    """XID findings are events only: their p95 must be under 2 s. Double-bit ECC and GPU-lost
    events are held to 2 s by their expectation windows (see above); each straggler to 10 of its
    steps (30 s at least) here."""
    per = report["per_detector"]
    slow = {}
    for detector in ("xid",):
        p95 = per.get(detector, {}).get("latency_p95_s")
        if p95 is None or p95 >= EVENT_LATENCY_SECONDS:
            slow[detector] = p95
    scenarios = _scenarios()
    for m in report["matches"]:
        if m["detector"] not in STRAGGLER_DETECTORS:
            continue
        scenario = scenarios[m["scenario"]]
        (e,) = [
            e
            for e in scenario["expect"]
            if e["detector"] == m["detector"] and e.get("node") == m["node"] and e.get("rank") == m["rank"]
        ][:1]
        bound = _straggler_latency_bound(scenario, e)
        if m["latency_s"] > bound:
            slow[f"{m['scenario']} {m['detector']} rank {m['rank']}"] = (m["latency_s"], bound)
    for detector in STRAGGLER_DETECTORS:
        if per.get(detector, {}).get("latency_p95_s") is None:
            slow[detector] = None
    assert not slow, f"latency (s) over target or never measured: {slow}\n" + _failures_text(report)
