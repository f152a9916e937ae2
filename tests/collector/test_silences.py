"""Silences without Alertmanager: `fleetwatchctl silence`, kept in the database, hold deliveries back, not alerts."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select

from fleetwatch.collector.storage import schema
from fleetwatch.ctl.main import fetch_json
from fleetwatch.ctl.main import main as ctl
from tests.collector.test_collector_app import exchange, get, hello
from tests.collector.test_webhook_fidelity import Receiver, eventually, start, xid_batch

ADMIN = "admin-token-3b1d"
READ = "read-token-8c2e"


def run_ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ctl(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def deliveries(tmp_path: Path) -> list[tuple[int | None, str, str | None]]:
    """(gpu, state, last_error) of every delivery, oldest first."""
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    d, a = schema.deliveries, schema.alerts
    with engine.connect() as conn:
        rows = conn.execute(
            select(a.c.gpu, d.c.state, d.c.last_error).join(a, a.c.id == d.c.alert_id).order_by(d.c.id)
        ).all()
    engine.dispose()
    return [tuple(row) for row in rows]


async def test_silenced_gpu_alerts_are_recorded_and_shown_but_not_delivered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receiver = Receiver()
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN + "\n")
    app = await start(
        tmp_path,
        webhook_urls=[receiver.url],
        webhook_group_wait_seconds=0.0,
        api_read_token=READ,
        api_admin_token=ADMIN,
    )
    base = f"http://127.0.0.1:{app.http_port}"

    def silence(*argv: str) -> tuple[int, str, str]:
        return run_ctl(capsys, "--collector", base, "--token-file", str(token_file), "silence", *argv)

    try:
        code, out, _ = await asyncio.to_thread(
            silence, "add", "--node", "n01", "--gpu", "1", "--for", "2h", "--comment", "RMA 4711", "--json"
        )
        assert code == 0
        added = json.loads(out)
        assert (added["node"], added["gpu"], added["detector"], added["state"]) == ("n01", 1, None, "active")
        assert added["ends_at"] - added["starts_at"] == 7200 and added["comment"] == "RMA 4711"
        assert "@" in added["created_by"]

        await exchange(app.grpc_port, [hello(), xid_batch("n01", 1, [(1, 48), (0, 48)])], expect=2)
        await eventually(lambda: len(receiver.posts) >= 1, 10, "GPU 0's alert delivered")
        await eventually(lambda: app.outbox.total("silenced") >= 1, 10, "GPU 1's delivery silenced")
        await asyncio.sleep(0.3)

        # Recorded and shown, with the silence that holds it.
        code, out, _ = await asyncio.to_thread(
            run_ctl, capsys, "--collector", base, "--token-file", str(token_file), "alerts"
        )
        assert code == 0 and f"[silenced by {added['id']}]" in out
        shown = (await asyncio.to_thread(fetch_json, base, "/api/v1/alerts", token=READ))["alerts"]
        silenced_by = {a["gpu"]: a["silenced_by"] for a in shown if a["detector"] == "xid"}
        assert silenced_by == {1: added["id"], 0: None}

        code, out, _ = await asyncio.to_thread(silence, "list")
        assert code == 0 and "RMA 4711" in out and "active" in out

        code, out, _ = await asyncio.to_thread(silence, "expire", str(added["id"]), "--json")
        assert code == 0 and json.loads(out)["state"] == "expired"
        code, out, _ = await asyncio.to_thread(silence, "list")
        assert "no silences" in out
        code, out, _ = await asyncio.to_thread(silence, "list", "--all")
        assert "RMA 4711" in out and "expired" in out

        # Expired: the next alert on GPU 1 (another XID) is delivered.
        await exchange(app.grpc_port, [hello(), xid_batch("n01", 2, [(1, 63)])], expect=2)
        await eventually(lambda: len(receiver.posts) >= 2, 10, "GPU 1's new alert delivered")
        metrics_text = await get(f"{base}/metrics")
    finally:
        await app.stop(grace_seconds=0.2)
        receiver.close()

    delivered_gpus = [int(a["labels"]["gpu"]) for p in receiver.posts for a in p.body["alerts"]]
    assert sorted(delivered_gpus) == [0, 1] and receiver.posts[-1].body["alerts"][0]["labels"]["xid"] == "63"
    states = deliveries(tmp_path)
    assert (1, "silenced", f"silenced by silence {added['id']}") in states
    assert [s for s in states if s[1] == "sent"] == [(0, "sent", None), (1, "sent", None)]
    target = f"webhook:{receiver.url.rsplit('/', 1)[0]}/...#"
    silenced = [
        s.value
        for f in text_string_to_metric_families(metrics_text)
        for s in f.samples
        if s.name == "fleetwatch_alert_deliveries_total"
        and s.labels["result"] == "silenced"
        and s.labels["target"].startswith(target)
    ]
    assert silenced == [1.0]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"gpu": 0, "seconds": 60, "comment": "x"}, "node: required"),
        ({"node": "n01", "seconds": 60}, "comment: required"),
        ({"node": "n01", "comment": "x"}, "seconds: required"),
        ({"node": "n01", "seconds": -5, "comment": "x"}, "seconds: required"),
        ({"node": "n01", "seconds": 60, "comment": "x", "detector": "xdi"}, "detector: 'xdi' is not one of"),
        ({"node": "n01", "seconds": 60, "comment": "x", "gpu": 99}, "gpu: must be a GPU index"),
        ({"node": "n 01", "seconds": 60, "comment": "x"}, "node: "),
        ({"node": "n01", "seconds": 60, "comment": "x", "matchers": []}, "unknown field 'matchers'"),
    ],
)
async def test_a_bad_silence_is_refused_naming_the_field(tmp_path: Path, body: dict[str, Any], error: str) -> None:
    app = await start(tmp_path)
    try:
        answer = await asyncio.to_thread(_post, f"http://127.0.0.1:{app.http_port}/api/v1/silences", body, None)
    finally:
        await app.stop(grace_seconds=0.2)
    assert answer[0] == 400 and error in answer[1]["error"], answer


async def test_changing_silences_needs_the_admin_token(tmp_path: Path) -> None:
    app = await start(tmp_path, api_read_token=READ, api_admin_token=ADMIN)
    url = f"http://127.0.0.1:{app.http_port}/api/v1/silences"
    body = {"node": "n01", "seconds": 60, "comment": "maintenance"}
    try:
        refused = await asyncio.to_thread(_post, url, body, READ)
        created = await asyncio.to_thread(_post, url, body, ADMIN)
    finally:
        await app.stop(grace_seconds=0.2)
    assert refused[0] == 403
    assert created[0] == 201 and created[1]["node"] == "n01" and created[1]["state"] == "active"


def _post(url: str, body: Any, token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_silence_add_without_a_collector_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_ctl(
        capsys, "--collector", "http://127.0.0.1:9", "silence", "add", "--node", "n1", "--for", "1h", "--comment", "x"
    )
    assert code == 1 and "cannot reach the collector" in err


def test_silence_add_refuses_a_bad_duration(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_ctl(capsys, "silence", "add", "--node", "n1", "--for", "soon", "--comment", "x")
    assert code == 1 and "--for" in err
