"""Webhooks as Alertmanager sends them: fingerprints, links, grouping per node, refusals, credentials, signatures.

A real collector raises XID alerts from agent batches over gRPC; a loopback receiver (plain HTTP,
or HTTPS with its own CA) records every POST with its headers and raw body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig, WebhookTarget
from fleetwatch.collector.notify.base import alert_labels, labels_fingerprint
from fleetwatch.collector.storage import schema
from fleetwatch.v1 import telemetry_pb2 as pb
from tests.collector.test_collector_app import exchange, get, hello
from tests.selfsigned import make_server_cert

EXTERNAL = "https://fleet.example:9471"
BEARER = "bearer-7f3c"
SECRET = "hmac-secret-19ab"


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.raw)


class Receiver:
    """Records each POST; answers `statuses` in turn (the last one from then on), with `answer` as the body."""

    def __init__(self, statuses: tuple[int, ...] = (200,), answer: bytes = b"", tls_dir: Path | None = None) -> None:
        self.posts: list[Post] = []
        self.ca_file: Path | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.posts.append(Post(self.path, dict(self.headers.items()), raw))
                status = statuses[min(len(receiver.posts), len(statuses)) - 1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls_dir is not None:
            cert = make_server_cert(tls_dir)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert.cert_file, cert.key_file)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.ca_file, scheme = cert.ca_file, "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def xid_batch(node: str, seq: int, xids: list[tuple[int, int]]) -> pb.AgentMessage:
    """A batch from `node` with samples of 2 GPUs and an XID event per (gpu, xid)."""
    t = time.time()
    b = pb.Batch(seq=seq, t=t)
    for gpu in range(2):
        sample = b.gpus.add(gpu=gpu, t=t, uuid=f"GPU-{node}-{gpu}")
        sample.metrics.gpu_util_percent = 90.0
    b.host.t = t
    for gpu, xid in xids:
        b.events.add(t=t, kind="xid", gpu=gpu, xid=xid, pci_bus_id=f"0000:{0x18 + gpu:02x}:00.0", source="nvml")
    return pb.AgentMessage(batch=b)


async def eventually(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.02)


async def start(tmp_path: Path, **settings: Any) -> CollectorApp:
    values: dict[str, Any] = {
        "grpc_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "database_url": f"sqlite:///{tmp_path / 'c.db'}",
        "detect_interval_seconds": 0.1,
        "log_alerts": False,
        "delivery_backoff_min_seconds": 0.1,
        "delivery_backoff_max_seconds": 0.1,
    }
    values.update(settings)
    app = CollectorApp(CollectorConfig(**values))
    await app.start()
    return app


def secret_file(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")
    return str(path)


async def test_one_post_per_node_with_alertmanagers_fields_credentials_and_signature(
    tmp_path: Path, receiver: Receiver
) -> None:
    target = WebhookTarget(
        url=receiver.url,
        bearer_token_file=secret_file(tmp_path, "token", BEARER),
        headers={"X-Team": "gpu-infra"},
        hmac_secret_file=secret_file(tmp_path, "secret", SECRET),
    )
    app = await start(tmp_path, webhooks=[target], webhook_group_wait_seconds=0.5, external_url=EXTERNAL)
    try:
        # Node n01: XID 48 and XID 63 on GPU 1 (two alerts), XID 48 on GPU 0; n02: XID 48 on GPU 0.
        for node, xids in (("n01", [(1, 48), (1, 63), (0, 48)]), ("n02", [(0, 48)])):
            await exchange(app.grpc_port, [hello(node=node), xid_batch(node, 1, xids)], expect=2)
        await eventually(lambda: sum(len(p.body["alerts"]) for p in receiver.posts) >= 4, 10, "4 alerts delivered")
        await asyncio.sleep(0.3)  # nothing else arrives
        firing = json.loads(await get(f"http://127.0.0.1:{app.http_port}/api/v1/alerts"))["alerts"]
        runbook = await get(f"http://127.0.0.1:{app.http_port}/runbooks/xid")
        metrics = await get(f"http://127.0.0.1:{app.http_port}/metrics")
    finally:
        await app.stop(grace_seconds=0.2)

    # GPU faults in Prometheus: a series per firing entity and detector, deliveries by target.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    per_entity = {labels: v for (name, labels), v in samples.items() if name == "fleetwatch_alert_firing"}
    on_gpu1 = [
        (dict(labels), v) for labels, v in per_entity.items() if ("node", "n01") in labels and ("gpu", "1") in labels
    ]
    # XID 48 (critical, reboot) and XID 63 (warning, reset_gpu): a series each.
    assert sorted((labels["detector"], labels["action"], v) for labels, v in on_gpu1) == [
        ("xid", "reboot", 1.0),
        ("xid", "reset_gpu", 1.0),
    ]
    assert sum(v for labels, v in per_entity.items() if ("detector", "xid") in labels) == 4
    sent = [
        v
        for (name, labels), v in samples.items()
        if name == "fleetwatch_alert_deliveries_total" and ("result", "sent") in labels
    ]
    assert sent == [4.0]  # one target (the log is off), four transitions

    by_node = {p.body["groupLabels"]["node"]: p for p in receiver.posts}
    assert len(receiver.posts) == 2 and set(by_node) == {"n01", "n02"}  # a node's alerts share one POST
    post = by_node["n01"]
    body = post.body
    assert body["version"] == "4" and body["status"] == "firing" and body["receiver"] == "fleetwatch"
    assert body["groupKey"] == '{}:{node="n01"}'
    assert body["externalURL"] == EXTERNAL
    assert body["commonLabels"] == {"alertname": "fleetwatch_xid", "detector": "xid", "node": "n01"}
    assert len(body["alerts"]) == 3

    ids = {(a["node"], a["gpu"], a["key"]): a["id"] for a in firing}
    seen = set()
    for alert in body["alerts"]:
        labels = alert["labels"]
        gpu, xid = int(labels["gpu"]), labels["xid"]
        seen.add((gpu, xid))
        assert labels["uuid"] == f"GPU-n01-{gpu}" and labels["pci_bus_id"] == f"0000:{0x18 + gpu:02x}:00.0"
        assert labels["action"] in ("reboot", "reset_gpu") and labels["severity"] in ("critical", "warning")
        # Alertmanager's fingerprint of the label set: 16 hex digits, the same for the same labels.
        assert alert["fingerprint"] == labels_fingerprint(labels) and len(alert["fingerprint"]) == 16
        assert alert["generatorURL"] == f"{EXTERNAL}/api/v1/alerts/{ids[('n01', gpu, xid)]}"
        assert alert["annotations"]["runbook_url"] == f"{EXTERNAL}/runbooks/xid"
        assert alert["annotations"]["summary"].startswith(f"XID {xid}")
        assert "Suggested action" in alert["annotations"]["description"]
        assert alert["endsAt"] == "0001-01-01T00:00:00Z" and alert["status"] == "firing"
    assert seen == {(1, "48"), (1, "63"), (0, "48")}  # XID 48 and 63 on one GPU stay two alerts
    assert len({a["fingerprint"] for a in body["alerts"]}) == 3
    assert runbook.startswith("# xid")

    headers = {k.lower(): v for k, v in post.headers.items()}
    assert headers["authorization"] == f"Bearer {BEARER}"
    assert headers["x-team"] == "gpu-infra"
    expected = "sha256=" + hmac.new(SECRET.encode(), post.raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-fleetwatch-signature-256"], expected)


def test_label_fingerprint_is_prometheus_label_set_hash() -> None:
    # Prometheus's model.LabelSet{}.Fingerprint() is FNV-1a 64's offset basis; one label hashes name
    # and value each followed by 0xff (the value Alertmanager shows for {alertname="a"}).
    assert labels_fingerprint({}) == "cbf29ce484222325"
    one = labels_fingerprint({"alertname": "a"})
    assert one == labels_fingerprint({"alertname": "a"}) != labels_fingerprint({"alertname": "b"})
    # Order of insertion does not matter; the name/value split does.
    assert labels_fingerprint({"a": "1", "b": "2"}) == labels_fingerprint({"b": "2", "a": "1"})
    assert labels_fingerprint({"a": "b"}) != labels_fingerprint({"ab": ""})
    alert = {"detector": "ecc", "severity": "critical", "action": "drain", "node": "n1", "gpu": 0, "key": "dbe"}
    assert alert_labels(alert)["key"] == "dbe" and "xid" not in alert_labels(alert)


@pytest.mark.parametrize(("status", "retried"), [(400, False), (404, False), (429, True), (503, True)])
async def test_client_errors_fail_at_once_and_others_are_retried(tmp_path: Path, status: int, retried: bool) -> None:
    receiver = Receiver(statuses=(status,), answer=b"alerts[0].labels: invalid label name")
    app = await start(tmp_path, webhook_urls=[receiver.url], webhook_group_wait_seconds=0.0)
    try:
        await exchange(app.grpc_port, [hello(), xid_batch("n01", 1, [(0, 48)])], expect=2)
        await eventually(lambda: len(receiver.posts) >= (2 if retried else 1), 10, "the first tries")
        await asyncio.sleep(0.5)  # five backoffs: a refused delivery is not tried again
        stored = await asyncio.to_thread(app.store.alerts, status="firing")
    finally:
        await app.stop(grace_seconds=0.2)
        receiver.close()
    if retried:
        assert len(receiver.posts) >= 3 and app.outbox.failed == 0 and app.outbox.retried >= 2
    else:
        assert len(receiver.posts) == 1 and app.outbox.failed == 1 and app.outbox.retried == 0
        assert stored  # the alert itself is recorded, whatever became of its delivery
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    with engine.connect() as conn:
        (state, error), *_ = conn.execute(select(schema.deliveries.c.state, schema.deliveries.c.last_error)).all()
    engine.dispose()
    assert error is not None and f"answered HTTP {status}: alerts[0].labels: invalid label name" in error
    assert state == ("pending" if retried else "failed")


async def test_basic_auth_over_https_with_the_targets_own_ca(tmp_path: Path) -> None:
    receiver = Receiver(tls_dir=tmp_path / "tls")
    assert receiver.ca_file is not None
    target = WebhookTarget(
        url=receiver.url,
        basic_auth_username="fleet",
        basic_auth_password_file=secret_file(tmp_path, "password", "pa:ss"),
        ca_file=str(receiver.ca_file),
    )
    untrusted = WebhookTarget(url=receiver.url.replace("/hook", "/other"))  # the system's CAs: refused
    app = await start(tmp_path, webhooks=[target, untrusted], webhook_group_wait_seconds=0.0)
    try:
        await exchange(app.grpc_port, [hello(), xid_batch("n01", 1, [(0, 48)])], expect=2)
        await eventually(lambda: app.outbox.sent >= 1 and app.outbox.retried >= 1, 10, "one sent, one retried")
    finally:
        await app.stop(grace_seconds=0.2)
        receiver.close()
    assert [p.path for p in receiver.posts] == ["/hook"]  # the other never got through TLS
    authorization = {k.lower(): v for k, v in receiver.posts[0].headers.items()}["authorization"]
    assert authorization == "Basic " + base64.b64encode(b"fleet:pa:ss").decode()
