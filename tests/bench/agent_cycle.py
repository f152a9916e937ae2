"""Benchmark: the agent's CPU time and memory per sampling cycle for 8 simulated GPUs.

Runs the real cycle without a collector: NVML source over the fake NVML, job attribution from
/proc, host source, InfiniBand from the fixture sysfs tree, protobuf encoding and the spool write.
Targets (issue 3): under 5 ms CPU per cycle, under 80 MB resident. Prints one JSON line.
Rerun: `.venv/bin/python tests/bench/agent_cycle.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.runner import Agent
from fleetwatch.agent.sampler import Sampler
from fleetwatch.agent.sources.host import HostSource
from fleetwatch.agent.sources.infiniband import InfinibandSource
from fleetwatch.agent.sources.jobs import JobResolver
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.agent.spool import Spool
from fleetwatch.agent.state import AgentState
from fleetwatch.sim.fake_nvml import make_fake_nvml
from fleetwatch.sim.node import SimNode

FIXTURE_SYSFS = Path(__file__).resolve().parents[1] / "fixtures" / "sys"


def daemon_footprint(seconds: float, gpus: int) -> dict:
    """The whole agent daemon (gRPC client, /metrics server, every source thread): RSS and CPU per cycle."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleetwatch.agent.main",
                "--config",
                "/dev/null",
                "--simulate",
                "--sim-gpus",
                str(gpus),
                "--node",
                "bench",
                "--collector-address",
                "127.0.0.1:9",
                "--spool-dir",
                tmp,
                "--no-spool-fsync",
                "--sysfs-root",
                str(FIXTURE_SYSFS),
                "--kmsg-path",
                "",
                "--step-socket",
                f"{tmp}/steps.sock",
                "--metrics-listen",
                "127.0.0.1:0",
                "--sampling-interval-seconds",
                "1",
                "--log-level",
                "error",
            ],
            env={k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")},
        )
        try:
            time.sleep(seconds)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu_seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        finally:
            proc.terminate()
            proc.wait(30)
    return {
        "daemon_seconds": seconds,
        "daemon_rss_mb": round(rss_kb / 1024, 1),
        "daemon_cpu_ms_per_second_incl_startup": round(cpu_seconds * 1000 / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--daemon-seconds", type=float, default=20.0, help="how long to run the real daemon (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nvml = NvmlSource(make_fake_nvml(SimNode("bench", gpu_count=args.gpus)))
        nvml.start()
        config = AgentConfig(node="bench", spool_dir=tmp, spool_fsync=False)
        host = HostSource()
        sampler = Sampler(
            AgentState(node="bench"),
            host=host,
            nvml=nvml,
            infiniband=InfinibandSource(sysfs_root=str(FIXTURE_SYSFS)),
            jobs=JobResolver(),
        )
        spool = Spool(tmp, config.spool_max_bytes, fsync=False)
        agent = Agent(config, node="bench", sampler=sampler, spool=spool, boot_id=host.boot_id())
        for _ in range(20):  # warm-up: unsupported fields are learned in the first cycles
            agent.sample_once()
        cpu_ms = []
        for _ in range(args.cycles):
            started = time.process_time()
            seq = agent.sample_once()
            cpu_ms.append((time.process_time() - started) * 1000)
            agent.spool.ack(seq)  # keep the spool small, as a connected agent's would be
        nvml.close()
    cpu_ms.sort()
    print(
        json.dumps(
            {
                "benchmark": "agent_cycle",
                "gpus": args.gpus,
                "ib_ports": len(sampler.state.ib_ports),
                "cycles": args.cycles,
                "cpu_ms_per_cycle_mean": round(statistics.fmean(cpu_ms), 3),
                "cpu_ms_per_cycle_p50": round(cpu_ms[len(cpu_ms) // 2], 3),
                "cpu_ms_per_cycle_p95": round(cpu_ms[int(len(cpu_ms) * 0.95)], 3),
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                **(daemon_footprint(args.daemon_seconds, args.gpus) if args.daemon_seconds > 0 else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
