"""`fleetwatchctl demo --duration 20 --json`: both injected faults alerted, nothing else."""

import json
import os
import subprocess
import sys

import pytest


def test_demo_alerts_on_both_faults_and_nothing_else() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}
    proc = subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", "demo", "--duration", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    alerts = summary["alerts"]
    for a in alerts:
        assert set(a) == {"detector", "node", "gpu", "severity", "status", "seconds_to_alert", "slows"}

    xid = [a for a in alerts if a["detector"] == "xid"]
    assert len(xid) == 1, alerts
    assert (xid[0]["node"], xid[0]["gpu"], xid[0]["severity"]) == ("n02", 5, "critical")
    assert xid[0]["seconds_to_alert"] is not None and 0 <= xid[0]["seconds_to_alert"] <= 2

    thermal = [a for a in alerts if a["detector"] == "thermal"]
    assert len(thermal) == 1, alerts
    assert (thermal[0]["node"], thermal[0]["gpu"]) == ("n03", 2)
    assert thermal[0]["seconds_to_alert"] is not None
    # One page for the fault: the GPU's slowing of the fleet's training job rides on its thermal
    # alert (GPU 2 of the third node is rank 18 of the demo's Slurm job), not a straggler alert.
    # The slowdown halves the SM clock; the loss is 1 - median clock / the peers', so the +-1 clock
    # bin (15 MHz) of jitter in whichever samples a run happens to take moves it by under 0.02.
    (slowed,) = thermal[0]["slows"]
    assert (slowed["job"], slowed["rank"]) == ("4242", 18)
    assert slowed["job_loss"] == pytest.approx(0.5, abs=0.02)
    assert not [a for a in alerts if a["detector"].startswith("straggler")], alerts

    # XID 79 also means the GPU is gone: a gpu_lost alert on that same GPU is right; any other GPU is a false alarm.
    assert {(a["node"], a["gpu"]) for a in alerts} == {("n02", 5), ("n03", 2)}, alerts
    # 4 nodes x (8 GPUs + host) at 1 Hz for ~20 s
    assert summary["samples_ingested"] > 4 * 9 * 15
