"""`fleetwatchctl demo`: the whole path on one machine, from simulated GPUs to a webhook.

A collector on a temporary SQLite file, simulated 8-GPU nodes running real agents that stream
over gRPC on loopback, and a local webhook receiver. The fleet runs one training job; one GPU gets
XID 79, another a hardware thermal slowdown, which slows the job; the summary says which alerts
were raised and how long each took from the fault to the webhook. With `tls`, agents and
collector speak mTLS with certificates made for the run, each agent holding its own node's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from aiohttp import web

from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.runner import Agent
from fleetwatch.agent.sampler import Sampler
from fleetwatch.agent.sources.host import HostSource
from fleetwatch.agent.sources.jobs import JobResolver
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.agent.spool import Spool
from fleetwatch.agent.state import AgentState
from fleetwatch.certs import CA_CERT_FILE, init_ca, issue_into
from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig, DatabaseUrl, WebhookUrl
from fleetwatch.collector.notify.base import alert_labels, labels_fingerprint
from fleetwatch.collector.web import HEALTH_MARK, fleet_status
from fleetwatch.sim.fake_nvml import make_fake_nvml
from fleetwatch.sim.node import SimNode
from fleetwatch.sim.scenario import Fault

STATUS_EVERY_SECONDS = 2.0
WEBHOOK_PATH = "/alerts"
# The collector's certificate name with --tls (its SANs 127.0.0.1 and localhost are what agents verify).
DEMO_COLLECTOR_NAME = "collector"


# The demo fleet runs one training job across every GPU, as a Slurm job: the agents find it in each
# worker's environment (agent/sources/jobs.py), under a procfs tree the demo writes.
DEMO_JOB = "4242"
# /proc/<pid>/stat after the command name: fields 3 to 22, the last the start time in clock ticks.
_STAT_FIELDS_BEFORE_START_TIME = ("S",) + ("0",) * 18


def write_job_procfs(root: Path, sim: SimNode, job: str, first_rank: int) -> None:
    """A procfs tree where each of `sim`'s GPU workers is rank first_rank + GPU of Slurm job `job`."""
    for gpu in range(sim.gpu_count):
        for pid in sim.processes_at(gpu, sim.start):
            proc = root / str(pid)
            proc.mkdir(parents=True, exist_ok=True)
            start_ticks = 1_000 + pid  # any value fixed for the process's life
            (proc / "stat").write_text(
                f"{pid} (pt_main_thread) {' '.join(_STAT_FIELDS_BEFORE_START_TIME)} {start_ticks}\n"
            )
            (proc / "environ").write_bytes(f"SLURM_JOB_ID={job}\0SLURM_PROCID={first_rank + gpu}\0".encode())


@dataclass(frozen=True)
class InjectedFault:
    node: str
    fault: Fault


def demo_faults(node_count: int, gpu_count: int) -> list[InjectedFault]:
    """XID 79 on the second node, thermal slowdown on the third (or the first, on a small fleet)."""
    xid_node = f"n{min(2, node_count):02d}"
    thermal_node = f"n{min(3, node_count):02d}"
    return [
        InjectedFault(xid_node, Fault(kind="xid", gpu=min(5, gpu_count - 1), at_seconds=6.0, xid=79)),
        # Early: the thermal detector wants ~15 s of sustained slowdown, and a demo may last only 20 s.
        InjectedFault(thermal_node, Fault(kind="thermal_slowdown", gpu=min(2, gpu_count - 1), at_seconds=2.0)),
    ]


class WebhookReceiver:
    """A local HTTP endpoint on the running event loop that records every webhook body with its arrival time."""

    def __init__(self, port: int = 0) -> None:
        self.received: list[tuple[float, dict]] = []
        self._port = port
        app = web.Application()
        app.router.add_post(WEBHOOK_PATH, self._receive)
        self._runner = web.AppRunner(app, access_log=None)

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append((time.time(), body))
        return web.Response()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}{WEBHOOK_PATH}"

    def first_arrival(self, fingerprint: str, status: str = "firing") -> float | None:
        for arrived, body in self.received:
            for alert in body.get("alerts", []):
                if alert.get("fingerprint") == fingerprint and alert.get("status") == status:
                    return arrived
        return None

    async def __aenter__(self) -> WebhookReceiver:
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self._port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


async def status_line(app: CollectorApp, elapsed_seconds: float) -> str:
    status = await fleet_status(app)
    cells = []
    for node in status["nodes"]:
        marks = "".join(HEALTH_MARK[g["health"]] for g in node["gpus"])
        cells.append(f"{node['node']} {marks}")
    firing = status["alerts_firing"]
    return f"t+{elapsed_seconds:4.0f}s  " + "  ".join(cells) + f"  | {firing} alert{'' if firing == 1 else 's'} firing"


def make_demo_certs(directory: Path, nodes: list[str]) -> None:
    """A CA, the collector's certificate for 127.0.0.1 (where the demo's agents dial it) and one per node."""
    init_ca(directory)
    issue_into(directory, DEMO_COLLECTOR_NAME, server=True, sans=["127.0.0.1", "localhost"])
    for node in nodes:
        issue_into(directory, node)


async def _run(
    duration_seconds: float,
    node_count: int,
    gpu_count: int,
    live: TextIO | None,
    workdir: Path,
    tls: bool = False,
    http_listen: str = "127.0.0.1:0",
) -> dict:
    names = [f"n{i:02d}" for i in range(1, node_count + 1)]
    certs = workdir / "tls"
    if tls:
        await asyncio.to_thread(make_demo_certs, certs, names)

    def cert_file(name: str) -> str:
        return str(certs / name) if tls else ""  # "": that TLS setting off

    async with WebhookReceiver() as receiver:
        app = CollectorApp(
            CollectorConfig(
                grpc_listen="127.0.0.1:0",
                http_listen=http_listen,
                database_url=DatabaseUrl(f"sqlite:///{workdir / 'collector.db'}"),
                webhook_urls=[WebhookUrl(receiver.url)],
                log_alerts=False,
                detect_interval_seconds=0.5,
                tls_cert_file=cert_file(f"{DEMO_COLLECTOR_NAME}.crt"),
                tls_key_file=cert_file(f"{DEMO_COLLECTOR_NAME}.key"),
                tls_client_ca_file=cert_file(CA_CERT_FILE),
            )
        )
        await app.start()
        injected = demo_faults(node_count, gpu_count)
        start = time.time()
        sims: dict[str, SimNode] = {}
        agents = []
        for i, node in enumerate(names, start=1):
            sims[node] = SimNode(
                node, gpu_count=gpu_count, faults=[f.fault for f in injected if f.node == node], seed=i, start=start
            )
            nvml = NvmlSource(make_fake_nvml(sims[node]))
            nvml.start()
            config = AgentConfig(
                node=node,
                collector_address=[f"127.0.0.1:{app.grpc_port}"],
                spool_dir=str(workdir / f"spool-{node}"),
                spool_fsync=False,
                # A demo lasts a minute or so: batches of 5 s, not the default 10, so its alerts
                # open within seconds of the faults.
                batch_interval_seconds=5.0,
                tls_ca_file=cert_file(CA_CERT_FILE),
                tls_cert_file=cert_file(f"{node}.crt"),
                tls_key_file=cert_file(f"{node}.key"),
            )
            spool = Spool(config.spool_dir, config.spool_max_bytes, fsync=False)
            host = HostSource()
            procfs = workdir / f"proc-{node}"
            await asyncio.to_thread(write_job_procfs, procfs, sims[node], DEMO_JOB, (i - 1) * gpu_count)
            sampler = Sampler(AgentState(node=node), host=host, nvml=nvml, jobs=JobResolver(str(procfs)))
            agents.append(Agent(config, node=node, sampler=sampler, spool=spool, boot_id=host.boot_id()))
        if live:
            print(
                f"demo: collector gRPC 127.0.0.1:{app.grpc_port}{' (mTLS)' if tls else ''}, "
                f"HTTP http{'s' if tls else ''}://127.0.0.1:{app.http_port}/api/v1/status; "
                f"{node_count} nodes x {gpu_count} GPUs; "
                + "; ".join(
                    f"{f.fault.kind}{':' + str(f.fault.xid) if f.fault.xid else ''} on {f.node} "
                    f"GPU {f.fault.gpu} at +{f.fault.at_seconds:.0f}s"
                    for f in injected
                ),
                file=live,
            )
        stop_agents = asyncio.Event()
        tasks = [asyncio.create_task(a.run(stop_agents)) for a in agents]
        try:
            deadline = start + duration_seconds
            while time.time() < deadline:
                await asyncio.sleep(min(STATUS_EVERY_SECONDS, max(0.0, deadline - time.time())))
                if live:
                    print(await status_line(app, time.time() - start), file=live, flush=True)
            await asyncio.sleep(0.5)  # let the last deliveries land
            fault_times = {(f.node, f.fault.gpu): sims[f.node].fault_time(f.fault) for f in injected}
            alerts_out = []
            for alert in sorted(app.store.alerts(status=None, limit=1000), key=lambda a: a["starts_at"]):
                # The webhook names an alert by the fingerprint of its labels, as Alertmanager does.
                arrived = receiver.first_arrival(labels_fingerprint(alert_labels(alert)))
                fault_t = fault_times.get((alert["node"], alert["gpu"]))
                seconds = round(arrived - fault_t, 3) if arrived is not None and fault_t is not None else None
                alerts_out.append(
                    {
                        "detector": alert["detector"],
                        "node": alert["node"],
                        "gpu": alert["gpu"],
                        "severity": alert["severity"],
                        "status": alert["status"],
                        "seconds_to_alert": seconds,
                        # The jobs the GPU slows, where its alert carries its stragglers (one page
                        # per fault: detectors/fold.py).
                        "slows": [
                            {"job": s["job"], "rank": s["rank"], "job_loss": s["job_loss"]}
                            for s in (alert.get("evidence") or {}).get("stragglers", [])
                        ],
                        "summary": alert["summary"],
                    }
                )
            summary = {"alerts": alerts_out, "samples_ingested": app.stats.gpu_samples + app.stats.host_samples}
        finally:
            stop_agents.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for a in agents:
                if a.nvml is not None:
                    a.nvml.close()
            await app.stop(grace_seconds=0.5)
    return summary


def print_summary(summary: dict, duration_seconds: float, out: TextIO) -> None:
    print(
        f"\n{summary['samples_ingested']} samples ingested in {duration_seconds:.0f} s "
        f"({summary['samples_ingested'] / duration_seconds:.0f}/s); alerts raised:",
        file=out,
    )
    for a in summary["alerts"]:
        took = "-" if a["seconds_to_alert"] is None else f"{a['seconds_to_alert']:.2f} s after the fault"
        print(
            f"  {a['severity']:<8} {a['detector']:<12} {a['node']} GPU {a['gpu']}: {a['summary']} "
            f"[{a['status']}; webhook {took}]",
            file=out,
        )


def run_demo(
    *,
    duration_seconds: float = 30.0,
    nodes: int = 4,
    gpus: int = 8,
    json_output: bool = False,
    tls: bool = False,
    http_listen: str = "127.0.0.1:0",
) -> dict:
    """Runs the demo and prints its summary; `tls`: mTLS between the agents and the collector;
    `http_listen`: where the collector's HTTP side (the fleet page, the API) listens."""
    # The agents and collector log to stderr; in the demo only problems are worth showing.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    live = None if json_output else sys.stdout
    with tempfile.TemporaryDirectory(prefix="fleetwatch-demo-") as tmp:
        summary = asyncio.run(_run(duration_seconds, nodes, gpus, live, Path(tmp), tls, http_listen))
    if json_output:
        for a in summary["alerts"]:
            a.pop("summary")
        print(json.dumps(summary))
    else:
        print_summary(summary, duration_seconds, sys.stdout)
    return summary
