"""`fleetwatch-agent`: the per-node daemon (run by systemd, one per node)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from typing import Any

from fleetwatch import __version__
from fleetwatch.addresses import join_host_port, parse_host_port
from fleetwatch.agent.config import DEFAULT_PATH, AgentConfig
from fleetwatch.agent.metrics import MetricsServer
from fleetwatch.agent.runner import Agent
from fleetwatch.agent.sampler import Sampler
from fleetwatch.agent.sources.host import HostSource
from fleetwatch.agent.sources.infiniband import InfinibandSource
from fleetwatch.agent.sources.jobs import JobResolver
from fleetwatch.agent.sources.kmsg import KmsgSource
from fleetwatch.agent.sources.nvml import NvmlSource, load_nvml
from fleetwatch.agent.sources.podresources import PodResourcesSource
from fleetwatch.agent.sources.steps import StepReceiver
from fleetwatch.agent.spool import Spool, SpoolBusyError, SpoolLock
from fleetwatch.agent.state import AgentState
from fleetwatch.agent.tls import load_channel_tls, plaintext_warning
from fleetwatch.configfile import ConfigError, daemon_parser, describe, load_config
from fleetwatch.limits import node_name_problem
from fleetwatch.systemd import setup_logging

log = logging.getLogger("fleetwatch.agent")


def build_parser() -> argparse.ArgumentParser:
    parser = daemon_parser(
        "fleetwatch-agent",
        "Samples every GPU through NVML and the host through psutil and sysfs, reads XIDs from NVML "
        "events and the kernel log, takes step reports from training jobs, serves its own /metrics, "
        "spools each batch on disk and streams it to the fleetwatch collector over gRPC.",
        AgentConfig,
        DEFAULT_PATH,
    )
    parser.add_argument(
        "--once", action="store_true", help="sample once, print the result and exit (no collector, no spool)"
    )
    parser.add_argument("--json", action="store_true", help="with --once: print one JSON object")
    return parser


def open_nvml(config: AgentConfig, node: str) -> NvmlSource | None:
    """The real driver, or the fake NVML over a simulated node: the same NvmlSource samples both."""
    module: object | None  # pynvml or the fake: NvmlSource takes either
    if config.simulate:
        from fleetwatch.sim.fake_nvml import make_fake_nvml
        from fleetwatch.sim.node import SimNode
        from fleetwatch.sim.scenario import parse_fault

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


def build_sampler(config: AgentConfig, node: str) -> tuple[Sampler, HostSource]:
    nvml = open_nvml(config, node)
    host = HostSource(procfs_root=config.procfs_root, disk_path=config.disk_path)
    sampler = Sampler(
        AgentState(node=node),
        host=host,
        nvml=nvml,
        infiniband=InfinibandSource(sysfs_root=config.sysfs_root),
        jobs=JobResolver(procfs_root=config.procfs_root) if config.job_attribution else None,
        # Simulated GPUs are no kubelet's: their made-up UUIDs and indexes would match real pods'.
        pods=(
            PodResourcesSource(config.pod_resources_socket, nvml=nvml.nvml if nvml is not None else None)
            if config.pod_resources_socket and not config.simulate
            else None
        ),
    )
    return sampler, host


def close_sampler(sampler: Sampler) -> None:
    if sampler.pods is not None:
        sampler.pods.close()
    if sampler.nvml is not None:
        sampler.nvml.close()


def bus_id_map(sampler: Sampler) -> dict[str, int]:
    return {g["pci_bus_id"]: g["index"] for g in sampler.state.inventory if g.get("pci_bus_id")}


def sample_once_json(config: AgentConfig, node: str) -> dict[str, Any]:
    """`--once`: everything one cycle sees, plus the XIDs already in the kernel log."""
    sampler, host = build_sampler(config, node)
    try:
        cycle = sampler.sample()
        events = list(cycle.events)
        if config.kmsg_path:
            kmsg = KmsgSource(config.kmsg_path, bus_id_to_gpu=bus_id_map(sampler))
            events += sampler.admit_events(kmsg.read_existing())
        unsupported = sampler.nvml.unsupported_fields() if sampler.nvml is not None else {}
        return {
            "node": node,
            "boot_id": host.boot_id(),
            "agent_version": __version__,
            "t": cycle.t,
            "nvml_available": sampler.nvml is not None,
            # --once streams nothing: the collectors the daemon would walk over, as configured.
            "collector_address": config.collector_address,
            "inventory": sampler.state.inventory,
            "gpus": cycle.gpus,
            "unsupported": {str(k): v for k, v in unsupported.items()},
            "host": cycle.host,
            "infiniband": cycle.ib_ports,
            "events": events,
            "sources": {
                name: {"duration_seconds": s.last_duration_seconds, "success": s.last_success}
                for name, s in sampler.state.sources.items()
            },
        }
    finally:
        close_sampler(sampler)


def print_once(result: dict[str, Any]) -> None:
    print(
        f"node {result['node']} (boot {result['boot_id']}), "
        f"NVML {'available' if result['nvml_available'] else 'unavailable'}"
    )
    for gpu in result["gpus"]:
        m = gpu["metrics"]
        print(f"  GPU {gpu['gpu']} {gpu.get('uuid')}: " + ", ".join(f"{k}={v}" for k, v in sorted(m.items())))
        missing = result["unsupported"].get(str(gpu["gpu"]))
        if missing:
            print(f"    not supported: {', '.join(missing)}")
    print("  host: " + ", ".join(f"{k}={v}" for k, v in sorted((result["host"] or {}).items())))
    for port in result["infiniband"]:
        print(
            f"  ib {port['device']}/{port['port']}: "
            + ", ".join(f"{k}={v}" for k, v in sorted(port.items()) if k not in ("device", "port"))
        )
    for event in result["events"]:
        print(f"  event: {event}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(AgentConfig, path=args.config, flags=args)
        if config.simulate:
            from fleetwatch.sim.scenario import parse_fault

            for spec in config.sim_faults:
                fault = parse_fault(spec)
                if fault.gpu >= config.sim_gpus:
                    raise ConfigError(
                        f"sim_faults: {spec!r} targets GPU {fault.gpu}, but the simulated node has "
                        f"{config.sim_gpus} (sim_gpus; GPUs 0-{config.sim_gpus - 1})"
                    )
        metrics_address: tuple[str, int] | None = None
        if config.metrics_listen:
            try:
                metrics_address = parse_host_port(config.metrics_listen)
            except ValueError as exc:
                # Worded as load_config words the problems it finds.
                raise ConfigError(f"metrics_listen: {exc} (got {config.metrics_listen!r})") from None
        if not args.once:
            # Checked now so that a wrong path stops the agent at start, not at its first connect.
            load_channel_tls(config)
    except (ConfigError, ValueError) as exc:
        print(f"fleetwatch-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    node = config.node or socket.gethostname()
    problem = node_name_problem(node)
    if problem:
        # The collector would refuse every stream; say so now, naming what to set.
        print(f"fleetwatch-agent: configuration error: node: the host name {problem}; set node", file=sys.stderr)
        return 2
    setup_logging("warning" if args.once else config.log_level)
    if args.once:
        result = sample_once_json(config, node)
        if args.json:
            json.dump(result, sys.stdout)
            print()
        else:
            print_once(result)
        return 0

    log.info("starting with %s", describe(config))
    warning = plaintext_warning(config)
    if warning:
        log.warning("%s", warning)
    try:
        # Locked before the Spool opens it: opening removes half-written files, which in a
        # directory another agent is writing would be that agent's batches in progress. Held
        # until the process exits (the kernel drops a flock with its holder, however it dies).
        spool_lock = SpoolLock(config.spool_dir)
    except SpoolBusyError as exc:
        log.error("%s; exiting", exc)
        return 1
    except OSError as exc:
        log.error("cannot lock the spool directory %s: %s", config.spool_dir, exc)
        return 1
    try:
        spool = Spool(config.spool_dir, config.spool_max_bytes, fsync=config.spool_fsync)
    except OSError as exc:
        log.error("cannot open the spool directory %s: %s", config.spool_dir, exc)
        return 1
    sampler, host = build_sampler(config, node)
    kmsg = KmsgSource(config.kmsg_path, bus_id_to_gpu=bus_id_map(sampler)) if config.kmsg_path else None
    steps = None
    if config.step_socket:
        steps = StepReceiver(config.step_socket)
        try:
            steps.open()
        except OSError as exc:
            log.warning("step reports off: cannot open %s: %s", config.step_socket, exc)
            steps = None
    metrics = None
    if metrics_address is not None:
        metrics_host, metrics_port = metrics_address
        try:
            metrics = MetricsServer(
                sampler.state,
                metrics_host,
                metrics_port,
                dcgm_names=config.dcgm_names,
                tls_cert_file=config.metrics_tls_cert_file,
                tls_key_file=config.metrics_tls_key_file,
                basic_auth_user=config.metrics_basic_auth_user,
                basic_auth_password=config.metrics_basic_auth_password.reveal(),
            )
            metrics.start()
            log.info(
                "metrics on %s://%s/metrics%s",
                metrics.scheme,
                join_host_port(metrics_host, metrics.port),
                ", basic auth" if config.metrics_basic_auth_user else "",
            )
            if config.metrics_basic_auth_user and not config.metrics_tls_cert_file:
                log.warning(
                    "metrics_basic_auth_user without metrics_tls_cert_file: "
                    "the /metrics password crosses the network in the clear"
                )
        except OSError as exc:
            log.error("cannot serve /metrics on %s: %s", config.metrics_listen, exc)
            return 1
    agent = Agent(config, node=node, sampler=sampler, spool=spool, boot_id=host.boot_id(), kmsg=kmsg, steps=steps)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    try:
        asyncio.run(run())
    finally:
        if metrics is not None:
            metrics.stop()
        if steps is not None:
            steps.close()
        close_sampler(sampler)
    log.info("stopped; %d batches left in the spool", spool.count)
    spool_lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
