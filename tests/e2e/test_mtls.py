"""mTLS as an operator sets it up: fleetwatchctl certs, then collector and agent processes with the --tls-* flags."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.e2e_support import clean_env, free_port, wait_for


def ctl(*args: str, timeout_seconds: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        env=clean_env(),
    )


def empty_config(tmp_path: Path) -> Path:
    """A configuration file with no keys: each daemon runs on its defaults and the flags given."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


def node_rows(db: Path) -> list[tuple[str, int]]:
    """(node, stored batches) for every node the collector has recorded."""
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute(
                "SELECT nodes.node, (SELECT count(*) FROM batches WHERE batches.node = nodes.node) FROM nodes"
            ).fetchall()
    except sqlite3.OperationalError:  # not migrated yet
        return []


def agent_args(tmp_path: Path, certs: Path, grpc_port: int, node: str, cert: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fleetwatch.agent.main",
        "--config",
        str(empty_config(tmp_path)),
        "--simulate",
        "--sim-gpus",
        "2",
        "--node",
        node,
        "--collector-address",
        f"127.0.0.1:{grpc_port}",
        "--sampling-interval-seconds",
        "0.2",
        "--spool-dir",
        str(tmp_path / f"spool-{node}"),
        "--no-spool-fsync",
        "--metrics-listen",
        "",
        "--kmsg-path",
        "",
        "--step-socket",
        "",
        "--reconnect-max-seconds",
        "0.5",
        "--tls-ca-file",
        str(certs / "ca.crt"),
        "--tls-cert-file",
        str(certs / f"{cert}.crt"),
        "--tls-key-file",
        str(certs / f"{cert}.key"),
    ]


def test_nodes_stream_with_their_own_certificates_and_only_as_themselves(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    for args in (
        ["certs", "init", "--dir", str(certs)],
        ["certs", "issue", "collector", "--server", "--san", "127.0.0.1", "--dir", str(certs)],
        ["certs", "issue", "n01", "--dir", str(certs)],
    ):
        proc = ctl(*args)
        assert proc.returncode == 0, proc.stderr

    db, grpc_port = tmp_path / "c.db", free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("collector", "n01", "n02")}
    collector_args = [
        sys.executable,
        "-m",
        "fleetwatch.collector.main",
        "--config",
        str(empty_config(tmp_path)),
        "--grpc-listen",
        f"127.0.0.1:{grpc_port}",
        "--http-listen",
        f"127.0.0.1:{free_port()}",
        "--database-url",
        f"sqlite:///{db}",
        "--no-log-alerts",
        "--tls-cert-file",
        str(certs / "collector.crt"),
        "--tls-key-file",
        str(certs / "collector.key"),
        "--tls-client-ca-file",
        str(certs / "ca.crt"),
    ]
    procs = [
        subprocess.Popen(collector_args, env=clean_env(), stdout=logs["collector"].open("ab"), stderr=subprocess.STDOUT)
    ]
    try:
        for node in ("n01", "n02"):
            # n02's agent was handed n01's certificate: it connects, but may not speak for n02.
            args = agent_args(tmp_path, certs, grpc_port, node=node, cert="n01")
            procs.append(
                subprocess.Popen(args, env=clean_env(), stdout=logs[node].open("ab"), stderr=subprocess.STDOUT)
            )
        wait_for(lambda: any(n == "n01" and b >= 5 for n, b in node_rows(db)), 30, "n01's batches over mTLS")
        wait_for(lambda: "not for node 'n02'" in logs["n02"].read_text(), 20, "n02's agent to be refused")
        time.sleep(1.0)
        assert [n for n, _ in node_rows(db)] == ["n01"]
        agent_log = logs["n02"].read_text()
        assert "certificate is for 'n01', not for node 'n02'" in agent_log, agent_log[-2000:]
        assert "Hello for node 'n02' with a certificate for 'n01'" in logs["collector"].read_text()
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(20)


def test_the_collector_refuses_its_default_all_interfaces_listen_without_tls(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetwatch.collector.main",
            "--config",
            str(empty_config(tmp_path)),
            "--database-url",
            f"sqlite:///{tmp_path / 'c.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert proc.returncode == 2
    # Refused before it listened: nothing on 0.0.0.0 was ever bound.
    assert "grpc_listen 0.0.0.0:9470 and http_listen 0.0.0.0:9471: not a loopback address" in proc.stderr
    assert "insecure = true" in proc.stderr and "tls_cert_file, tls_key_file and tls_client_ca_file" in proc.stderr
    assert "collector listening" not in proc.stderr


def test_an_agent_with_a_missing_certificate_stops_at_start_naming_the_key(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert ctl("certs", "init", "--dir", str(certs)).returncode == 0
    args = agent_args(tmp_path, certs, free_port(), node="n01", cert="n01")  # n01.crt was never issued
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 2
    assert f"tls_cert_file: cannot read {certs / 'n01.crt'}" in proc.stderr


def test_demo_with_tls_raises_the_same_alerts_as_without() -> None:
    # The same expectations as tests/e2e/test_demo.py, with every agent on its own certificate.
    proc = ctl("demo", "--tls", "--duration", "20", "--json", timeout_seconds=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    alerts = summary["alerts"]
    xid = [a for a in alerts if a["detector"] == "xid"]
    assert len(xid) == 1, alerts
    assert (xid[0]["node"], xid[0]["gpu"], xid[0]["severity"]) == ("n02", 5, "critical")
    assert xid[0]["seconds_to_alert"] is not None and 0 <= xid[0]["seconds_to_alert"] <= 2
    thermal = [a for a in alerts if a["detector"] == "thermal"]
    assert len(thermal) == 1, alerts
    assert (thermal[0]["node"], thermal[0]["gpu"]) == ("n03", 2)
    assert {(a["node"], a["gpu"]) for a in alerts} == {("n02", 5), ("n03", 2)}, alerts
    assert summary["samples_ingested"] > 4 * 9 * 15
