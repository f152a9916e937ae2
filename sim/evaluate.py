"""Scores the detectors against the labelled fault corpus (tests/scenarios/README.md).

Each scenario file describes a simulated fleet, its workload, injected faults and the findings a
correct detector set must open (`expect`). The simulator (fleetwatch.sim.fleet.SimFleet) turns the
scenario into replay records (SimFleet.batches(): GPU samples as rows, computed in bulk),
`detectors.replay.replay_episodes` runs the detectors over them as the collector would live, and
the episodes are matched against the expectations:

- a finding matches an expectation with the same detector and node, the same gpu / job / rank
  where the expectation gives them, that opened (the data time the engine first reported it) in
  `[start + after_seconds, start + after_seconds + within_seconds]`, `start` being the simulated
  fleet's start time;
- each finding and each expectation match at most once (a maximum matching, so one expectation
  cannot steal the only finding another needed);
- unmatched findings are false alarms, unmatched expectations misses; latency is the open time
  minus `start + after_seconds`.
"""

from __future__ import annotations

import math
import os
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetwatch.detectors.model import Detector
from fleetwatch.detectors.replay import Episode, replay_episodes, unfolded
from fleetwatch.records import Finding
from fleetwatch.sim.scenario import node_names

SECONDS_PER_DAY = 86400.0
# Open times are data times on a grid (start + k * interval): float noise must not move a finding
# out of a window whose edge it sits on.
_EDGE_TOLERANCE_SECONDS = 1e-6


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the key."""

    def __init__(self, path: str | os.PathLike[str], key: str | None, reason: str) -> None:
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + reason)
        self.path = str(path)
        self.key = key
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (--jobs)
        return (ScenarioError, (self.path, self.key, self.reason))


# --- loading and validation ----------------------------------------------------------------------

_TOP_KEYS = frozenset(
    {
        "name",
        "description",
        "healthy",
        "duration_seconds",
        "sample_interval_seconds",
        "seed",
        "fleet",
        "jobs",
        "faults",
        "noise",
        "expect",
    }
)
_FLEET_KEYS = frozenset({"nodes", "gpus_per_node", "model", "ib_ports_per_node"})
_JOB_KEYS = frozenset(
    {
        "id",
        "nodes",
        "step_seconds",
        "report_steps",
        "start_seconds",
        "end_seconds",
        # Hybrid parallelism (fleetwatch.sim.fleet checks how they fit the job's ranks).
        "pipeline_stages",
        "tensor_parallel",
        "stage_factors",
        "report_coordinates",
        "report_wall_seconds",
    }
)
# Fault parameters the simulator's kinds take (fleetwatch.sim.scenario.Fault plus the fleet-level
# ones); the simulator itself judges which apply to which kind.
_FAULT_KEYS = frozenset(
    {
        "kind",
        "node",
        "gpu",
        "at_seconds",
        "duration_seconds",
        "xid",
        "factor",
        "link",
        "port",
        "rate_per_second",
        "pcie_gen",
        "pcie_width",
        "rate_gbps",
        "count",
        "period_seconds",
        "job",
        "rank",
    }
)
_NOISE_KEYS = frozenset({"kind", "node", "gpu", "job", "rank", "at_seconds", "duration_seconds", "factor", "count"})
_EXPECT_KEYS = frozenset({"detector", "node", "gpu", "job", "rank", "after_seconds", "within_seconds", "optional"})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path

    def fail(self, key: str | None, reason: str) -> ScenarioError:
        return ScenarioError(self.path, key, reason)

    def keys(self, table: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.fail(
                f"{prefix}{unknown[0]}",
                f"unknown key; expected one of {', '.join(sorted(allowed))}",
            )

    def table(self, scenario: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = scenario.get(key)
        if not isinstance(value, dict):
            raise self.fail(key, "missing table" if value is None else "must be a table")
        return value

    def tables(self, scenario: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
        value = scenario.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(key, f"must be an array of tables ([[{key}]])")
        return value

    def string(self, table: Mapping[str, Any], key: str, where: str, required: bool = True) -> None:
        value = table.get(key)
        if value is None:
            if required:
                raise self.fail(where, "missing")
            return
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {value!r}")

    def number(
        self,
        table: Mapping[str, Any],
        key: str,
        where: str,
        *,
        required: bool = True,
        minimum: float | None = None,
        positive: bool = False,
        maximum: float | None = None,
    ) -> None:
        value = table.get(key)
        if value is None:
            if required:
                raise self.fail(where, "missing")
            return
        if not _is_number(value):
            raise self.fail(where, f"must be a number, got {value!r}")
        if positive and not value > 0:
            raise self.fail(where, f"must be positive, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(where, f"must be >= {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.fail(where, f"must be <= {maximum:g}, got {value!r}")

    def integer(
        self,
        table: Mapping[str, Any],
        key: str,
        where: str,
        *,
        required: bool = True,
        minimum: int = 0,
        below: int | None = None,
    ) -> None:
        value = table.get(key)
        if value is None:
            if required:
                raise self.fail(where, "missing")
            return
        if not _is_int(value):
            raise self.fail(where, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self.fail(where, f"must be >= {minimum}, got {value!r}")
        if below is not None and value >= below:
            raise self.fail(where, f"must be < {below}, got {value!r}")

    def node(self, table: Mapping[str, Any], key: str, where: str, nodes: Sequence[str], required: bool) -> None:
        self.string(table, key, where, required=required)
        value = table.get(key)
        if value is not None and value not in nodes:
            raise self.fail(where, f"unknown node {value!r}; the fleet has {nodes[0]}..{nodes[-1]}")


def validate_scenario(scenario: Mapping[str, Any], path: str | os.PathLike[str] = "<scenario>") -> None:
    """Raises ScenarioError naming the file and key of the first thing wrong in `scenario`."""
    c = _Checker(path)
    c.keys(scenario, _TOP_KEYS, "")
    c.string(scenario, "name", "name")
    healthy = scenario.get("healthy", False)
    if not isinstance(healthy, bool):
        raise c.fail("healthy", f"must be true or false, got {healthy!r}")
    c.number(scenario, "duration_seconds", "duration_seconds", positive=True)
    duration = float(scenario["duration_seconds"])
    c.number(scenario, "sample_interval_seconds", "sample_interval_seconds", required=False, positive=True)
    c.integer(scenario, "seed", "seed", required=False)
    c.string(scenario, "description", "description", required=False)

    fleet = c.table(scenario, "fleet")
    c.keys(fleet, _FLEET_KEYS, "fleet.")
    c.integer(fleet, "nodes", "fleet.nodes", minimum=1)
    c.integer(fleet, "gpus_per_node", "fleet.gpus_per_node", required=False, minimum=1)
    c.string(fleet, "model", "fleet.model", required=False)
    c.integer(fleet, "ib_ports_per_node", "fleet.ib_ports_per_node", required=False)
    nodes = node_names(fleet["nodes"])
    gpus = fleet.get("gpus_per_node", 8)

    job_ids: list[str] = []
    for i, job in enumerate(c.tables(scenario, "jobs")):
        p = f"jobs[{i}]."
        c.keys(job, _JOB_KEYS, p)
        c.string(job, "id", p + "id")
        if job["id"] in job_ids:
            raise c.fail(p + "id", f"job id {job['id']!r} is used twice")
        job_ids.append(job["id"])
        job_nodes = job.get("nodes")
        if not isinstance(job_nodes, list) or not job_nodes:
            raise c.fail(p + "nodes", "must be a non-empty array of node names")
        for n, name in enumerate(job_nodes):
            if name not in nodes:
                raise c.fail(f"{p}nodes[{n}]", f"unknown node {name!r}; the fleet has {nodes[0]}..{nodes[-1]}")
        c.number(job, "step_seconds", p + "step_seconds", required=False, positive=True)
        for flag in ("report_steps", "report_coordinates", "report_wall_seconds"):
            if flag in job and not isinstance(job[flag], bool):
                raise c.fail(p + flag, f"must be true or false, got {job[flag]!r}")
        c.integer(job, "pipeline_stages", p + "pipeline_stages", required=False, minimum=1)
        c.integer(job, "tensor_parallel", p + "tensor_parallel", required=False, minimum=1)
        c.number(job, "start_seconds", p + "start_seconds", required=False, minimum=0, maximum=duration)
        c.number(job, "end_seconds", p + "end_seconds", required=False, minimum=0, maximum=duration)
        if "end_seconds" in job and job["end_seconds"] <= job.get("start_seconds", 0):
            raise c.fail(p + "end_seconds", "must be after start_seconds")

    for section, allowed in (("faults", _FAULT_KEYS), ("noise", _NOISE_KEYS)):
        for i, item in enumerate(c.tables(scenario, section)):
            p = f"{section}[{i}]."
            c.keys(item, allowed, p)
            c.string(item, "kind", p + "kind")
            c.number(item, "at_seconds", p + "at_seconds", required=section == "faults", minimum=0, maximum=duration)
            c.number(item, "duration_seconds", p + "duration_seconds", required=False, positive=True)
            c.node(item, "node", p + "node", nodes, required=False)
            c.integer(item, "gpu", p + "gpu", required=False, below=gpus)
            c.integer(item, "rank", p + "rank", required=False)
            if "job" in item and item["job"] not in job_ids:
                raise c.fail(p + "job", f"unknown job {item['job']!r}")

    expectations = c.tables(scenario, "expect")
    faults = c.tables(scenario, "faults")
    if healthy and (expectations or faults):
        key = "expect" if expectations else "faults"
        raise c.fail(key, "a healthy scenario has no faults and expects no findings")
    if not healthy and not expectations:
        raise c.fail("expect", "a scenario with healthy = false needs at least one [[expect]]")
    for i, item in enumerate(expectations):
        p = f"expect[{i}]."
        c.keys(item, _EXPECT_KEYS, p)
        c.string(item, "detector", p + "detector")
        # A job-level finding (straggler.stage) names the job, not a node.
        c.node(item, "node", p + "node", nodes, required="job" not in item)
        c.integer(item, "gpu", p + "gpu", required=False, below=gpus)
        c.integer(item, "rank", p + "rank", required=False)
        if "job" in item:
            c.string(item, "job", p + "job")
            if item["job"] not in job_ids:
                raise c.fail(p + "job", f"unknown job {item['job']!r}")
        c.number(item, "after_seconds", p + "after_seconds", minimum=0, maximum=duration)
        c.number(item, "within_seconds", p + "within_seconds", positive=True)
        if not isinstance(item.get("optional", False), bool):
            raise c.fail(p + "optional", f"must be true or false, got {item['optional']!r}")


def load_scenario(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and validates one scenario file; ScenarioError names the file and the key."""
    try:
        with open(path, "rb") as f:
            scenario = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(path, None, f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise ScenarioError(path, None, exc.strerror or str(exc)) from None
    validate_scenario(scenario, path)
    return scenario


# --- matching ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expectation:
    detector: str
    node: str | None  # None: a job-level finding, named by its job
    after_seconds: float
    within_seconds: float
    gpu: int | None = None
    job: str | None = None
    rank: int | None = None
    # A finding the detectors may open or not (a borderline rank): matched, it is no false alarm
    # and no true positive; unmatched, no miss. A second one is a false alarm.
    optional: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Expectation:
        return cls(
            detector=d["detector"],
            node=d.get("node"),
            after_seconds=float(d["after_seconds"]),
            within_seconds=float(d["within_seconds"]),
            gpu=d.get("gpu"),
            job=d.get("job"),
            rank=d.get("rank"),
            optional=bool(d.get("optional", False)),
        )

    def same_entity(self, finding: Finding) -> bool:
        return (
            finding.detector == self.detector
            and (self.node is None or finding.node == self.node)
            and (self.gpu is None or finding.gpu == self.gpu)
            and (self.job is None or finding.job == self.job)
            and (self.rank is None or finding.rank == self.rank)
        )

    def in_window(self, opened_at: float, start: float) -> bool:
        begin = start + self.after_seconds
        return begin - _EDGE_TOLERANCE_SECONDS <= opened_at <= begin + self.within_seconds + _EDGE_TOLERANCE_SECONDS

    def matches(self, episode: Episode, start: float) -> bool:
        return self.same_entity(episode.finding) and self.in_window(episode.opened_at, start)

    def describe(self) -> str:
        where = [] if self.node is None else [self.node]
        if self.gpu is not None:
            where.append(f"gpu {self.gpu}")
        if self.job is not None:
            where.append(f"job {self.job}")
        if self.rank is not None:
            where.append(f"rank {self.rank}")
        return f"{self.detector} on {' '.join(where)}"


@dataclass(frozen=True, slots=True)
class Match:
    expectation: Expectation
    episode: Episode
    latency_seconds: float


@dataclass(slots=True)
class ScenarioResult:
    """One scenario's score: what matched, what was missed, what fired without cause."""

    scenario: str  # the file's stem (the --scenario handle), else the scenario's name
    title: str
    healthy: bool
    node_days: float
    start: float
    matches: list[Match] = field(default_factory=list)
    misses: list[Expectation] = field(default_factory=list)
    false_alarms: list[Episode] = field(default_factory=list)
    # Every episode the detectors opened, for explaining misses.
    episodes: list[Episode] = field(default_factory=list)
    wall_seconds: float = 0.0


def score(
    expectations: Sequence[Expectation], episodes: Sequence[Episode], start: float
) -> tuple[list[Match], list[Expectation], list[Episode]]:
    """Matches episodes to expectations, each at most once; returns (matches, misses, false alarms).

    A maximum bipartite matching (augmenting paths), so an expectation that could take either of
    two findings does not take the only one another expectation could use. Candidates are tried
    earliest-opened first, which keeps latencies honest when several would do.
    """
    candidates: list[list[int]] = []
    for expectation in expectations:
        fitting = [j for j, e in enumerate(episodes) if expectation.matches(e, start)]
        fitting.sort(key=lambda j: (episodes[j].opened_at, j))
        candidates.append(fitting)

    owner: dict[int, int] = {}  # episode index -> expectation index

    def augment(i: int, seen: set[int]) -> bool:
        for j in candidates[i]:
            if j in seen:
                continue
            seen.add(j)
            if j not in owner or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    for i in range(len(expectations)):
        augment(i, set())

    matched_by_expectation = {i: j for j, i in owner.items()}
    matches: list[Match] = []
    misses: list[Expectation] = []
    for i, expectation in enumerate(expectations):
        j = matched_by_expectation.get(i)
        if j is None:
            if not expectation.optional:
                misses.append(expectation)
            continue
        episode = episodes[j]
        latency = max(0.0, episode.opened_at - (start + expectation.after_seconds))
        matches.append(Match(expectation, episode, latency))
    false_alarms = [e for j, e in enumerate(episodes) if j not in owner]
    return matches, misses, false_alarms


# --- running scenarios ---------------------------------------------------------------------------


def _node_days(scenario: Mapping[str, Any]) -> float:
    return scenario["fleet"]["nodes"] * float(scenario["duration_seconds"]) / SECONDS_PER_DAY


def evaluate_scenario(
    scenario: Mapping[str, Any],
    detectors: Sequence[Detector] | None = None,
    *,
    name: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> ScenarioResult:
    """Simulates `scenario`, replays its records through `detectors` (default: the registry) and
    scores the episodes against its `expect`.

    A scenario the simulator rejects, or cannot run, raises ScenarioError naming `path` (or the
    scenario's name): a healthy scenario that never ran must not pass as one without alarms.
    """
    from fleetwatch.sim.fleet import SimFleet  # imported late: the simulator is heavy and optional here

    started = time.perf_counter()
    where = path if path is not None else (name or scenario.get("name", "<scenario>"))
    expectations = [Expectation.from_dict(d) for d in scenario.get("expect", [])]
    try:
        fleet = SimFleet.from_scenario(dict(scenario))
    except ValueError as exc:  # the simulator's messages start with the scenario key
        raise ScenarioError(where, None, f"the simulator rejects it: {exc}") from None
    start = float(fleet.start)
    step_seconds = float(scenario.get("sample_interval_seconds", 1.0))
    try:
        # Stragglers folded into their GPU's hardware finding (one page per fault) score as their
        # own detector's findings.
        episodes = unfolded(replay_episodes(fleet.batches(), detectors, step_seconds=step_seconds))
    except Exception as exc:
        raise ScenarioError(where, None, f"simulating it failed: {type(exc).__name__}: {exc}") from exc
    matches, misses, false_alarms = score(expectations, episodes, start)
    return ScenarioResult(
        scenario=name or str(scenario.get("name", "scenario")),
        title=str(scenario.get("name", "")),
        healthy=bool(scenario.get("healthy", False)),
        node_days=_node_days(scenario),
        start=start,
        matches=matches,
        misses=misses,
        false_alarms=false_alarms,
        episodes=episodes,
        wall_seconds=time.perf_counter() - started,
    )


def _evaluate_file(path: str) -> ScenarioResult:
    return evaluate_scenario(load_scenario(path), name=Path(path).stem, path=path)


def scenario_files(directory: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[Path]:
    """The corpus's scenario files in name order; `names` (file stems or names) picks some."""
    root = Path(directory)
    if not root.is_dir():
        raise ScenarioError(root, None, "not a directory")
    files = sorted(root.glob("*.toml"))
    if names is None:
        return files
    by_name = {f.stem: f for f in files} | {f.name: f for f in files}
    picked: list[Path] = []
    for name in names:
        if name not in by_name:
            raise ScenarioError(root, None, f"no scenario {name!r} (file {name}.toml)")
        if by_name[name] not in picked:
            picked.append(by_name[name])
    return picked


def run_corpus(
    directory: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    jobs: int | None = None,
) -> list[ScenarioResult]:
    """Loads every scenario first (a bad file fails fast, naming file and key), then evaluates
    them, `jobs` at a time in worker processes (default: one per CPU; 1: in this process).
    ScenarioError when a scenario cannot be loaded or simulated."""
    files = scenario_files(directory, names)
    for path in files:
        load_scenario(path)
    jobs = jobs or os.cpu_count() or 1
    if jobs <= 1 or len(files) <= 1:
        return [_evaluate_file(str(path)) for path in files]
    with ProcessPoolExecutor(max_workers=min(jobs, len(files))) as pool:
        return list(pool.map(_evaluate_file, [str(p) for p in files]))


# --- the report ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    value = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return round(value, 6)


def _ratio(numerator: int, denominator: int) -> float:
    return 1.0 if denominator == 0 else numerator / denominator


def _rel(t: float, start: float) -> str:
    return f"{t - start:.1f} s"


def _miss_detail(result: ScenarioResult, expectation: Expectation) -> str:
    begin = expectation.after_seconds
    text = f"expected {expectation.describe()} to open in [{begin:g}, {begin + expectation.within_seconds:g}] s"
    same = [e for e in result.episodes if expectation.same_entity(e.finding)]
    if not same:
        near = [e for e in result.episodes if e.finding.detector == expectation.detector]
        if not near:
            return f"{text}; {expectation.detector} opened nothing in this scenario"
        seen = ", ".join(
            f"{e.finding.node} gpu {e.finding.gpu} rank {e.finding.rank} at {_rel(e.opened_at, result.start)}"
            for e in near[:5]
        )
        return f"{text}; {expectation.detector} opened only elsewhere: {seen}"
    seen = ", ".join(f"opened at {_rel(e.opened_at, result.start)}" for e in same[:5])
    return f"{text}; that entity's findings: {seen} (outside the window or matched elsewhere)"


def _false_alarm_detail(result: ScenarioResult, episode: Episode) -> str:
    f = episode.finding
    end = "still open at the end" if f.end is None else f"closed at {_rel(f.end, result.start)}"
    return (
        f"{f.severity} {f.detector} opened at {_rel(episode.opened_at, result.start)} "
        f"(start {_rel(f.start, result.start)}, {end}): {f.summary}"
    )


def summarize(results: Sequence[ScenarioResult]) -> dict[str, Any]:
    """The corpus report (the shape `fleetwatchctl eval --json` prints)."""
    per: dict[str, dict[str, Any]] = {}

    def bucket(detector: str) -> dict[str, Any]:
        return per.setdefault(detector, {"tp": 0, "fp": 0, "fn": 0, "latencies": []})

    failures: list[dict[str, Any]] = []
    matched: list[dict[str, Any]] = []
    latencies: list[float] = []
    node_days = healthy_node_days = 0.0
    false_alarms = healthy_false_alarms = 0
    for result in results:
        node_days += result.node_days
        if result.healthy:
            healthy_node_days += result.node_days
            healthy_false_alarms += len(result.false_alarms)
        false_alarms += len(result.false_alarms)
        for match in result.matches:
            if match.expectation.optional:
                continue  # allowed, not required: neither a hit nor a false alarm
            matched.append(
                {
                    "scenario": result.scenario,
                    "detector": match.expectation.detector,
                    "node": match.expectation.node,
                    "gpu": match.expectation.gpu,
                    "job": match.expectation.job,
                    "rank": match.expectation.rank,
                    "latency_s": match.latency_seconds,
                }
            )
            b = bucket(match.expectation.detector)
            b["tp"] += 1
            b["latencies"].append(match.latency_seconds)
            latencies.append(match.latency_seconds)
        for expectation in result.misses:
            bucket(expectation.detector)["fn"] += 1
            failures.append(
                {
                    "scenario": result.scenario,
                    "kind": "miss",
                    "detector": expectation.detector,
                    "node": expectation.node,
                    "gpu": expectation.gpu,
                    "rank": expectation.rank,
                    "detail": _miss_detail(result, expectation),
                }
            )
        for episode in result.false_alarms:
            f = episode.finding
            bucket(f.detector)["fp"] += 1
            failures.append(
                {
                    "scenario": result.scenario,
                    "kind": "false_alarm",
                    "detector": f.detector,
                    "node": f.node,
                    "gpu": f.gpu,
                    "rank": f.rank,
                    "detail": _false_alarm_detail(result, episode),
                }
            )

    tp = sum(b["tp"] for b in per.values())
    fp = sum(b["fp"] for b in per.values())
    fn = sum(b["fn"] for b in per.values())
    per_detector = {
        detector: {
            "precision": _ratio(b["tp"], b["tp"] + b["fp"]),
            "recall": _ratio(b["tp"], b["tp"] + b["fn"]),
            "true_positives": b["tp"],
            "false_positives": b["fp"],
            "false_negatives": b["fn"],
            "latency_p50_s": percentile(b["latencies"], 50),
            "latency_p95_s": percentile(b["latencies"], 95),
        }
        for detector, b in sorted(per.items())
    }
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "false_alarms_per_1000_node_days": (1000.0 * false_alarms / node_days if node_days else 0.0),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "per_detector": per_detector,
        "scenarios": len(results),
        "node_days": node_days,
        "healthy_false_alarm_rate_per_1000_node_days": (
            1000.0 * healthy_false_alarms / healthy_node_days if healthy_node_days else 0.0
        ),
        "failures": failures,
        "matches": matched,
    }


def evaluate_corpus(
    directory: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Evaluates every scenario in `directory` (or those `names` picks) and returns the report."""
    return summarize(run_corpus(directory, names, jobs))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(report: Mapping[str, Any], out: Any = None) -> None:
    """The human table `fleetwatchctl eval` prints."""
    out = out or sys.stdout
    print(
        f"{'DETECTOR':<22} {'PRECISION':>9} {'RECALL':>7} {'TP':>4} {'FP':>4} {'FN':>4} {'P50 S':>7} {'P95 S':>7}",
        file=out,
    )
    for detector, d in report["per_detector"].items():
        print(
            f"{detector:<22} {_fmt(d['precision']):>9} {_fmt(d['recall']):>7} "
            f"{d['true_positives']:>4} {d['false_positives']:>4} {d['false_negatives']:>4} "
            f"{_fmt(d['latency_p50_s'], 1):>7} {_fmt(d['latency_p95_s'], 1):>7}",
            file=out,
        )
    print(
        f"{'all':<22} {_fmt(report['precision']):>9} {_fmt(report['recall']):>7} "
        f"{'':>4} {'':>4} {'':>4} {_fmt(report['latency_p50_s'], 1):>7} "
        f"{_fmt(report['latency_p95_s'], 1):>7}",
        file=out,
    )
    print(
        f"{report['scenarios']} scenarios, {report['node_days']:.2f} node-days; false alarms per "
        f"1,000 node-days: {report['false_alarms_per_1000_node_days']:.1f} "
        f"(healthy scenarios: {report['healthy_false_alarm_rate_per_1000_node_days']:.1f})",
        file=out,
    )
    if report["failures"]:
        print(f"\n{len(report['failures'])} failures:", file=out)
        for f in report["failures"]:
            kind = "MISS" if f["kind"] == "miss" else "FALSE ALARM"
            print(f"  {f['scenario']}: {kind}: {f['detail']}", file=out)
