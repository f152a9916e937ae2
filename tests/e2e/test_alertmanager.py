"""fleetwatch with a real Alertmanager (the Debian package, 0.25) as its router, on the shipped configuration.

The collector posts its alert feed to Alertmanager's API v2; Alertmanager notifies a loopback
receiver through the routes of deploy/alertmanager/alertmanager.yml (receivers pointed at it, the
waits shortened, resolve_timeout cut to 3 s so that outliving it takes seconds).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.notify.alertmanager import postable_alerts
from fleetwatch.collector.notify.base import AlertLinks, labels_fingerprint
from fleetwatch.v1 import telemetry_pb2 as pb
from tests.collector.test_collector_app import exchange
from tests.collector.test_webhook_fidelity import Receiver, eventually, start, xid_batch
from tests.services import alertmanager, binary, http_json

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RESOLVE_TIMEOUT_SECONDS = 3
RESEND_SECONDS = 0.5


def hello(node: str, boot_id: str = "boot-1") -> pb.AgentMessage:
    # A minute between samples: node_silent (which inhibits the node's alerts) stays quiet for minutes.
    msg = pb.Hello(node=node, boot_id=boot_id, agent_version="test", sampling_interval_seconds=60.0, t=time.time())
    msg.nvml_available = True
    for i in range(2):
        msg.gpus.add(
            index=i, uuid=f"GPU-{node}-{i}", name="NVIDIA H100 80GB HBM3", pci_bus_id=f"0000:{0x18 + i:02x}:00.0"
        )
    return pb.AgentMessage(hello=msg)


def shortened_config(tmp_path: Path, receiver_url: str) -> Path:
    """The shipped configuration with its receivers pointed at the test's and its waits in seconds."""
    config = yaml.safe_load(SHIPPED.read_text())
    config["global"]["resolve_timeout"] = f"{RESOLVE_TIMEOUT_SECONDS}s"
    for route in [config["route"], *config["route"]["routes"]]:
        route.update(group_wait="1s", group_interval="1s")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = hook["url"].replace("http://127.0.0.1:5001", receiver_url)
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def am(tmp_path: Path, receiver: Receiver) -> Iterator[str]:
    with alertmanager(shortened_config(tmp_path, receiver.url.rsplit("/", 1)[0]), tmp_path) as url:
        yield url


def am_alerts(url: str, **filters: str) -> list[dict[str, Any]]:
    query = "&".join(f"filter={k}%3D%22{v}%22" for k, v in filters.items())
    return http_json(f"{url}/api/v2/alerts?{query}")


def notified(receiver: Receiver, path: str) -> list[dict[str, Any]]:
    """Alerts Alertmanager sent to one receiver (by its URL path), each with the notification's status."""
    return [alert for post in receiver.posts if post.path == path for alert in post.body["alerts"]]


def amtool(url: str, *argv: str) -> str:
    result = subprocess.run(
        [binary("amtool"), f"--alertmanager.url={url}", *argv], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def route_for(*labels: str) -> str:
    result = subprocess.run(
        [binary("amtool"), "config", "routes", "test", f"--config.file={SHIPPED}", *labels],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def test_xid_alerts_live_in_alertmanager_and_resolve_with_fleetwatch(
    tmp_path: Path, am: str, receiver: Receiver
) -> None:
    # Silenced with amtool before the XID arrives: Alertmanager must hold its notification back.
    silence_id = (
        await asyncio.to_thread(amtool, am, "silence", "add", "node=n01", "xid=63", "--comment=RMA 4711")
    ).strip()
    app: CollectorApp = await start(
        tmp_path,
        alertmanager_urls=[am],
        alertmanager_resend_seconds=RESEND_SECONDS,
        external_url="http://collector.example:9471",
    )
    try:
        # XID 79 (fallen off the bus) and XID 48 (double-bit ECC) on GPU 1: two alerts, not one.
        # XID 63 (a row remap) on GPU 0, silenced.
        xids = [(1, 79), (1, 48), (0, 63)]
        await exchange(app.grpc_port, [hello("n01"), xid_batch("n01", 1, xids)], expect=2)

        def current() -> list[dict[str, Any]]:
            return am_alerts(am, alertname="fleetwatch_xid", node="n01")

        await eventually(lambda: len(current()) == 3, 15, "three XID alerts in Alertmanager")
        alerts = {a["labels"]["xid"]: a for a in current()}
        xid79 = alerts["79"]
        assert xid79["labels"] == {
            "alertname": "fleetwatch_xid",
            "detector": "xid",
            "severity": "critical",
            "action": "reboot",
            "node": "n01",
            "gpu": "1",
            "uuid": "GPU-n01-1",
            "pci_bus_id": "0000:19:00.0",
            "xid": "79",
        }
        assert alerts["48"]["labels"]["gpu"] == "1" and alerts["48"]["fingerprint"] != xid79["fingerprint"]
        assert set(xid79["annotations"]) == {"summary", "description", "runbook_url"}
        assert xid79["annotations"]["runbook_url"] == "http://collector.example:9471/runbooks/xid"
        assert xid79["generatorURL"].startswith("http://collector.example:9471/api/v1/alerts/")
        # The webhooks' fingerprint is the one Alertmanager computes for the same labels.
        assert xid79["fingerprint"] == labels_fingerprint(xid79["labels"])
        assert xid79["status"]["state"] == "active" and alerts["48"]["status"]["state"] == "active"
        assert alerts["63"]["status"]["state"] == "suppressed" and alerts["63"]["status"]["silencedBy"] == [silence_id]

        # Routed by severity and action: XIDs 79 and 48 page; the silenced XID 63 notifies nobody.
        await eventually(lambda: len(notified(receiver, "/pager")) >= 2, 15, "the pages for XIDs 79 and 48")
        await asyncio.sleep(2)
        assert {a["labels"]["xid"] for a in notified(receiver, "/pager")} == {"79", "48"}
        assert not [a for p in receiver.posts for a in p.body["alerts"] if a["labels"].get("xid") == "63"]

        # Outlives resolve_timeout and the 4 intervals of one post: fleetwatch keeps re-sending.
        await asyncio.sleep(RESOLVE_TIMEOUT_SECONDS + 4 * RESEND_SECONDS + 1)
        assert {a["labels"]["xid"] for a in current()} == {"79", "48", "63"}
        assert all(a["status"]["state"] in ("active", "suppressed") for a in current())
        assert not [a for a in notified(receiver, "/pager") if a["status"] == "resolved"]

        # The node reboots (a new boot id): fleetwatch resolves the XIDs, and so does Alertmanager.
        await exchange(app.grpc_port, [hello("n01", boot_id="boot-2"), xid_batch("n01", 1, [])], expect=2)
        await eventually(lambda: not app.store.firing_alerts(), 15, "fleetwatch resolves the XID alerts")
        ended = {a["fingerprint"]: a["ends_at"] for a in app.store.alerts(status="resolved")}
        assert len(ended) == 3
        await eventually(lambda: not current(), 15, "Alertmanager resolves them")
        await eventually(
            lambda: [a for a in notified(receiver, "/pager") if a["status"] == "resolved"],
            15,
            "the resolve notification",
        )
        await eventually(
            lambda: len([a for a in notified(receiver, "/pager") if a["status"] == "resolved"]) == 2,
            15,
            "both resolved",
        )
        resolved = [a for a in notified(receiver, "/pager") if a["status"] == "resolved"]
        assert {a["labels"]["xid"] for a in resolved} == {"79", "48"}
        assert not [a for a in resolved if a["endsAt"].startswith("0001")]
    finally:
        await app.stop(grace_seconds=0.2)


def test_shipped_inhibition_rules_hold(am: str) -> None:
    """Alerts posted as the collector posts them: the cause stays active, what it explains is inhibited."""

    def alert(detector: str, node: str, gpu: int | None, severity: str = "warning", key: str = "") -> dict[str, Any]:
        return {
            "id": 1,
            "detector": detector,
            "severity": severity,
            "action": "inspect_hardware",
            "node": node,
            "gpu": gpu,
            "key": key,
            "summary": f"{detector} on {node}",
            "evidence": {},
            "status": "firing",
            "starts_at": time.time() - 60,
            "ends_at": None,
        }

    feed = [
        alert("thermal", "n01", 2),  # explains n01 GPU 2's straggler
        alert("straggler.telemetry", "n01", 2),
        alert("straggler.telemetry", "n01", 5),  # no cause on GPU 5: stays active
        alert("gpu_lost", "n02", 3, "critical"),  # explains n02 GPU 3's other alerts
        alert("xid", "n02", 3, "critical", key="79"),
        alert("node_silent", "n03", None),  # explains every alert on n03
        alert("ecc", "n03", 0, "critical", key="dbe"),
    ]
    http_json(
        f"{am}/api/v2/alerts", postable_alerts(feed, AlertLinks("http://collector.example:9471"), time.time(), 600)
    )

    def state(detector: str, node: str, gpu: str | None) -> str:
        (found,) = [
            a for a in am_alerts(am, node=node) if a["labels"]["detector"] == detector and a["labels"].get("gpu") == gpu
        ]
        return found["status"]["state"]

    deadline = time.monotonic() + 15
    while state("straggler.telemetry", "n01", "2") != "suppressed" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state("thermal", "n01", "2") == "active"
    assert state("straggler.telemetry", "n01", "2") == "suppressed"
    assert state("straggler.telemetry", "n01", "5") == "active"
    assert state("gpu_lost", "n02", "3") == "active"
    assert state("xid", "n02", "3") == "suppressed"
    assert state("node_silent", "n03", None) == "active"
    assert state("ecc", "n03", "0") == "suppressed"


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (("severity=critical", "action=reboot", "alertname=fleetwatch_xid"), "pager"),
        (("severity=critical", "action=drain", "alertname=fleetwatch_ecc"), "pager"),
        (("severity=warning", "action=inspect_hardware", "alertname=fleetwatch_thermal"), "hardware-tickets"),
        (("severity=warning", "action=check_app", "alertname=fleetwatch_straggler_steps"), "training-team"),
        (("severity=info", "action=none", "alertname=fleetwatch_xid"), "blackhole"),
        (("severity=warning", "action=none", "alertname=fleetwatch_clocks"), "operators"),
    ],
)
def test_shipped_routes_by_severity_and_action(labels: tuple[str, ...], receiver: str) -> None:
    assert route_for(*labels) == receiver
