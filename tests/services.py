"""Real Prometheus, Alertmanager and VictoriaMetrics for the tests that need them (Debian packages `.ci/run` installs).

A missing binary skips the test on a developer's machine and fails it under CI (CI set), so a
missing service is never silently green.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

STARTUP_SECONDS = 30.0


def binary(*names: str) -> str:
    """The first of `names` on PATH; skips (fails under CI) when none is."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    reason = f"{' or '.join(names)} not installed (apt-get install {package_for(names[0])}; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def package_for(name: str) -> str:
    return {
        "prometheus-alertmanager": "prometheus-alertmanager",
        "amtool": "prometheus-alertmanager",
        "victoria-metrics": "victoria-metrics",
    }.get(name, "prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: Any = None, method: str | None = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text else None


def wait_until_up(url: str, process: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise AssertionError(f"{what} did not answer {url} within {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running(argv: list[str], ready_url: str, log: Path, what: str) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(ready_url, process, log, what)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def alertmanager(config: Path, workdir: Path) -> Iterator[str]:
    """An Alertmanager on a free loopback port, clustering off; yields its base URL."""
    exe = binary("prometheus-alertmanager", "alertmanager")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        exe,
        f"--config.file={config}",
        f"--storage.path={workdir / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    with running(argv, f"{url}/-/ready", workdir / "alertmanager.log", "alertmanager"):
        yield url


@contextmanager
def prometheus(config: Path, workdir: Path, *extra: str) -> Iterator[str]:
    """A Prometheus on a free loopback port with its own data directory; yields its base URL.

    `extra` flags go on its command line (e.g. --web.enable-remote-write-receiver).
    """
    exe = binary("prometheus")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        exe,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'prom-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        *extra,
    ]
    with running(argv, f"{url}/-/ready", workdir / "prometheus.log", "prometheus"):
        yield url


@contextmanager
def victoria_metrics(workdir: Path, port: int = 0) -> Iterator[str]:
    """A single-node VictoriaMetrics on loopback (a free port unless given), data under `workdir`;
    yields its base URL. Started again with the same port and `workdir`, it has its data back.

    Queries see a sample as soon as it is stored (no -search.latencyOffset, no response cache).
    """
    exe = binary("victoria-metrics")
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        exe,
        f"-httpListenAddr=127.0.0.1:{port}",
        f"-storageDataPath={workdir / 'vm-data'}",
        "-search.latencyOffset=0s",
        "-search.disableCache",
        "-loggerLevel=WARN",
    ]
    with running(argv, f"{url}/health", workdir / "victoria-metrics.log", "victoria-metrics"):
        yield url
