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
        "error": "no such path /api/v2/status; try /metrics, /healthz, /readyz, /api/v1/status, /api/v1/alerts, "
        "/api/v1/series, /api/v1/silences, /runbooks/<detector>"
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

    # One alert by id, with the span of telemetry worth looking at (10 min before, open-ended while firing).
    [listed] = json.loads((await client.get("/api/v1/alerts"))[2])["alerts"]
    status, _, body = await client.get(f"/api/v1/alerts/{listed['id']}")
    assert status == 200 and json.loads(body) == listed
    assert listed["evidence"]["span"] == {"start": 1.0 - 600, "end": None}
    status, _, body = await client.get("/api/v1/alerts/999")
    assert status == 404 and json.loads(body) == {"error": "no alert with id 999"}
    status, _, body = await client.get("/api/v1/alerts/x1")
    assert status == 400 and "alert id" in json.loads(body)["error"]

    status, _, body = await client.get("/api/v1/alerts?status=open")
    assert status == 400 and json.loads(body) == {"error": "status must be firing, resolved or all"}
    status, headers, body = await client.get("/api/v1/alerts?limit=ten")
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert "ten" in json.loads(body)["error"]


async def test_status_of_an_empty_fleet(client: Client) -> None:
    status, headers, body = await client.get("/api/v1/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert (answer["nodes"], answer["alerts_firing"]) == ([], 0)
    # The collectors sharing the database: this one alone, alive, doing every fleet-wide duty.
    (collector,) = answer["collectors"]
    assert collector["self"] and collector["alive"]
    assert collector["leases"] == ["alerts", "fleet_detection", "retention"]
    assert {lease["name"] for lease in answer["leases"]} == set(collector["leases"])


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


async def test_series_answers_raw_samples_and_names_bad_parameters(app: CollectorApp, client: Client) -> None:
    from fleetwatch.collector.storage.store import IngestBatch
    from fleetwatch.records import GpuSample

    now = app.clock()
    items = [
        IngestBatch(
            node="n01",
            boot_id="b",
            seq=i + 1,
            received_at=now - 100 + i,
            gpu_samples=[GpuSample(t=now - 100 + i, node="n01", gpu=3, metrics={"sm_clock_mhz": 1980.0 - i})],
        )
        for i in range(10)
    ]
    await asyncio.to_thread(app.store.upsert_node, "n01", "b", "test", True, 1.0, [], now)
    await asyncio.to_thread(app.store.ingest, items)
    status, headers, body = await client.get(f"/api/v1/series?node=n01&gpu=3&field=sm_clock_mhz&start={now - 200}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert answer["source"] == "raw" and answer["gpu"] == 3 and answer["step"] is None
    assert answer["series"] == [{"field": "sm_clock_mhz", "points": [[now - 100 + i, 1980.0 - i] for i in range(10)]}]
    status, _, body = await client.get(f"/api/v1/series?node=n01&gpu=3&start={now - 200}&step=5")
    stepped = json.loads(body)
    [clock] = [s for s in stepped["series"] if s["field"] == "sm_clock_mhz"]
    assert stepped["step"] == 5.0 and sum(len(s["points"]) for s in [clock]) in (2, 3)

    for query, problem in [
        ("gpu=3", "node: required"),
        ("node=n01&gpu=99", "gpu:"),
        ("node=n01&gpu=3&field=nope", "field: nope is not a gpu field"),
        ("node=n01&start=abc", "start:"),
        ("node=n01&step=-1", "step:"),
    ]:
        status, _, body = await client.get(f"/api/v1/series?{query}")
        assert status == 400 and json.loads(body)["error"].startswith(problem), query
    status, _, body = await client.get("/api/v1/series?node=nobody")
    assert status == 404 and "nobody" in json.loads(body)["error"]
