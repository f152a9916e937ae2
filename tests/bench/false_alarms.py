"""Benchmark: false alarms per 1,000 node-days on long healthy runs, with a 95% upper bound.

The corpus's healthy scenarios last 10 minutes each (about a node-day in all), too little to
measure a rate that must sit far below real faults' ~4 per 1,000 node-days. This stretches every
healthy scenario of the corpus to `--hours` and runs it under `--seeds` seeds, in parallel.
Prints one JSON line. Rerun: `.venv/bin/python tests/bench/false_alarms.py [--hours 1 --seeds 2]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

from fleetwatch.sim.evaluate import evaluate_scenario, load_scenario, scenario_files

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hours", type=float, default=1.0, help="length of each healthy run [default: 1]")
    parser.add_argument("--seeds", type=int, default=2, help="runs of each healthy scenario [default: 2]")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scenario", action="append", default=[], help="only this healthy scenario (repeatable)")
    args = parser.parse_args()
    healthy = [p for p in scenario_files(CORPUS, args.scenario or None) if load_scenario(p).get("healthy")]
    work = [stretched(p, args.hours, seed) for p in healthy for seed in range(args.seeds)]
    started = time.time()
    with Pool(args.jobs) as pool:
        results = pool.map(run_one, work, chunksize=1)
    node_days = sum(r[1] for r in results)
    alarms = Counter(a["detector"] for r in results for a in r[2])
    total = sum(alarms.values())
    print(
        json.dumps(
            {
                "benchmark": "false_alarms",
                "healthy_runs": len(results),
                "hours_each": args.hours,
                "node_days": round(node_days, 2),
                "false_alarms": total,
                "false_alarms_per_1000_node_days": round(total / node_days * 1000, 1),
                "upper_95_per_1000_node_days": round(poisson_upper_95(total) / node_days * 1000, 1),
                "by_detector": dict(alarms),
                "alarms": [a for r in results for a in r[2]],
                "wall_seconds": round(time.time() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
