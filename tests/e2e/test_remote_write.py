"""Remote write end to end: a collector forwarding a simulated agent to a real VictoriaMetrics and Prometheus.

One module fixture runs both receivers (Debian's victoria-metrics and prometheus, which `.ci/run`
installs; the tests fail without them under CI), a collector process with both in
`remote_write_urls`, and a simulated 4-GPU agent sampling every 0.5 s with a thermal slowdown on
GPU 2. The first test reads GPU 2's temperature back from each receiver's query API and from
the collector's own /api/v1/series: the same millisecond timestamps and values. The second stops
VictoriaMetrics for a minute (the issue's outage) while the agent keeps streaming: ingest goes
on, the collector stays ready, and once VictoriaMetrics is back on its port and data directory the
queue drains and the gap is filled.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.e2e_support import Collector, start_simulated_agent, wait_for
from tests.services import free_port, prometheus, victoria_metrics

NODE, GPU = "n01", 2
METRIC = "fleetwatch_gpu_temperature_celsius"
SELECTOR = f'{METRIC}{{node="{NODE}",gpu="{GPU}"}}'
OUTAGE_SECONDS = 60.0  # "with the receiver down for a minute" (the issue)


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Stack:
    work: Path
    prometheus: str
    vm_port: int
    collector: Collector
    agent: Popen | None = None
    vm: ExitStack = field(default_factory=ExitStack)

    @property
    def vm_url(self) -> str:
        return f"http://127.0.0.1:{self.vm_port}"

    def start_vm(self) -> None:
        self.vm = ExitStack()
        self.vm.enter_context(victoria_metrics(self.work, self.vm_port))

    def stop_vm(self) -> None:
        self.vm.close()

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.collector.http_port}"

    def stored(self, start: float | None = None) -> dict[int, float]:
        """GPU 2's temperature as the collector stored it (raw, the last hour or since `start`): ms -> value."""
        params: dict[str, Any] = {"node": NODE, "gpu": GPU, "field": "temp_gpu_celsius"}
        if start is not None:
            params["start"] = start
        status, body = get(f"{self.api}/api/v1/series?{urllib.parse.urlencode(params)}")
        if status == 404:  # the agent has not said Hello yet
            return {}
        assert status == 200, body
        answer = json.loads(body)
        assert answer["source"] == "raw"
        [series] = answer["series"]
        return {round(t * 1000): v for t, v in series["points"]}

    def in_prometheus(self) -> dict[int, float]:
        query = urllib.parse.urlencode({"query": f"{SELECTOR}[10m]", "time": time.time() + 1})
        status, body = get(f"{self.prometheus}/api/v1/query?{query}")
        assert status == 200, body
        result = json.loads(body)["data"]["result"]
        assert len(result) <= 1, result
        if not result:
            return {}
        assert result[0]["metric"]["uuid"].startswith("GPU-")
        return {round(float(t) * 1000): float(v) for t, v in result[0]["values"]}

    def in_victoria_metrics(self) -> dict[int, float]:
        query = urllib.parse.urlencode({"match[]": SELECTOR, "start": int(time.time() - 600)})
        status, body = get(f"{self.vm_url}/api/v1/export?{query}")
        assert status == 200, body
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        assert len(lines) <= 1, lines
        if not lines:
            return {}
        assert lines[0]["metric"]["uuid"].startswith("GPU-")
        return dict(zip(lines[0]["timestamps"], map(float, lines[0]["values"])))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = get(f"{self.api}/metrics")
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    def remote(self, name: str, url: str, **labels: str) -> float:
        """One of the collector's fleetwatch_remote_write_* values for the receiver at `url`."""
        want = {"url": url.rstrip("/") + "/...", **labels}
        return next(v for (n, got), v in self.metrics().items() if n == name and dict(got) == want)

    def stored_gpu_samples(self) -> float:
        return self.metrics()[("fleetwatch_collector_samples_total", (("kind", "gpu"),))]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("remote-write")
    config = work / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\n")  # receives only: nothing to scrape
    with ExitStack() as services:
        prom = services.enter_context(prometheus(config, work, "--web.enable-remote-write-receiver"))
        grpc_port, http_port = free_port(), free_port()
        stack = Stack(work, prom, free_port(), Collector(work / "collector.db", grpc_port, http_port, work / "c.log"))
        stack.start_vm()
        services.callback(stack.stop_vm)
        stack.collector.args += [
            "--remote-write-urls",
            f"{stack.vm_url}/api/v1/write,{prom}/api/v1/write",
            # Requests leave twice a second here (default 5 s), so the test reads back in seconds.
            "--remote-write-batch-send-deadline-seconds",
            "0.5",
        ]
        stack.collector.start()
        services.callback(stack.collector.stop)
        stack.agent = start_simulated_agent(
            work / "agent",
            NODE,
            grpc_port,
            free_port(),
            "--sim-gpus",
            "4",
            "--sim-faults",
            f"thermal_slowdown@{GPU}+2",
            "--batch-interval-seconds",
            "1",
            sampling_seconds=0.5,
        )
        services.callback(stack.agent.wait, 10)
        services.callback(stack.agent.terminate)
        yield stack


def same_points(stack: Stack, wanted: dict[int, float], read: Any, what: str, timeout: float) -> None:
    """Every point of `wanted` is in the receiver with its value, and the receiver has nothing else in that span."""
    got: dict[int, float] = {}

    def caught_up() -> bool:
        nonlocal got
        got = read()
        return max(wanted) in got

    wait_for(caught_up, timeout, f"{what} to hold the collector's newest point")
    span = {ms: v for ms, v in got.items() if min(wanted) <= ms <= max(wanted)}
    assert span == wanted, (
        f"{what}: missing {sorted(set(wanted) - set(span))[:5]}, extra {sorted(set(span) - set(wanted))[:5]}"
    )


def test_both_receivers_hold_what_the_collector_stored(stack: Stack) -> None:
    wait_for(lambda: len(stack.stored()) >= 16, 30, "8 s of GPU 2's temperature in the collector")
    stored = stack.stored()
    assert len(set(stored.values())) > 1  # the thermal fault moves it: a real comparison
    same_points(stack, stored, stack.in_victoria_metrics, "VictoriaMetrics", 20)
    same_points(stack, stored, stack.in_prometheus, "Prometheus", 20)
    assert stack.remote("fleetwatch_remote_write_samples_total", stack.prometheus, result="sent") > 0


def test_a_minute_without_victoria_metrics_loses_nothing(stack: Stack) -> None:
    stack.stop_vm()
    down_at = time.time()
    before = stack.stored_gpu_samples()
    ready = []
    while time.time() - down_at < OUTAGE_SECONDS:
        time.sleep(5)
        status, body = get(f"{stack.api}/readyz")
        ready.append(status)
        assert status == 200, body  # ingest is not held up by a dead receiver
    during = stack.stored_gpu_samples()
    assert during > before + 4 * 2 * (OUTAGE_SECONDS - 10)  # 4 GPUs at 2 Hz went on being stored
    retried = stack.remote("fleetwatch_remote_write_samples_total", stack.vm_url, result="retried")
    queued = stack.remote("fleetwatch_remote_write_queue_samples", stack.vm_url)
    assert retried > 0 and queued > 0

    stack.start_vm()
    up_at = time.time()
    wanted = {ms: v for ms, v in stack.stored(start=down_at - 10).items() if ms <= up_at * 1000}
    same_points(stack, wanted, stack.in_victoria_metrics, "VictoriaMetrics after its outage", 30)
    caught_up_seconds = time.time() - up_at
    # Drained: at most what a second of this agent queues (4 GPUs x ~50 fields x 2 cycles) remains.
    wait_for(
        lambda: stack.remote("fleetwatch_remote_write_queue_samples", stack.vm_url) < 1000, 15, "the queue to drain"
    )
    assert stack.remote("fleetwatch_remote_write_samples_dropped_total", stack.vm_url, reason="queue_full") == 0
    # Prometheus was never down: it has the outage's minute too.
    same_points(stack, wanted, stack.in_prometheus, "Prometheus", 20)
    print(
        f"outage {OUTAGE_SECONDS:.0f} s: {retried:.0f} samples retried, {queued:.0f} queued at its end, "
        f"caught up {caught_up_seconds:.1f} s after VictoriaMetrics came back"
    )
