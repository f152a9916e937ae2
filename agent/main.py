"""`fleetwatch-agent`: the per-node daemon (run by systemd, one per node)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys

from agent.config import DEFAULT_PATH, AgentConfig
from agent.configfile import ConfigError, daemon_parser, describe, load_config
from agent.runner import Agent
from agent.sources.host import HostSource
from agent.sources.nvml import NvmlSource, load_nvml
from agent.spool import Spool
from agent.systemd import setup_logging

log = logging.getLogger("agent")


def build_parser() -> argparse.ArgumentParser:
    return daemon_parser(
        "fleetwatch-agent",
        "Samples every GPU through NVML and the host through psutil, reads XIDs from NVML events, "
        "spools each batch on disk and streams it to the fleetwatch collector over gRPC.",
        AgentConfig,
        DEFAULT_PATH,
    )


def open_nvml(config: AgentConfig, node: str) -> NvmlSource | None:
    """The real driver, or the fake NVML over a simulated node: the same NvmlSource samples both."""
    if config.simulate:
        from agent.sim.fake_nvml import make_fake_nvml
        from agent.sim.node import SimNode
        from agent.sim.scenario import parse_fault

        sim = SimNode(
            node,
            gpu_count=config.sim_gpus,
            model=config.sim_model,
            faults=[parse_fault(spec) for spec in config.sim_faults],
            seed=config.sim_seed,
        )
        module = make_fake_nvml(sim)
    else:
        module = load_nvml()
        if module is None:
            return None
    source = NvmlSource(module)
    source.start()
    return source


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(AgentConfig, path=args.config, flags=args)
        if config.simulate:
            from agent.sim.scenario import parse_fault

            for spec in config.sim_faults:
                parse_fault(spec)
    except (ConfigError, ValueError) as exc:
        print(f"fleetwatch-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    node = config.node or socket.gethostname()
    log.info("starting with %s", describe(config))
    try:
        spool = Spool(config.spool_dir, config.spool_max_bytes, fsync=config.spool_fsync)
    except OSError as exc:
        log.error("cannot open the spool directory %s: %s", config.spool_dir, exc)
        return 1
    agent = Agent(
        config,
        node=node,
        host=HostSource(procfs_root=config.procfs_root, disk_path=config.disk_path),
        spool=spool,
        nvml=open_nvml(config, node),
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    asyncio.run(run())
    if agent.nvml is not None:
        agent.nvml.close()
    log.info("stopped; %d batches left in the spool", spool.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
