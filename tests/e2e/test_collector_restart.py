"""Kill the collector (SIGKILL) and restart it while two agents stream: every batch stored exactly once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from fleetwatch.collector.storage.store import Store
from tests.e2e.e2e_support import Collector, clean_env, free_port, kill_leftovers, stop_agents, wait_for

GPUS = 4


def start_agent(node: str, grpc_port: int, spool: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetwatch.agent.main",
            "--config",
            "/dev/null",
            "--simulate",
            "--node",
            node,
            "--sim-gpus",
            str(GPUS),
            "--collector-address",
            f"127.0.0.1:{grpc_port}",
            "--sampling-interval-seconds",
            "0.1",
            # Three cycles a batch: the dense form, through every kill.
            "--batch-interval-seconds",
            "0.3",
            "--spool-dir",
            str(spool),
            "--no-spool-fsync",
            "--reconnect-min-seconds",
            "0.1",
            "--reconnect-max-seconds",
            "0.5",
            "--stop-drain-seconds",
            "30",
            "--metrics-listen",
            "",
            "--step-socket",
            "",
            "--kmsg-path",
            "",
        ],
        env=clean_env(),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def stored_batches(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM batches").fetchone()[0]


def test_every_batch_stored_exactly_once_across_collector_kills(tmp_path: Path) -> None:
    db = tmp_path / "collector.db"
    log = tmp_path / "processes.log"
    collector = Collector(db, free_port(), free_port(), log)
    grpc_port = int(collector.args[collector.args.index("--grpc-listen") + 1].rsplit(":", 1)[1])
    collector.start()
    spools = {node: tmp_path / f"spool-{node}" for node in ("a1", "a2")}
    agents = {node: start_agent(node, grpc_port, spool, log) for node, spool in spools.items()}
    try:
        wait_for(lambda: collector.agents_connected() == 2, 20, "both agents to connect")
        for _ in range(2):
            wait_for(lambda: stored_batches(db) > 20, 20, "batches to be stored")
            collector.kill()
            time.sleep(1.5)  # agents keep sampling into their spools meanwhile
            before = stored_batches(db)
            collector.start()
            wait_for(lambda before=before: stored_batches(db) > before + 20, 20, "the spooled backlog to arrive")
        stop_agents(agents)
    finally:
        kill_leftovers(agents)
        collector.stop()
        print(log.read_text()[-5000:])

    store = Store(f"sqlite:///{db}")
    try:
        samples_of: dict[str, list[tuple[int, float]]] = {}
        for sample in store.gpu_samples_since(0):
            samples_of.setdefault(sample.node, []).append((sample.gpu, sample.t))
        for node, spool in spools.items():
            produced = int((spool / "seq.state").read_text())
            assert not list(spool.glob("*.batch")), f"agent {node} stopped with un-acked batches"
            seqs = store.stored_seqs(node)
            assert seqs == list(range(1, produced + 1)), f"{node}: stored seqs are not exactly 1..{produced}"
            samples = samples_of.get(node, [])
            assert len(samples) == len(set(samples)), f"{node}: a GPU sample stored twice"
            # Each batch one cycle or more (the first, before the Welcome, alone; then up to three).
            assert len(samples) >= GPUS * produced, f"{node}: {len(samples)} GPU samples in {produced} batches"
    finally:
        store.close()
