"""Benchmark: the agent's CPU time and memory per sampling cycle for 8 simulated GPUs.

Runs the real cycle (NVML source over the fake NVML, host source, protobuf encoding, spool write)
without a collector. Prints one JSON line. Rerun: `.venv/bin/python tests/bench/agent_cycle.py`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

from agent.config import AgentConfig
from agent.runner import Agent
from agent.sim.fake_nvml import make_fake_nvml
from agent.sim.node import SimNode
from agent.sources.host import HostSource
from agent.sources.nvml import NvmlSource
from agent.spool import Spool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nvml = NvmlSource(make_fake_nvml(SimNode("bench", gpu_count=args.gpus)))
        nvml.start()
        config = AgentConfig(node="bench", spool_dir=tmp, spool_fsync=False)
        agent = Agent(config, node="bench", host=HostSource(), spool=Spool(tmp, config.spool_max_bytes, fsync=False), nvml=nvml)
        for _ in range(20):  # warm-up: unsupported fields are learned in the first cycles
            agent.sample_once()
        cpu_ms = []
        for i in range(args.cycles):
            started = time.process_time()
            seq = agent.sample_once()
            cpu_ms.append((time.process_time() - started) * 1000)
            agent.spool.ack(seq)  # keep the spool small, as a connected agent's would be
        nvml.close()
    cpu_ms.sort()
    print(json.dumps({
        "benchmark": "agent_cycle",
        "gpus": args.gpus,
        "cycles": args.cycles,
        "cpu_ms_per_cycle_mean": round(statistics.fmean(cpu_ms), 3),
        "cpu_ms_per_cycle_p50": round(cpu_ms[len(cpu_ms) // 2], 3),
        "cpu_ms_per_cycle_p95": round(cpu_ms[int(len(cpu_ms) * 0.95)], 3),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
