"""Benchmark: false alarms per 1,000 node-days on long healthy runs, with a 95% upper bound.

The corpus's healthy scenarios last 10 minutes each (about a node-day in all), too little to
measure a rate that must sit far below real faults' ~4 per 1,000 node-days. This stretches every
healthy scenario of the corpus to `--hours`, puts `--copies` of its fleet side by side in one
fleet (each copy with its own jobs and noise: a 4-node scenario at --copies 16 is a 64-node
cluster of 16 jobs, far cheaper per node-day to evaluate than 16 runs), and runs it under `--seeds`
seeds, `--jobs` runs at a time in worker processes (default: one per CPU; 1: in this process, no
workers). Prints one JSON line at the end, and a progress line per run to stderr. Rerun:
`.venv/bin/python tests/bench/false_alarms.py [--hours 1 --seeds 2 --copies 1 --jobs 1]`.

A soak of a thousand node-days takes hours. With `--ledger FILE` each finished run is appended to
FILE as a JSON line, stamped with a digest of the code and scenarios that decide its result; a
later invocation with the same ledger skips the runs already there for the same code and adds
them to its report, so a soak cut short (or spread over days) goes on where it stopped. Runs of
other code are left out of the report, never mixed in.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import inspect
import json
import math
import os
import sys
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np

import fleetwatch.detectors
from fleetwatch.sim.evaluate import evaluate_scenario, load_scenario, scenario_files
from fleetwatch.sim.scenario import node_names

CORPUS = Path(__file__).resolve().parents[1] / "scenarios"


def poisson_upper_95(events: int) -> float:
    """Exact one-sided 95% upper bound of a Poisson mean having seen `events` (3.0 for none)."""
    low, high = float(events), events + 10 * math.sqrt(events + 1) + 10
    for _ in range(100):  # P(X <= events; mean) = 0.05, by bisection
        mean = (low + high) / 2
        cdf = sum(math.exp(-mean + k * math.log(mean) - math.lgamma(k + 1)) for k in range(events + 1))
        low, high = (mean, high) if cdf > 0.05 else (low, mean)
    return (low + high) / 2


def stretched(path: Path, hours: float, seed: int) -> tuple[str, dict]:
    scenario = copy.deepcopy(load_scenario(path))
    factor = hours * 3600 / scenario["duration_seconds"]
    scenario["duration_seconds"] = hours * 3600
    scenario["seed"] = scenario.get("seed", 0) * 1000 + seed
    # Noise and job boundaries keep their place in time relative to the run's length.
    for section in ("noise", "jobs"):
        for item in scenario.get(section, []):
            for key in ("at_seconds", "start_seconds", "end_seconds"):
                if key in item:
                    item[key] = item[key] * factor
    return f"{path.stem}#{seed}", scenario


# Noise kinds that act on jobs: without a node or job they hit every job, so a copy's item must name
# that copy's jobs (or it would hit every copy's jobs once per copy).
_JOB_NOISE = frozenset({"checkpoint_pause", "job_restart", "dataloader_hiccup"})


def replicated(scenario: dict, copies: int) -> dict:
    """The scenario's fleet `copies` times side by side in one fleet: nodes renumbered, each copy
    with its own jobs (id suffix -1, -2, ...) and its own noise at the same times.

    One fleet of many nodes costs the detectors, vectorised across GPUs, far less per node-day than
    many fleets of four; and a real cluster is large, so peers come from more than one job.
    """
    if copies == 1:
        return scenario
    if scenario.get("faults") or scenario.get("expect"):
        raise ValueError("only healthy scenarios (no faults, no expectations) are replicated")
    count = scenario["fleet"]["nodes"]
    old, new = node_names(count), node_names(count * copies)
    out = copy.deepcopy(scenario)
    out["fleet"]["nodes"] = count * copies
    out["jobs"], out["noise"] = [], []
    for c in range(copies):
        suffix = f"-{c}" if c else ""

        def node(name: str, c: int = c) -> str:
            return new[c * count + old.index(name)]

        for job in scenario.get("jobs", []):
            out["jobs"].append(dict(job, id=job["id"] + suffix, nodes=[node(n) for n in job["nodes"]]))
        for item in scenario.get("noise", []):
            item = dict(item)
            if "node" in item:
                item["node"] = node(item["node"])
            if "job" in item:
                item["job"] += suffix
            elif "node" not in item and item["kind"] in _JOB_NOISE:
                out["noise"] += [dict(item, job=job["id"] + suffix) for job in scenario.get("jobs", [])]
                continue
            out["noise"].append(item)
    return out


def code_digest() -> str:
    """What decides a run's result: the source of every fleetwatch module a run loads (the
    detectors, the simulator, the agent's NVML source it drives, the records and helpers below
    them) and the detectors' data files, the scenarios, how this script stretches and replicates
    them, Python and numpy. Modules a run never loads (the demo, configuration parsing) do not
    count, so an edit there keeps the ledger's runs."""
    importlib.import_module("fleetwatch.sim.fleet")  # what evaluate_scenario imports when it runs

    digest = hashlib.sha256(f"{sys.version_info[:3]} numpy {np.__version__}".encode())
    loaded = sorted(
        name for name, module in list(sys.modules.items()) if name.startswith("fleetwatch") and module is not None
    )
    files = [Path(path) for name in loaded if (path := getattr(sys.modules[name], "__file__", None))]
    files += sorted(Path(fleetwatch.detectors.__file__).parent.glob("*.csv"))
    files += sorted(CORPUS.glob("*.toml"))
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for function in (stretched, replicated):
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()[:16]


def ledger_runs(path: Path, code: str, hours: float, copies: int) -> tuple[dict[str, tuple], int]:
    """The runs in the ledger at `path` of this code, length and copies (name -> result), and how
    many lines are of other code or settings."""
    done: dict[str, tuple] = {}
    other = 0
    if not path.exists():
        return done, other
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = (entry["code"], entry["hours"], entry["copies"])
            result = (entry["run"], entry["node_days"], entry["alarms"], entry["wall_seconds"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}:{number}: not a ledger line ({exc})") from None
        if key == (code, hours, copies):
            done[result[0]] = result
        else:
            other += 1
    return done, other


def run_one(args: tuple[str, dict]):
    name, scenario = args
    result = evaluate_scenario(scenario, name=name)
    alarms = [
        {
            "run": name,
            "detector": e.finding.detector,
            "opened_at_s": round(e.opened_at - result.start, 1),
            "summary": e.finding.summary,
        }
        for e in result.false_alarms
    ]
    return name, result.node_days, alarms, result.wall_seconds


class _InProcess:
    """Pool's imap_unordered in this process (--jobs 1): no worker, no pickling."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap_unordered(self, function, items, chunksize: int = 1):
        return map(function, items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hours", type=float, default=1.0, help="length of each healthy run [default: 1]")
    parser.add_argument("--seeds", type=int, default=2, help="runs of each healthy scenario [default: 2]")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time, in worker processes [default: CPUs]"
    )
    parser.add_argument(
        "--copies", type=int, default=1, help="copies of each healthy fleet side by side in one run [default: 1]"
    )
    parser.add_argument("--scenario", action="append", default=[], help="only this healthy scenario (repeatable)")
    parser.add_argument(
        "--ledger",
        type=Path,
        help="append each finished run to this JSON Lines file and skip the runs it already holds for this code",
    )
    args = parser.parse_args()
    healthy = [p for p in scenario_files(CORPUS, args.scenario or None) if load_scenario(p).get("healthy")]
    # Seed by seed, every scenario each time: a run cut short has sampled them all alike.
    work = []
    for seed in range(args.seeds):
        for path in healthy:
            name, scenario = stretched(path, args.hours, seed)
            copies = max(1, args.copies)
            work.append((f"{name}x{copies}" if copies > 1 else name, replicated(scenario, copies)))
    code = code_digest()
    results = []
    if args.ledger is not None:
        done, other = ledger_runs(args.ledger, code, args.hours, args.copies)
        results = [done[name] for name, _ in work if name in done]
        work = [(name, scenario) for name, scenario in work if name not in done]
        print(
            f"ledger {args.ledger}: {len(results)} runs of this code ({code}) already done, "
            f"{sum(r[1] for r in results):.1f} node-days; {other} lines of other code or settings left out",
            file=sys.stderr,
            flush=True,
        )
        args.ledger.parent.mkdir(parents=True, exist_ok=True)
    runs_total = len(results) + len(work)
    started = time.time()
    with Pool(args.jobs) if args.jobs > 1 else _InProcess() as pool:
        for result in pool.imap_unordered(run_one, work, chunksize=1):
            results.append(result)
            name, node_days, alarms, wall_seconds = result
            if args.ledger is not None:
                entry = {"run": name, "code": code, "hours": args.hours, "copies": args.copies}
                entry |= {"node_days": node_days, "alarms": alarms, "wall_seconds": wall_seconds}
                with args.ledger.open("a") as ledger:
                    ledger.write(json.dumps(entry) + "\n")
            print(
                f"{len(results)}/{runs_total} {name}: {node_days:.2f} node-days in {wall_seconds:.0f} s, "
                f"{len(alarms)} false alarms; so far {sum(r[1] for r in results):.1f} node-days, "
                f"{sum(len(r[2]) for r in results)} false alarms, {time.time() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    node_days = sum(r[1] for r in results)
    alarms = Counter(a["detector"] for r in results for a in r[2])
    total = sum(alarms.values())
    print(
        json.dumps(
            {
                "benchmark": "false_alarms",
                "code": code,
                "healthy_runs": len(results),
                "hours_each": args.hours,
                "copies": args.copies,
                "node_days": round(node_days, 2),
                "false_alarms": total,
                "false_alarms_per_1000_node_days": round(total / node_days * 1000, 1),
                "upper_95_per_1000_node_days": round(poisson_upper_95(total) / node_days * 1000, 1),
                "by_detector": dict(alarms),
                "alarms": [a for r in results for a in r[2]],
                "wall_seconds": round(time.time() - started, 1),  # this invocation's
                "runs_seconds": round(sum(r[3] for r in results), 1),  # every run's, resumed ones included
            }
        )
    )


if __name__ == "__main__":
    main()
