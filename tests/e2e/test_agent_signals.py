"""A real agent process with every issue-3 source, streaming to a real collector process.

Kernel-log XIDs appended while it runs, InfiniBand from a fixture sysfs tree, step reports over its
socket, its own /metrics (with DCGM names); and a field the board does not support is absent
everywhere: the agent's sample, the collector's database, both /metrics and the status API.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fleetwatch.collector.storage.store import Store
from fleetwatch.stepreport import StepReporter
from tests.e2e.e2e_support import Collector, clean_env, free_port, wait_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
XID_LINE = "[Mon Nov 23 10:00:00 2026] NVRM: Xid (PCI:0000:18:00): 31, pid=4711, name=python3, Ch 00000008, intr 00000000. MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_0 faulted @ 0x7f8a_00000000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_READ\n"


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_agent_sources_reach_the_collector_and_metrics(tmp_path: Path) -> None:
    db, log = tmp_path / "c.db", tmp_path / "processes.log"
    collector = Collector(db, free_port(), free_port(), log)
    grpc_port = int(collector.args[collector.args.index("--grpc-listen") + 1].rsplit(":", 1)[1])
    kmsg = tmp_path / "kmsg.log"
    kmsg.write_text("[Mon Nov 23 09:59:00 2026] usb 1-1: new high-speed USB device number 2 using xhci_hcd\n")
    step_socket = tmp_path / "run" / "steps.sock"
    metrics_port = free_port()
    collector.start()
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetwatch.agent.main",
            "--config",
            "/dev/null",
            "--simulate",
            "--node",
            "n01",
            "--collector-address",
            f"127.0.0.1:{grpc_port}",
            "--sampling-interval-seconds",
            "0.2",
            "--batch-interval-seconds",
            "0.6",
            "--spool-dir",
            str(tmp_path / "spool"),
            "--no-spool-fsync",
            "--sysfs-root",
            str(FIXTURES / "sys"),
            "--kmsg-path",
            str(kmsg),
            "--step-socket",
            str(step_socket),
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            "--dcgm-names",
        ],
        env=clean_env(),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: step_socket.exists() and bool(rows(db, "SELECT count(*) FROM batches")[0][0]), 20, "samples")
        with kmsg.open("a") as f:
            f.write(XID_LINE)
        reporter = StepReporter(job="j7", rank=0, socket_path=str(step_socket))
        for step in range(5):
            reporter.report(step, 0.9 + step / 100)
        # A hybrid-parallel rank: its place in the job and the step's wall time reach the store.
        staged = StepReporter(job="j8", rank=5, socket_path=str(step_socket), dp_rank=1, pp_stage=2, tp_rank=1)
        staged.report(40, 0.8, wall_seconds=1.1)
        wait_for(lambda: rows(db, "SELECT count(*) FROM steps")[0][0] == 6, 10, "the step reports")
        assert rows(
            db, "SELECT rank, dp_rank, pp_stage, tp_rank, seconds, wall_seconds FROM steps WHERE job = 'j8'"
        ) == [(5, 1, 2, 1, 0.8, 1.1)]
        unplaced = "SELECT count(*) FROM steps WHERE job = 'j7' AND dp_rank IS NULL AND wall_seconds IS NULL"
        assert rows(db, unplaced) == [(5,)]
        wait_for(
            lambda: rows(db, "SELECT count(*) FROM events WHERE source = 'kmsg'")[0][0] == 1, 10, "the kernel-log XID"
        )

        (xid,) = rows(db, "SELECT xid, gpu, pci_bus_id FROM events WHERE source = 'kmsg'")
        assert xid == (31, 0, "0000:18:00.0")
        assert rows(db, "SELECT job, rank, step FROM steps ORDER BY step")[0] == ("j7", 0, 0)
        store = Store(f"sqlite:///{db}")
        try:
            assert len({port["device"] for port in store.ib_samples_since(0)}) >= 2
            assert not [s for s in store.gpu_samples_since(0) if "fan_percent" in s.metrics]
        finally:
            store.close()

        families = {f.name: f for f in text_string_to_metric_families(scrape(metrics_port))}
        assert "fleetwatch_gpu_temperature_celsius" in families and "DCGM_FI_DEV_GPU_TEMP" in families
        xid_samples = [s for s in families["fleetwatch_gpu_xid_errors"].samples if s.name.endswith("_total")]
        assert [(s.labels["xid"], s.value) for s in xid_samples] == [("31", 1.0)]

        # H100 SXM has no fan: nowhere a 0
        assert not [n for n in families if "fan" in n.lower()]
        status = json.loads(scrape(collector.http_port, "/api/v1/status"))
        gpu_metrics = status["nodes"][0]["gpus"][0]["metrics"]
        assert "fan_percent" not in gpu_metrics and "power_watts" in gpu_metrics
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            assert agent.wait(20) == 0
        finally:
            if agent.poll() is None:
                agent.kill()
            collector.stop()
            print(log.read_text()[-4000:])
