"""A simulated fleet of real agents in one process, for the several-collectors test.

`python -m tests.e2e.fleet_agents --collectors 127.0.0.1:P1,127.0.0.1:P2 --nodes 30 --seconds 45
--out seqs.json [--fault n05:xid:79@1+8 ...]` runs one Agent per node (the agent's own runner,
spool and sampler over the fake NVML, as `fleetwatchctl demo` does) in one asyncio process: a
single Slurm job spans every GPU of every node (named in a procfs tree under --workdir). On SIGTERM
or after --seconds it stops them (each drains its spool, bounded), then writes per node the boot
id and the highest seq it allocated, and how many batches it still held unacked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from pathlib import Path

from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.runner import Agent
from fleetwatch.agent.sampler import Sampler
from fleetwatch.agent.sources.host import HostSource
from fleetwatch.agent.sources.jobs import JobResolver
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.agent.spool import Spool
from fleetwatch.agent.state import AgentState
from fleetwatch.sim.demo import write_job_procfs
from fleetwatch.sim.fake_nvml import make_fake_nvml
from fleetwatch.sim.node import SimNode
from fleetwatch.sim.scenario import parse_fault

JOB = "777"


async def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir)
    names = [f"n{i:02d}" for i in range(1, args.nodes + 1)]
    faults: dict[str, list] = {}
    for spec in args.fault:
        node, _, fault = spec.partition(":")
        faults.setdefault(node, []).append(parse_fault(fault))
    start = time.time()
    agents: dict[str, Agent] = {}
    for i, node in enumerate(names, start=1):
        sim = SimNode(node, gpu_count=args.gpus, faults=faults.get(node, []), seed=i, start=start)
        nvml = NvmlSource(make_fake_nvml(sim))
        nvml.start()
        config = AgentConfig(
            node=node,
            collector_address=args.collectors.split(","),
            spool_dir=str(workdir / node / "spool"),
            spool_fsync=False,
            sampling_interval_seconds=args.sampling_seconds,
            batch_interval_seconds=args.batch_seconds,
            stop_drain_seconds=30.0,
        )
        procfs = workdir / node / "proc"
        write_job_procfs(procfs, sim, JOB, (i - 1) * args.gpus)
        host = HostSource()
        sampler = Sampler(AgentState(node=node), host=host, nvml=nvml, jobs=JobResolver(str(procfs)))
        spool = Spool(config.spool_dir, config.spool_max_bytes, fsync=False)
        agents[node] = Agent(config, node=node, sampler=sampler, spool=spool, boot_id=f"boot-{node}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(agent.run(stop)) for agent in agents.values()]
    try:
        await asyncio.wait_for(stop.wait(), timeout=args.seconds)
    except TimeoutError:
        stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    out = {}
    for node, agent in agents.items():
        out[node] = {"boot_id": f"boot-{node}", "seq": agent.spool.last_seq, "unacked": agent.spool.count}
        if agent.nvml is not None:
            agent.nvml.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collectors", required=True)
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sampling-seconds", type=float, default=1.0)
    parser.add_argument("--batch-seconds", type=float, default=2.0)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fault", action="append", default=[], metavar="NODE:SPEC")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
