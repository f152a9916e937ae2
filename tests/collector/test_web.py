"""The collector's HTTP API as clients see it: routes, status codes, content types, gzip, formats."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.records import Finding


def _request(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class Client:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        # From a worker thread: the collector answers on this test's event loop.
        return await asyncio.to_thread(_request, self.base_url + path, headers or {})


def config_for(tmp_path: Path, http_listen: str = "127.0.0.1:0") -> CollectorConfig:
    return CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen=http_listen,
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        log_alerts=False,
        detect_interval_seconds=0.2,
    )


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[CollectorApp]:
    collector = CollectorApp(config_for(tmp_path))
    await collector.start()
    yield collector
    await collector.stop(grace_seconds=0.2)


@pytest.fixture
def client(app: CollectorApp) -> Client:
    return Client(f"http://127.0.0.1:{app.http_port}")


async def test_healthz(client: Client) -> None:
    status, headers, body = await client.get("/healthz")
    assert status == 200 and headers["Content-Type"] == "application/json"
    health = json.loads(body)
    assert health["ok"] is True and health["agents_connected"] == 0
    # Liveness only; the readiness facts ride along as last known (/readyz: tests/collector/test_readiness.py).
    assert set(health["readiness"]) == {"ready", "problems", "database", "ingest"}


async def test_unknown_path_is_a_json_404_naming_the_routes(client: Client) -> None:
    status, headers, body = await client.get("/api/v2/status")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "error": "no such path /api/v2/status; try /metrics, /healthz, /readyz, /api/v1/status, /api/v1/alerts"
    }


async def test_alerts_parameters(app: CollectorApp, client: Client) -> None:
    finding = Finding(
        detector="xid", severity="critical", action="reboot", summary="XID 79", start=1.0, node="n01", gpu=1, key="79"
    )
    await asyncio.to_thread(app.store.open_alert, finding, 1.0, [])
    status, headers, body = await client.get("/api/v1/alerts")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert [a["detector"] for a in json.loads(body)["alerts"]] == ["xid"]
    assert json.loads((await client.get("/api/v1/alerts?status=resolved"))[2]) == {"alerts": []}
    assert len(json.loads((await client.get("/api/v1/alerts?status=all&limit=1"))[2])["alerts"]) == 1
    # An empty value is the default, as before.
    assert len(json.loads((await client.get("/api/v1/alerts?status=&limit="))[2])["alerts"]) == 1

    status, _, body = await client.get("/api/v1/alerts?status=open")
    assert status == 400 and json.loads(body) == {"error": "status must be firing, resolved or all"}
    status, headers, body = await client.get("/api/v1/alerts?limit=ten")
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert "ten" in json.loads(body)["error"]


async def test_status_of_an_empty_fleet(client: Client) -> None:
    status, headers, body = await client.get("/api/v1/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"nodes": [], "alerts_firing": 0}


async def test_a_failing_query_is_a_json_503(app: CollectorApp, client: Client, monkeypatch) -> None:
    def broken(**_: object) -> list[dict]:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(app.store, "alerts", broken)
    status, headers, body = await client.get("/api/v1/alerts")
    assert status == 503 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": "collector could not answer: database is locked"}


async def test_metrics_text_by_default_gzip_when_asked(client: Client) -> None:
    status, headers, body = await client.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "Content-Encoding" not in headers
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"fleetwatch_collector_batches", "fleetwatch_collector_agents_connected"} <= names

    status, headers, body = await client.get("/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"fleetwatch_collector_batches_total" in gzip.decompress(body)


async def test_metrics_in_openmetrics_when_asked(client: Client) -> None:
    status, headers, body = await client.get(
        "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"}
    )
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    families = {f.name: f.type for f in openmetrics_families(body.decode())}
    assert families["fleetwatch_collector_batches"] == "counter"
    assert families["fleetwatch_collector_ingest_queue_batches"] == "gauge"


async def test_listens_on_an_ipv6_literal(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    collector = CollectorApp(config_for(tmp_path, http_listen="[::1]:0"))
    try:
        await collector.start()
    except OSError as exc:  # the kernel or the container has IPv6 off
        await collector.stop(grace_seconds=0.2)
        pytest.skip(f"cannot listen on ::1: {exc}")
    try:
        status, _, body = await Client(f"http://[::1]:{collector.http_port}").get("/healthz")
        assert status == 200 and json.loads(body)["ok"] is True
    finally:
        await collector.stop(grace_seconds=0.2)
