"""Helpers for the end-to-end tests: real collector and agent processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}


def wait_for(predicate, timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")


class Collector:
    def __init__(self, db: Path | str, grpc_port: int, http_port: int, log: Path) -> None:
        """`db`: a SQLite file, or a database URL (str), e.g. several collectors' PostgreSQL."""
        self.args = [
            sys.executable,
            "-m",
            "fleetwatch.collector.main",
            "--config",
            "/dev/null",
            "--grpc-listen",
            f"127.0.0.1:{grpc_port}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--database-url",
            db if isinstance(db, str) else f"sqlite:///{db}",
            "--no-log-alerts",
        ]
        self.http_port = http_port
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, env=clean_env(), stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(self.healthy, 20, "the collector to answer /healthz")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as r:
                return json.load(r)["ok"]
        except OSError:
            return False

    def agents_connected(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as r:
            return json.load(r)["agents_connected"]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


def stop_agents(agents: dict[str, subprocess.Popen]) -> None:
    """SIGTERM every agent (each drains its spool), then each must exit 0 within 40 s."""
    for proc in agents.values():
        proc.send_signal(signal.SIGTERM)
    for node, proc in agents.items():
        assert proc.wait(40) == 0, f"agent {node} exited with {proc.returncode}"


def kill_leftovers(agents: dict[str, subprocess.Popen]) -> None:
    """In a test's finally: agents still running after a failure are killed and reaped."""
    for proc in agents.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def start_simulated_agent(
    state: Path,
    node: str,
    grpc_port: int | list[int],
    metrics_port: int,
    *extra: str,
    sampling_seconds: float = 0.5,
) -> subprocess.Popen:
    """`fleetwatch-agent --simulate` with its spool, kernel log and step socket under `state`,
    streaming to a collector on `grpc_port` (nothing need listen there; a list: several
    collectors, one at a time) and serving /metrics."""
    ports = grpc_port if isinstance(grpc_port, list) else [grpc_port]
    state.mkdir(parents=True, exist_ok=True)
    (state / "kmsg").touch()
    argv = [
        sys.executable,
        "-m",
        "fleetwatch.agent.main",
        "--config",
        "/dev/null",
        "--simulate",
        "--node",
        node,
        "--collector-address",
        ",".join(f"127.0.0.1:{port}" for port in ports),
        "--sampling-interval-seconds",
        str(sampling_seconds),
        "--spool-dir",
        str(state / "spool"),
        "--no-spool-fsync",
        "--kmsg-path",
        str(state / "kmsg"),
        "--step-socket",
        str(state / "steps.sock"),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        *extra,
    ]
    log = (state / "agent.log").open("wb")
    return subprocess.Popen(argv, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
