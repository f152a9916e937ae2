"""The collector's HTTP endpoint on its own event loop: /metrics, /healthz, /readyz and the API fleetwatchctl reads."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from fleetwatch.collector.httpauth import Access, add_route, token_middleware
from fleetwatch.collector.jobs import DEFAULT_JOBS_SECONDS, job_reports
from fleetwatch.collector.metrics import CollectorMetrics
from fleetwatch.collector.page import add_page_routes
from fleetwatch.collector.runbooks import runbook_page
from fleetwatch.collector.silences import parse_silence, silence_text
from fleetwatch.collector.storage.series import SeriesQuery, SeriesQueryError, read_series
from fleetwatch.collector.storage.store import Store, silence_matches
from fleetwatch.https import server_ssl_context
from fleetwatch.limits import MAX_GPUS_PER_NODE

if TYPE_CHECKING:
    from fleetwatch.collector.app import CollectorApp

log = logging.getLogger(__name__)

SEVERITY_RANK = {"ok": 0, "info": 1, "warning": 2, "critical": 3}
# One character per GPU in status tables.
HEALTH_MARK = {"ok": ".", "info": "i", "warning": "W", "critical": "C"}
ALERT_STATUSES = ("firing", "resolved", "all")
DEFAULT_ALERTS_LIMIT = 200
ROUTES_HINT = (
    "try /metrics, /healthz, /readyz, /api/v1/status, /api/v1/alerts, /api/v1/series, /api/v1/silences, "
    "/runbooks/<detector>"
)
DEFAULT_SERIES_SECONDS = 3600.0  # /api/v1/series without start: the last hour
# An alert's history span: the 10 minutes before it (the longest detector window) and 5 after.
SPAN_BEFORE_SECONDS = 600.0
SPAN_AFTER_SECONDS = 300.0
# How long stop() lets requests in progress (a status query in its worker thread) finish.
SHUTDOWN_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class FiringAlert:
    node: str | None
    gpu: int | None
    detector: str
    severity: str


@dataclass(frozen=True)
class AgentLink:
    connected: bool
    last_received_at: float | None


@dataclass(frozen=True)
class DetectionSnapshot:
    """Firing findings and agent links, copied on the event loop for use in another thread."""

    alerts: tuple[FiringAlert, ...]
    links: Mapping[str, AgentLink]
    # (node, gpu) -> the newest metrics this collector received (the store's after a restart).
    latest: Mapping[tuple[str, int], Mapping[str, float | int]]

    @classmethod
    def take(cls, app: CollectorApp) -> DetectionSnapshot:
        """Call on the event loop, the one place that changes stats.links (tracker.open is copied at once)."""
        return cls(
            # list() copies in one step: the detection thread may change the dict meanwhile.
            alerts=tuple(
                FiringAlert(f.node, f.gpu, f.detector, f.severity)
                for tracker in app.trackers
                for f in list(tracker.open.values())
            ),
            links={name: AgentLink(link.connected, link.last_received_at) for name, link in app.stats.links.items()},
            latest={key: metrics for key, (_, metrics) in app.latest_gpu.items()},
        )


def _worst(alerts: list[FiringAlert]) -> str:
    return max((a.severity for a in alerts), key=SEVERITY_RANK.__getitem__, default="ok")


# A node whose agent streams to another live collector counts as connected while that collector
# touched its last_seen this recently (it writes every TOUCH_NODES_EVERY_SECONDS, 10 s).
PEER_CONNECTED_SECONDS = 30.0


def build_status(store: Store, snapshot: DetectionSnapshot, cluster: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Nodes and GPUs from the database with the worst firing alert on each as their health (blocking).

    `cluster` (Cluster.state()): with collectors sharing the database, the alerts the others
    raised count too, a node streaming to another live collector is connected, and the
    collectors with their leases are listed.
    """
    alerts = list(snapshot.alerts)
    if cluster is not None and len(cluster["collectors"]) > 1:
        known = {(a.node, a.gpu, a.detector) for a in alerts}
        for row in store.firing_alerts():
            if (row["node"], row["gpu"], row["detector"]) not in known:
                alerts.append(FiringAlert(row["node"], row["gpu"], row["detector"], row["severity"]))
    snapshot = DetectionSnapshot(alerts=tuple(alerts), links=snapshot.links, latest=snapshot.latest)
    holders: Mapping[str, str | None] = cluster["node_collectors"] if cluster is not None else {}
    alive = {c["id"] for c in cluster["collectors"] if c["alive"]} if cluster is not None else set()
    now = time.time()
    gpus_by_node: dict[str, list[dict]] = {}
    for gpu in store.gpus():
        gpus_by_node.setdefault(gpu["node"], []).append(gpu)
    nodes_out = []
    for node in store.nodes():
        name = node["node"]
        node_alerts = [a for a in snapshot.alerts if a.node == name]
        gpus_out = []
        for gpu in sorted(gpus_by_node.get(name, []), key=lambda g: g["gpu"]):
            gpu_alerts = [a for a in node_alerts if a.gpu == gpu["gpu"]]
            metrics = snapshot.latest.get((name, gpu["gpu"]))
            gpus_out.append(
                {
                    "gpu": gpu["gpu"],
                    "uuid": gpu.get("uuid"),
                    "name": gpu.get("name"),
                    "pci_bus_id": gpu.get("pci_bus_id"),
                    "health": _worst(gpu_alerts),
                    "alerts": [a.detector for a in gpu_alerts],
                    "metrics": dict(metrics) if metrics is not None else {},
                }
            )
        link = snapshot.links.get(name)
        holder = holders.get(name)
        elsewhere = (
            holder in alive
            and holder != (cluster or {}).get("self")
            and now - node["last_seen"] <= PEER_CONNECTED_SECONDS
        )
        nodes_out.append(
            {
                "node": name,
                "connected": bool(link and link.connected) or elsewhere,
                "collector": holder,
                "boot_id": node.get("boot_id"),
                "agent_version": node.get("agent_version"),
                "last_seen": (link.last_received_at if link else None) or node.get("last_seen"),
                "health": _worst(node_alerts),
                "gpus": gpus_out,
            }
        )
    status: dict[str, Any] = {"nodes": nodes_out, "alerts_firing": len(snapshot.alerts)}
    if cluster is not None:
        status["collectors"] = cluster["collectors"]
        status["leases"] = cluster["leases"]
    return status


async def fleet_status(app: CollectorApp) -> dict[str, Any]:
    """/api/v1/status: the detection state copied on the loop, the database read in a worker thread."""
    snapshot = DetectionSnapshot.take(app)

    def read() -> dict[str, Any]:
        return build_status(app.store, snapshot, app.cluster.state())

    return await asyncio.to_thread(read)


def _json(payload: Any, status: int = 200) -> web.Response:
    # Bytes, so the type stays plain application/json (text= would add a charset parameter).
    return web.Response(body=json.dumps(payload).encode(), status=status, content_type="application/json")


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths, bad parameters and failing queries as JSON errors, as the API documents."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _json({"error": f"no such path {request.path}; {ROUTES_HINT}"}, 404)
    except web.HTTPException:
        raise
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)
    except Exception as exc:  # a failing query must not take the endpoint down
        log.exception("HTTP %s failed", request.path)
        return _json({"error": f"collector could not answer: {exc}"}, 503)


class _Handlers:
    """The routes' handlers, all run on the event loop.

    Detection state (tracker.open, stats.links) is changed only by code on the event loop, so the
    handlers read it there, without awaiting in between, and hand only a copy of it and the store
    to a worker thread for the blocking database reads.
    """

    def __init__(self, app: CollectorApp) -> None:
        self.app = app
        self.registry = CollectorRegistry()
        self.registry.register(CollectorMetrics(app))

    async def metrics(self, request: web.Request) -> web.Response:
        # Rendered here on the loop: CollectorMetrics reads live detection state.
        encoder, content_type = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
        response = web.Response(body=encoder(self.registry), headers={hdrs.CONTENT_TYPE: content_type})
        # Prometheus asks for gzip; with a few hundred nodes the text is hundreds of kB.
        response.enable_compression()
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: 200 whenever the loop answers. The readiness facts ride along, as last known (no wait)."""
        readiness = self.app.readiness.snapshot()
        return _json(
            {
                "ok": True,
                "agents_connected": self.app.stats.agents_connected,
                "ready": readiness["ready"],
                "readiness": readiness,
            }
        )

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 while the database takes a write and ingest progresses, 503 (with why) otherwise."""
        readiness = await self.app.readiness.check()
        return _json(readiness, 200 if readiness["ready"] else 503)

    async def status(self, request: web.Request) -> web.Response:
        return _json(await fleet_status(self.app))

    async def alerts(self, request: web.Request) -> web.Response:
        # An empty value means the default, as it did with urllib's parse_qs.
        status = request.query.get("status") or "firing"
        if status not in ALERT_STATUSES:
            return _json({"error": "status must be firing, resolved or all"}, 400)
        query = request.query
        limit = int(query.get("limit") or DEFAULT_ALERTS_LIMIT)
        store, now = self.app.store, self.app.clock()
        severity = query.get("severity") or None
        if severity is not None and severity not in SEVERITY_RANK:
            return _json({"error": f"severity must be one of {', '.join(s for s in SEVERITY_RANK if s != 'ok')}"}, 400)
        gpu = _number(query, "gpu", None)
        since = _number(query, "since", None)

        def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            rows = store.alerts(
                status=None if status == "all" else status,
                limit=limit,
                node=query.get("node") or None,
                gpu=None if gpu is None else int(gpu),
                detector=query.get("detector") or None,
                severity=severity,
                active_since=None if since is None else now - since,
            )
            return rows, store.silences(now)

        rows, silences = await asyncio.to_thread(read)
        return _json({"alerts": [with_silence(with_history_span(row), silences) for row in rows]})

    async def jobs(self, request: web.Request) -> web.Response:
        """GET /api/v1/jobs[?since=SECONDS][&job=ID]: jobs with GPU samples in the last SECONDS
        (default a day, at most the raw retention), with their energy, usage, steps and alerts."""
        query = request.query
        now = self.app.clock()
        since = _number(query, "since", DEFAULT_JOBS_SECONDS)
        if not math.isfinite(since) or since <= 0:
            return _json({"error": "since: must be a positive number of seconds"}, 400)
        since = min(since, self.app.config.raw_retention_hours * 3600)
        reports = await asyncio.to_thread(job_reports, self.app.store, now - since, now, job=query.get("job") or None)
        return _json({"jobs": reports, "since": now - since})

    async def alert(self, request: web.Request) -> web.Response:
        try:
            alert_id = int(request.match_info["id"])
        except ValueError:
            return _json({"error": f"alert id must be a number, not {request.match_info['id']!a}"}, 400)
        store, now = self.app.store, self.app.clock()
        row, silences = await asyncio.to_thread(lambda: (store.alert(alert_id), store.silences(now)))
        if row is None:
            return _json({"error": f"no alert with id {alert_id}"}, 404)
        return _json(with_silence(with_history_span(row), silences))

    async def silences(self, request: web.Request) -> web.Response:
        """GET /api/v1/silences[?all=1]: active and pending silences (all=1: expired ones too), newest first."""
        include_expired = (request.query.get("all") or "") in ("1", "true", "yes")
        rows = await asyncio.to_thread(self.app.store.silences, self.app.clock(), include_expired=include_expired)
        return _json({"silences": rows})

    async def add_silence(self, request: web.Request) -> web.Response:
        """POST /api/v1/silences {node, gpu?, detector?, seconds, comment, created_by?}: the new silence."""
        try:
            body = await request.json()
        except ValueError:
            return _json({"error": "the body must be a JSON object"}, 400)
        now = self.app.clock()
        try:
            silence = parse_silence(body, now, known_detectors=[d.id for t in self.app.trackers for d in t.detectors])
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        silence_id = await asyncio.to_thread(lambda: self.app.store.add_silence(**silence, now=now))
        log.info(
            "silence %d added by %s until %s: %s",
            silence_id,
            silence["created_by"] or "(unnamed)",
            silence["ends_at"],
            silence_text(silence),
        )
        self.app.silences_changed()
        rows = await asyncio.to_thread(self.app.store.silences, now, include_expired=True)
        return _json(next(row for row in rows if row["id"] == silence_id), 201)

    async def expire_silence(self, request: web.Request) -> web.Response:
        """DELETE /api/v1/silences/{id}: end the silence now; its alerts are delivered again from now on."""
        try:
            silence_id = int(request.match_info["id"])
        except ValueError:
            return _json({"error": f"silence id must be a number, not {request.match_info['id']!a}"}, 400)
        row = await asyncio.to_thread(self.app.store.expire_silence, silence_id, self.app.clock())
        if row is None:
            return _json({"error": f"no silence with id {silence_id}"}, 404)
        log.info("silence %d expired: %s", silence_id, silence_text(row))
        self.app.silences_changed()
        return _json(row)

    async def runbook(self, request: web.Request) -> web.Response:
        """GET /runbooks/<detector>: the detector's runbook page (markdown), where alerts' runbook_url points."""
        detector = request.match_info["detector"]
        page = runbook_page(detector)
        if page is None:
            known = ", ".join(sorted(d.id for t in self.app.trackers for d in t.detectors))
            return _json({"error": f"no runbook for {detector[:64]!a} (detectors: {known})"}, 404)
        return web.Response(text=page, content_type="text/markdown")

    async def series(self, request: web.Request) -> web.Response:
        """GET /api/v1/series?node=N[&gpu=G][&field=F...][&start=T][&end=T][&step=S] (Unix seconds)."""
        query = request.query
        node = query.get("node") or ""
        if not node:
            return _json({"error": "node: required (a node name as /api/v1/status lists it)"}, 400)
        now = self.app.clock()
        end = _number(query, "end", now)
        start = _number(query, "start", end - DEFAULT_SERIES_SECONDS)
        step = _number(query, "step", None)
        gpu_text = query.get("gpu") or ""
        gpu = None if not gpu_text else _number(query, "gpu", None)
        if gpu is not None and (gpu != int(gpu) or not 0 <= gpu < MAX_GPUS_PER_NODE):
            raise SeriesQueryError("gpu", f"{gpu_text[:40]!a} is not a GPU index (0-{MAX_GPUS_PER_NODE - 1})")
        gpu = None if gpu is None else int(gpu)
        fields = [name for value in query.getall("field", []) for name in value.split(",") if name]
        series_query = SeriesQuery(node=node, gpu=gpu, fields=fields, start=start, end=end, step=step)
        store = self.app.store
        if not await asyncio.to_thread(store.node_known, node):
            return _json({"error": f"no node named {node!a} has reported to this collector"}, 404)
        retention = self.app.config.raw_retention_hours * 3600
        return _json(await asyncio.to_thread(read_series, store, series_query, now, retention))


def build_web_app(app: CollectorApp) -> web.Application:
    handlers = _Handlers(app)
    config = app.config
    # Outermost, so that a caller without the token learns nothing, not even which paths exist.
    auth = token_middleware(config.api_read_token.reveal(), config.api_admin_token.reveal())
    web_app = web.Application(middlewares=[auth, _json_errors])
    # Every route with add_route and its Access (health checks: `health`); one added with
    # router.add_get instead counts as READ, so it is never left open by mistake.
    health = Access.READ if config.health_require_token else Access.OPEN
    scrape = Access.READ if config.metrics_require_token else Access.OPEN
    add_route(web_app, "GET", "/metrics", handlers.metrics, scrape)
    add_route(web_app, "GET", "/healthz", handlers.healthz, health)
    add_route(web_app, "GET", "/readyz", handlers.readyz, health)
    add_route(web_app, "GET", "/api/v1/status", handlers.status, Access.READ)
    add_route(web_app, "GET", "/api/v1/alerts", handlers.alerts, Access.READ)
    add_route(web_app, "GET", "/api/v1/alerts/{id}", handlers.alert, Access.READ)
    add_route(web_app, "GET", "/api/v1/series", handlers.series, Access.READ)
    add_route(web_app, "GET", "/api/v1/jobs", handlers.jobs, Access.READ)
    add_route(web_app, "GET", "/api/v1/silences", handlers.silences, Access.READ)
    add_route(web_app, "POST", "/api/v1/silences", handlers.add_silence, Access.ADMIN)
    add_route(web_app, "DELETE", "/api/v1/silences/{id}", handlers.expire_silence, Access.ADMIN)
    # Open: the pages hold no fleet data, and whoever follows an alert's link may carry no token.
    add_route(web_app, "GET", "/runbooks/{detector}", handlers.runbook, Access.OPEN)
    # The fleet page and its files: open, they hold no data; its script calls the API with the token.
    add_page_routes(web_app, app)
    return web_app


def with_silence(alert: dict[str, Any], silences: list[dict[str, Any]]) -> dict[str, Any]:
    """The alert with silenced_by: the id of an active silence that covers it (its deliveries are held), or None."""
    active = (s for s in silences if s["state"] == "active" and silence_matches(s, alert))
    return {**alert, "silenced_by": next((s["id"] for s in active), None)}


def with_history_span(alert: dict[str, Any]) -> dict[str, Any]:
    """The alert with evidence["span"]: the stretch of its node's telemetry worth looking at.

    From SPAN_BEFORE_SECONDS before it started to SPAN_AFTER_SECONDS after it ended (end None
    while it fires), unless its detector named a span of its own.
    """
    evidence = dict(alert.get("evidence") or {})
    if "span" not in evidence:
        ends_at = alert.get("ends_at")
        evidence["span"] = {
            "start": alert["starts_at"] - SPAN_BEFORE_SECONDS,
            "end": None if ends_at is None else ends_at + SPAN_AFTER_SECONDS,
        }
    return {**alert, "evidence": evidence}


def _number(query: Mapping[str, str], name: str, default: float | None) -> Any:
    """A query parameter as a finite number (Unix seconds, seconds, an index), or `default` when absent."""
    text = query.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise SeriesQueryError(name, f"{text[:40]!a} is not a number") from None
    if not math.isfinite(value):
        raise SeriesQueryError(name, f"{text[:40]!a} is not a finite number")
    return value


class WebServer:
    """The collector's HTTP side, served by aiohttp from the collector's event loop."""

    def __init__(self, app: CollectorApp) -> None:
        self._config = app.config
        # No access log: every scrape would write a line to the journal.
        self._runner = web.AppRunner(build_web_app(app), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port and returns the bound port (port 0 picks a free one)."""
        await self._runner.setup()
        try:
            # Loaded at start: a renewed certificate takes a restart, as for the gRPC side.
            ssl_context = server_ssl_context(
                self._config.tls_cert_file, self._config.tls_key_file, cert_key="tls_cert_file", key_key="tls_key_file"
            )
            await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        log.info(
            "HTTP API: %s, read token %s, admin token %s, health checks %s, /metrics %s",
            "https" if ssl_context is not None else "plain http",
            "on" if self._config.api_read_token.reveal() else "off",
            "on" if self._config.api_admin_token.reveal() else "off",
            "behind the read token" if self._config.health_require_token else "open",
            "behind the read token" if self._config.metrics_require_token else "open",
        )
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        await self._runner.cleanup()
