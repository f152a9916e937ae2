"""HTTP answers stay whole while detection opens and closes hundreds of findings every pass."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.detectors import default_detectors
from fleetwatch.detectors.model import Window
from fleetwatch.records import Finding

FINDINGS_PER_PASS = 300
CLIENT_THREADS = 4
HAMMER_SECONDS = 3.0
MAX_REQUESTS_PER_CLIENT = 1000
# Python's default 5 ms lets a thread run that long between switches, so a race between a request
# thread and the loop shows once in many minutes; switching every 10 us shows it within seconds.
SWITCH_INTERVAL_SECONDS = 1e-5
PATHS = ("/metrics", "/api/v1/status", "/api/v1/alerts?status=all&limit=50")


class ChurnDetector:
    """Finds a new set of FINDINGS_PER_PASS findings every pass, so each pass opens and closes that many."""

    id = "churn"
    window_seconds = 60.0

    def __init__(self) -> None:
        self.passes = 0

    def detect(self, window: Window) -> list[Finding]:
        self.passes += 1
        return [
            Finding(
                detector=self.id,
                severity=("info", "warning", "critical")[i % 3],
                action="none",
                summary=f"churn {self.passes}/{i}",
                start=window.now,
                node=f"n{i % 16:02d}",
                gpu=i % 8,
                key=f"{self.passes}-{i}",
            )
            for i in range(FINDINGS_PER_PASS)
        ]


def parse(path: str, body: bytes) -> None:
    """Raises unless the body is what the path serves."""
    if path == "/metrics":
        names = {family.name for family in text_string_to_metric_families(body.decode())}
        assert "fleetwatch_alerts_firing" in names
    elif path == "/api/v1/status":
        assert isinstance(json.loads(body)["alerts_firing"], int)
    else:
        assert isinstance(json.loads(body)["alerts"], list)


def hammer(port: int, client: int, deadline: float) -> tuple[int, list[str]]:
    """GETs the paths in turn until the deadline; returns (answers, problems)."""
    answers, problems = 0, []
    for i in range(MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= deadline:
            break
        path = PATHS[(client + i) % len(PATHS)]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                assert response.status == 200, response.status
                parse(path, response.read())
            answers += 1
        except urllib.error.HTTPError as exc:
            problems.append(f"{path}: {exc.code} {exc.read()[:200]!r}")
        except Exception as exc:  # every kind of failure is a finding of this test
            problems.append(f"{path}: {exc!r}")
    return answers, problems


@pytest.fixture
def fine_thread_switching():
    default_seconds = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    yield
    sys.setswitchinterval(default_seconds)


async def test_answers_stay_whole_while_detection_churns_findings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fine_thread_switching: None
) -> None:
    """The detection loop changes tracker.open in place on every pass.

    An HTTP server in its own thread that iterates it (as the collector's did) meets "dictionary
    changed size during iteration" and answers 503, dozens of times in these three seconds;
    served from the event loop, every answer is 200 and parses.
    """
    churn = ChurnDetector()
    config = CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        log_alerts=False,
        detect_interval_seconds=0.01,
    )
    app = CollectorApp(config, detectors=[*default_detectors(), churn])
    # Alert rows are not what this is about, and at a database transaction each, 600 transitions
    # would stretch a pass to a second: without them a pass, and a change of tracker.open, comes
    # every few milliseconds.
    monkeypatch.setattr(app.store, "open_alert", lambda finding, now, targets: 0)
    monkeypatch.setattr(app.store, "resolve_alert", lambda fingerprint, end, now, targets: None)
    await app.start()
    loop = asyncio.get_running_loop()
    try:
        passes_before = churn.passes
        deadline = time.monotonic() + HAMMER_SECONDS
        # Own threads: the collector's database work needs the default executor meanwhile.
        with ThreadPoolExecutor(CLIENT_THREADS) as clients:
            results = await asyncio.gather(
                *(loop.run_in_executor(clients, hammer, app.http_port, c, deadline) for c in range(CLIENT_THREADS))
            )
        passes = churn.passes - passes_before
    finally:
        await app.stop(grace_seconds=0.2)

    problems = [p for _, client_problems in results for p in client_problems]
    assert not problems, problems[:5]
    answers = sum(n for n, _ in results)
    assert answers >= CLIENT_THREADS * len(PATHS), answers
    # Detection really changed tracker.open while the clients asked: each pass is 300 opens and 300 closes.
    assert passes >= 10, passes
    assert app.tracker.stats[churn.id].errors == 0
