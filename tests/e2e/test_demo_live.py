"""A running `fleetwatchctl demo`, asked from outside as an operator would while it runs.

- `fleetwatchctl alerts --fail-on critical` exits non-zero once the demo's XID 79 fires;
- `fleetwatchctl jobs` shows the demo's Slurm job with its energy within 1% of the sum of its
  GPUs' energy counter increases, as the series API returns those counters;
- the collector's /metrics counts the running job's energy.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.e2e.e2e_support import clean_env, wait_for

DEMO_SECONDS = 40
DEMO_JOB = "4242"
NODES, GPUS = 3, 2


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def ctl(base: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", "--collector", base, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    """The demo's collector base URL while the demo runs (3 nodes x 2 GPUs: XID 79 on n02 GPU 1)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetwatch.ctl.main", "demo", "--duration", str(DEMO_SECONDS)]
        + ["--nodes", str(NODES), "--gpus", str(GPUS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.search(r"HTTP (http://127\.0\.0\.1:\d+)/", first)
        assert match, f"the demo's first line names no HTTP address: {first!r}"
        yield match.group(1)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_alerts_fail_on_critical_exits_non_zero_during_the_xid(demo: str) -> None:
    def xid_firing() -> bool:
        return any(a["detector"] == "xid" for a in _get(demo + "/api/v1/alerts")["alerts"])

    wait_for(xid_firing, 30, "the demo's XID alert")
    done = ctl(demo, "alerts", "--fail-on", "critical")
    assert done.returncode == 3, done.stderr
    assert "xid" in done.stdout and "critical" in done.stdout
    assert "at critical or above firing" in done.stderr
    # Warnings are not critical: filtered to the thermal alert, the same check passes.
    thermal = ctl(demo, "alerts", "--detector", "thermal", "--fail-on", "critical")
    assert thermal.returncode == 0, thermal.stderr
    status = ctl(demo, "status", "--fail-on", "critical")
    assert status.returncode == 3


def test_jobs_energy_matches_the_gpus_energy_counters(demo: str) -> None:
    # Enough of the job to count: a few batches from every node.
    wait_for(lambda: len(ctl(demo, "jobs", "--json").stdout.splitlines()) == 1, 30, "the demo's job")
    time.sleep(8)
    done = ctl(demo, "jobs", "--json")
    assert done.returncode == 0, done.stderr
    (job,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert job["job"] == DEMO_JOB and job["state"] == "running"
    assert job["nodes"] == [f"n{i:02d}" for i in range(1, NODES + 1)] and job["gpu_count"] == NODES * GPUS
    assert sorted(r for g in job["gpus"] for r in g["ranks"]) == list(range(NODES * GPUS))

    # The counters themselves, through the series API, over the job's span on each GPU.
    expected = 0.0
    for gpu in job["gpus"]:
        series = _get(
            f"{demo}/api/v1/series?node={gpu['node']}&gpu={gpu['gpu']}&field=energy_joules"
            f"&start={job['first_seen']}&end={job['last_seen']}"
        )
        (energy,) = series["series"]
        values = [v for _, v in energy["points"]]
        assert len(values) >= 5
        expected += values[-1] - values[0]
    assert expected > 0
    assert job["energy_joules"] == pytest.approx(expected, rel=0.01)
    assert job["energy_kwh"] == pytest.approx(job["energy_joules"] / 3.6e6)
    # An H100 under training load draws hundreds of watts.
    assert 100 < job["mean_power_watts"] < 800 and job["mean_utilization_percent"] > 50
    # Its alerts are the faults on its GPUs: the XID on n02 GPU 1 among them.
    assert any(a["detector"] == "xid" and (a["node"], a["gpu"]) == ("n02", 1) for a in job["alerts"])

    table = ctl(demo, "jobs")
    assert table.returncode == 0 and DEMO_JOB in table.stdout and "ENERGY kWh" in table.stdout


def test_metrics_count_the_running_jobs_energy(demo: str) -> None:
    def job_energy() -> float | None:
        with urllib.request.urlopen(demo + "/metrics", timeout=10) as response:
            text = response.read().decode()
        match = re.search(r'^fleetwatch_job_energy_joules_total\{job="4242"\} (\S+)$', text, re.M)
        return None if match is None else float(match.group(1))

    wait_for(lambda: (job_energy() or 0) > 0, 30, "the job's energy in /metrics")
    first = job_energy()
    wait_for(lambda: (job_energy() or 0) > (first or 0), 20, "the job's energy counter to grow")
