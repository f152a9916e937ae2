"""The collector's HTTP endpoint: /metrics for Prometheus, /healthz, and the JSON API fleetwatchctl reads."""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleetwatch.collector.metrics import CollectorMetrics

if TYPE_CHECKING:
    from fleetwatch.collector.app import CollectorApp

log = logging.getLogger(__name__)

SEVERITY_RANK = {"ok": 0, "info": 1, "warning": 2, "critical": 3}
# One character per GPU in status tables.
HEALTH_MARK = {"ok": ".", "info": "i", "warning": "W", "critical": "C"}


def fleet_status(app: "CollectorApp") -> dict[str, Any]:
    """Nodes and GPUs with the worst firing alert on each as their health."""
    store = app.store
    alerts = [f.to_dict() for f in app.tracker.open.values()]
    links = app.stats.links
    nodes_out = []
    gpus_by_node: dict[str, list[dict]] = {}
    for gpu in store.gpus():
        gpus_by_node.setdefault(gpu["node"], []).append(gpu)
    latest = store.latest_gpu_samples()
    for node in store.nodes():
        name = node["node"]
        node_alerts = [a for a in alerts if a["node"] == name]
        gpus_out = []
        for gpu in sorted(gpus_by_node.get(name, []), key=lambda g: g["gpu"]):
            gpu_alerts = [a for a in node_alerts if a["gpu"] == gpu["gpu"]]
            health = max((a["severity"] for a in gpu_alerts), key=SEVERITY_RANK.__getitem__, default="ok")
            sample = latest.get((name, gpu["gpu"]))
            gpus_out.append(
                {
                    "gpu": gpu["gpu"],
                    "uuid": gpu.get("uuid"),
                    "name": gpu.get("name"),
                    "pci_bus_id": gpu.get("pci_bus_id"),
                    "health": health,
                    "alerts": [a["detector"] for a in gpu_alerts],
                    "metrics": dict(sample.metrics) if sample is not None else {},
                }
            )
        health = max((a["severity"] for a in node_alerts), key=SEVERITY_RANK.__getitem__, default="ok")
        link = links.get(name)
        nodes_out.append(
            {
                "node": name,
                "connected": bool(link and link.connected),
                "boot_id": node.get("boot_id"),
                "agent_version": node.get("agent_version"),
                "last_seen": (link.last_received_at if link else None) or node.get("last_seen"),
                "health": health,
                "gpus": gpus_out,
            }
        )
    return {"nodes": nodes_out, "alerts_firing": len(alerts)}


def make_handler(app: "CollectorApp", registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fleetwatch-collector"

        def log_message(self, format: str, *args: Any) -> None:  # route to logging, quietly
            log.debug("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            try:
                if url.path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif url.path == "/healthz":
                    self._json(200, {"ok": True, "agents_connected": app.stats.agents_connected})
                elif url.path == "/api/v1/status":
                    self._json(200, fleet_status(app))
                elif url.path == "/api/v1/alerts":
                    status = query.get("status", ["firing"])[0]
                    if status not in ("firing", "resolved", "all"):
                        self._json(400, {"error": "status must be firing, resolved or all"})
                        return
                    limit = int(query.get("limit", ["200"])[0])
                    rows = app.store.alerts(status=None if status == "all" else status, limit=limit)
                    self._json(200, {"alerts": rows})
                else:
                    self._json(404, {"error": f"no such path {url.path}; try /metrics, /healthz, /api/v1/status, /api/v1/alerts"})
            except ValueError as exc:
                self._json(400, {"error": str(exc)})
            except Exception as exc:  # a failing query must not take the endpoint down
                log.exception("HTTP %s failed", url.path)
                self._json(503, {"error": f"collector could not answer: {exc}"})

    return Handler


class WebServer:
    def __init__(self, app: "CollectorApp", host: str, port: int) -> None:
        registry = CollectorRegistry()
        registry.register(CollectorMetrics(app))
        self.httpd = ThreadingHTTPServer((host, port), make_handler(app, registry))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
