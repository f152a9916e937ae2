"""A second `fleetwatch-agent` on a spool directory another agent holds exits at start, naming both."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.e2e_support import clean_env, free_port, wait_for


def agent_command(spool: Path, port: int) -> list[str]:
    config = spool.parent / "agent.toml"
    config.write_text("# everything from the flags\n")  # not /etc/fleetwatch/agent.toml, whatever it holds
    return [
        sys.executable,
        "-m",
        "fleetwatch.agent.main",
        "--config",
        str(config),
        "--simulate",
        "--sim-gpus",
        "1",
        "--node",
        "n01",
        "--collector-address",
        f"127.0.0.1:{port}",  # nothing listens: the agent spools and retries
        "--spool-dir",
        str(spool),
        "--no-spool-fsync",
        "--metrics-listen",
        "",
        "--step-socket",
        "",
        "--kmsg-path",
        "",
        "--stop-drain-seconds",
        "0",
    ]


def test_a_second_agent_on_the_same_spool_exits_with_the_lock_error(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    command = agent_command(spool, free_port())
    first = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list(spool.glob("*.batch")), 20, "the first agent to spool a batch")
        started = time.monotonic()
        second = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert f"spool directory {spool} is in use by another fleetwatch agent (pid {first.pid})" in second.stderr
        assert time.monotonic() - started < 20  # at start, not after sampling or connecting
        assert first.poll() is None  # the first agent goes on untouched
        seq_state = int((spool / "seq.state").read_text())
        wait_for(lambda: int((spool / "seq.state").read_text()) > seq_state, 10, "the first agent to keep sampling")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
    # Released with its holder: a new agent takes the directory over.
    third = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert third.poll() is None, third.stderr.read() if third.stderr else ""
    finally:
        third.send_signal(signal.SIGTERM)
        assert third.wait(20) == 0
