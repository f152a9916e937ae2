"""Agents that know two collectors on one PostgreSQL: one collector stopped (SIGTERM, it drains) or
killed (SIGKILL), its agents move to the other within seconds, and every batch is stored exactly once."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url

from fleetwatch.collector.storage.store import Store
from tests.collector.conftest import pg_admin_engine  # noqa: F401  (the fixture, found by name)
from tests.e2e.e2e_support import Collector, free_port, kill_leftovers, start_simulated_agent, stop_agents, wait_for

NODES = ("f01", "f02", "f03", "f04")
# What the issue asks of a move: the agents of a stopped or killed collector stream to the other
# within this. (Measured on a 2-core box: 0.2 s after SIGTERM, 0.7 s after SIGKILL, which waits
# out the first reconnect backoff, 0.25-0.5 s at the default reconnect_min_seconds.)
MOVE_SECONDS = 10.0
# Batches of 2 cycles of 0.2 s: a few a second per agent, so every phase has batches in flight.
AGENT_FLAGS = (
    "--sim-gpus",
    "2",
    "--batch-interval-seconds",
    "0.4",
    "--stop-drain-seconds",
    "30",
    "--step-socket",
    "",
)


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A schema of its own on the test PostgreSQL (tests/collector/conftest.py), shared by both collectors."""
    base_url, admin = request.getfixturevalue("pg_admin_engine")
    schema = f"fw_failover_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def streams_to(metrics_port: int) -> str | None:
    """The collector address the agent streams to, from its /metrics (None while it is not connected)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1) as r:
            body = r.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(body):
        if family.name == "fleetwatch_agent_collector_info":
            for sample in family.samples:
                return sample.labels["address"]
    return None


@pytest.mark.postgres
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm-drains", "sigkill"])
def test_agents_move_to_the_other_collector_and_every_batch_is_stored_once(
    tmp_path: Path, pg_url: str, how: signal.Signals
) -> None:
    log = tmp_path / "collectors.log"
    collectors = [Collector(pg_url, free_port(), free_port(), log) for _ in range(2)]
    ports = [int(c.args[c.args.index("--grpc-listen") + 1].rsplit(":", 1)[1]) for c in collectors]
    address = {port: f"127.0.0.1:{port}" for port in ports}
    for collector in collectors:  # one after the other: the first migrates the shared schema
        collector.start()
    metrics = {node: free_port() for node in NODES}
    agents: dict[str, subprocess.Popen] = {}
    try:
        for node in NODES:
            agents[node] = start_simulated_agent(
                tmp_path / node, node, ports, metrics[node], *AGENT_FLAGS, sampling_seconds=0.2
            )
        wait_for(lambda: all(streams_to(metrics[n]) is not None for n in NODES), 20, "every agent to connect")
        where = {node: streams_to(metrics[node]) for node in NODES}
        # The node-hashed start spreads the agents; the victim is the collector most of them chose.
        victim_port = max(ports, key=lambda port: sum(a == address[port] for a in where.values()))
        (survivor_port,) = set(ports) - {victim_port}
        movers = [node for node, a in where.items() if a == address[victim_port]]
        victim = collectors[ports.index(victim_port)]
        time.sleep(1.5)  # batches flow to both collectors for a while

        signalled_at = time.monotonic()
        assert victim.proc is not None
        victim.proc.send_signal(how)
        wait_for(
            lambda: all(streams_to(metrics[n]) == address[survivor_port] for n in movers),
            MOVE_SECONDS,
            f"agents {movers} to move to the surviving collector after {how.name}",
        )
        moved_after = time.monotonic() - signalled_at
        print(f"{how.name}: {len(movers)} agents moved to the other collector in {moved_after:.2f} s")
        assert victim.proc.wait(20) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
        time.sleep(1.0)  # and go on streaming there

        stop_agents(agents)
    finally:
        kill_leftovers(agents)
        for collector in collectors:
            collector.stop()
        print(log.read_text()[-4000:])
        for node in NODES:
            agent_log = tmp_path / node / "agent.log"
            if agent_log.exists():
                print(f"--- {node}\n" + agent_log.read_text()[-1500:])

    store = Store(pg_url)
    try:
        for node in NODES:
            spool = tmp_path / node / "spool"
            produced = int((spool / "seq.state").read_text())
            assert not list(spool.glob("*.batch")), f"agent {node} stopped with un-acked batches"
            # (node, boot_id, seq) is the batches' key: one boot here, so each seq once, and all of them.
            assert store.stored_seqs(node) == list(range(1, produced + 1)), f"{node}: not exactly 1..{produced}"
    finally:
        store.close()
