"""Alibaba PAI mini-batch traces (cluster-trace-gpu-v2020) -> step reports, for replays and tests.

The trace (github.com/alibaba/clusterdata, cluster-trace-gpu-v2020/mini-batch-time, CC BY 4.0,
Alibaba Group) gives, for each worker of a distributed training job, the mini-batch time sampled
every few iterations, normalised to 0-1000. Columns: row index, `worker`, `gpu` (percent of a GPU
requested), `time` (the iteration), `batch_time_norm`.

Each row becomes one `Step`: worker -> rank, time -> step, batch_time_norm x seconds_per_unit ->
seconds; every worker on its own node `w00`, `w01`, ... as GPU 0. The jobs are synchronous, so all
workers finish an iteration together and the job moves at its slowest worker: a row's `t` is
`start` plus the job's cumulative time up to that iteration, where each iteration since the
previous sampled one took as long as the slowest worker's time at this row (or
`step_interval_seconds` each, when given). Same-iteration rows of different workers share `t`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable

from fleetwatch.records import Step

_COLUMNS = ("worker", "time", "batch_time_norm")


def steps_from_alibaba_csv(
    lines: Iterable[str],
    job: str,
    *,
    seconds_per_unit: float = 0.001,
    start: float = 1_700_000_000.0,
    step_interval_seconds: float | None = None,
) -> list[Step]:
    """The rows of `lines` (a `*_norm.csv` file, header first) as step reports, by t then rank.

    Raises ValueError naming the line for a missing column or a value that is not a number.
    """
    if not seconds_per_unit > 0 or not math.isfinite(seconds_per_unit):
        raise ValueError(f"seconds_per_unit must be positive, got {seconds_per_unit!r}")
    if step_interval_seconds is not None and not step_interval_seconds > 0:
        raise ValueError(f"step_interval_seconds must be positive, got {step_interval_seconds!r}")
    reader = csv.DictReader(lines)
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"not a mini-batch-time trace: missing column(s) {', '.join(missing)}")

    rows: dict[int, dict[int, float]] = {}  # iteration -> worker -> seconds
    for row in reader:
        line = reader.line_num
        try:
            worker = int(row["worker"])
            iteration = int(row["time"])
            seconds = round(float(row["batch_time_norm"]) * seconds_per_unit, 9)
        except (TypeError, ValueError):
            raise ValueError(f"line {line}: worker, time and batch_time_norm must be numbers") from None
        if worker < 0 or iteration < 0 or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"line {line}: negative or non-finite value in {dict(row)!r}")
        rows.setdefault(iteration, {})[worker] = seconds

    steps: list[Step] = []
    elapsed_seconds = 0.0
    previous: int | None = None
    for iteration in sorted(rows):
        by_worker = rows[iteration]
        # The first sampled iteration counts as one iteration after `start`.
        iterations = 1 if previous is None else iteration - previous
        per_iteration = step_interval_seconds or max(by_worker.values())
        elapsed_seconds += iterations * per_iteration
        previous = iteration
        t = round(start + elapsed_seconds, 6)
        for worker in sorted(by_worker):
            steps.append(
                Step(
                    t=t,
                    job=job,
                    rank=worker,
                    node=f"w{worker:02d}",
                    step=iteration,
                    seconds=by_worker[worker],
                    gpu=0,
                )
            )
    return steps
