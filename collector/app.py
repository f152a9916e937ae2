"""Wires the collector together: store, ingest writer, gRPC service, detection loop, outbox, HTTP."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from sqlalchemy.engine import make_url

from fleetwatch.addresses import parse_host_port
from fleetwatch.asyncwait import wait_any
from fleetwatch.collector.cluster import ALERTS, FLEET_DETECTION, RETENTION, Cluster
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.detection import DetectionLoop, feed_recent, finding_from_alert, ib_sample
from fleetwatch.collector.fleet import TAKEOVER_HOLD_SECONDS, FleetDetection, split_detectors
from fleetwatch.collector.health import Readiness, sqlite_file
from fleetwatch.collector.ingest import IngestWriter
from fleetwatch.collector.jobs import LiveJobs
from fleetwatch.collector.notify import AlertLinks, Notifiers
from fleetwatch.collector.notify.alertmanager import AlertmanagerPusher
from fleetwatch.collector.outbox import Outbox
from fleetwatch.collector.remote_write import RemoteWriter
from fleetwatch.collector.server import IngestStats, TelemetryService, reporting_interval_seconds
from fleetwatch.collector.storage.compaction import compact, expire, roll_up
from fleetwatch.collector.storage.store import IngestBatch, Store
from fleetwatch.collector.tls import check_listen_security, load_server_tls
from fleetwatch.collector.validate import ClockWindow
from fleetwatch.collector.web import WebServer
from fleetwatch.detectors import default_detectors
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import Detector
from fleetwatch.detectors.table import RowMetrics
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.v1 import telemetry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PURGE_EVERY_SECONDS = 600.0
# s; batches wait compact_after_seconds plus at most this. A pass makes one block per node and
# kind: about a minute of samples each costs half as much a value as 20 s and compresses better.
COMPACT_EVERY_SECONDS = 60.0


@dataclass
class StorageStats:
    """What storage maintenance did since start, for /metrics."""

    batches_compacted: int = 0
    blocks_written: int = 0
    rollup_blocks_written: int = 0
    blocks_expired: int = 0


# How often each node's last_seen is written to the database (what a restarted collector starts from).
TOUCH_NODES_EVERY_SECONDS = 10.0


def default_external_url(listen_host: str, port: int, *, https: bool) -> str:
    """The collector's address for links in alerts: this host's name where it listens on every address."""
    host = socket.getfqdn() if listen_host in ("", "0.0.0.0", "::") else listen_host
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if https else 'http'}://{host}:{port}"


def _load_recent(store: Store, recent: RecentData, now: float, node: str | None = None) -> None:
    """The recent window of every node (or one) from the database into `recent` (blocking)."""
    since = now - recent.retention_seconds
    for row in store.nodes():
        if node is None or row["node"] == node:
            recent.note_node(
                row["node"],
                row["last_seen"],
                boot_id=row["boot_id"],
                sampling_interval_seconds=row["sampling_interval_seconds"],
            )
    for s in store.gpu_samples_since(since, node=node):
        recent.add_gpu(s)
    for h in store.host_samples_since(since, node=node):
        recent.add_host(h)
    for e in store.events_since(now - recent.event_retention_seconds, node=node):
        recent.add_event(e)
    for st in store.steps_since(since, node=node):
        recent.add_step(st)
    for port in store.ib_samples_since(since, node=node):
        recent.add_ib(ib_sample(port["node"], port))


def _forget_node(recent: RecentData, tracker: Tracker, node: str) -> None:
    recent.forget_node(node)
    tracker.forget(node)


class CollectorApp:
    def __init__(
        self,
        config: CollectorConfig,
        *,
        clock: Callable[[], float] = time.time,
        detectors: Sequence[Detector] | None = None,
    ) -> None:
        """`detectors` replaces the registered ones (default_detectors()), e.g. for a test detector."""
        self.config = config
        self.clock = clock
        self.store = Store(config.database_url.reveal())
        detectors = default_detectors() if detectors is None else list(detectors)
        # Several collectors may share a PostgreSQL database: then the job-level detectors run once
        # for the fleet (collector/fleet.py) and the rest here, over the nodes streaming here.
        self.shared_database = make_url(config.database_url.reveal()).get_backend_name() == "postgresql"
        fleet_detectors: list[Detector] = []
        if self.shared_database:
            detectors, fleet_detectors = split_detectors(detectors)
        self.recent = RecentData.for_detectors(detectors)
        self.tracker = Tracker(detectors)
        # Nodes whose detection state this collector holds (shared database: adopted on their Hello).
        self._adopted: set[str] = set()
        self.stats = IngestStats()
        # Membership among collectors sharing the database, and the fleet-wide duties' leases.
        self.cluster = Cluster(self.store)
        self.writer = IngestWriter(
            self.store, self._on_stored, config.ingest_max_batches_per_commit, config.ingest_commit_wait_seconds
        )
        self.readiness = Readiness(self.store, self.writer, sqlite_path=sqlite_file(config.database_url.reveal()))
        # external_url is filled in at start when not configured: the HTTP port may be picked then.
        self.links = AlertLinks(config.external_url, config.runbook_base_url)
        # Outbox rows name a webhook by reference (origin and a key), never by its URL with tokens.
        self.notifiers = Notifiers(
            log_alerts=config.log_alerts,
            webhook_urls=[url.reveal() for url in config.webhook_urls],
            webhooks=config.webhooks,
            timeout_seconds=config.webhook_timeout_seconds,
            links=self.links,
            group_wait_seconds=config.webhook_group_wait_seconds,
        )
        self.targets = self.notifiers.targets
        self.alertmanagers = (
            AlertmanagerPusher(
                self.store,
                [url.reveal() for url in config.alertmanager_urls],
                links=self.links,
                resend_seconds=config.alertmanager_resend_seconds,
                timeout_seconds=config.webhook_timeout_seconds,
                ca_file=config.alertmanager_ca_file,
                clock=clock,
                active=lambda: self.cluster.holds(ALERTS),
            )
            if config.alertmanager_urls
            else None
        )
        # Every stored sample, also to the TSDBs in remote_write_urls (collector/remote_write.py).
        self.remote_write = (
            RemoteWriter(
                [url.reveal() for url in config.remote_write_urls],
                shards=config.remote_write_shards,
                max_samples_per_send=config.remote_write_max_samples_per_send,
                batch_send_deadline_seconds=config.remote_write_batch_send_deadline_seconds,
                capacity_samples=config.remote_write_capacity_samples,
                min_backoff_seconds=config.remote_write_min_backoff_seconds,
                max_backoff_seconds=config.remote_write_max_backoff_seconds,
                timeout_seconds=config.remote_write_timeout_seconds,
                clock=clock,
            )
            if config.remote_write_urls
            else None
        )
        self.outbox = Outbox(
            self.store,
            self.notifiers,
            max_attempts=config.delivery_max_attempts,
            backoff_min_seconds=config.delivery_backoff_min_seconds,
            backoff_max_seconds=config.delivery_backoff_max_seconds,
            clock=clock,
            active=lambda: self.cluster.holds(ALERTS),
        )
        self.detection = DetectionLoop(
            self.store,
            self.recent,
            self.tracker,
            targets=self.targets,
            interval_seconds=config.detect_interval_seconds,
            on_alerts_changed=self._alerts_changed,
            clock=clock,
        )
        self.fleet = (
            FleetDetection(
                self.store,
                fleet_detectors,
                targets=self.targets,
                interval_seconds=config.detect_interval_seconds,
                on_alerts_changed=self._alerts_changed,
                active=lambda: self.cluster.holds(FLEET_DETECTION),
                local_nodes=lambda: list(self._adopted),
                window=ClockWindow(config.max_clock_skew_seconds, config.max_data_age_seconds),
                clock=clock,
            )
            if fleet_detectors
            else None
        )
        if self.fleet is not None:
            fleet = self.fleet
            self.cluster.on_lease_change = lambda duty, held: (
                fleet.lease_changed(held) if duty == FLEET_DETECTION else None
            )
        self.storage_stats = StorageStats()
        # (node, gpu) -> (t, metrics) of its newest sample, for /api/v1/status (event loop only).
        self.latest_gpu: dict[tuple[str, int], tuple[float, Mapping[str, float | int]]] = {}
        # Running jobs' energy for /metrics, counted as batches are stored (collector/jobs.py).
        self.live_jobs = LiveJobs()
        # Compaction and rollups have a thread of their own: their minutes of CPU never queue behind
        # (or ahead of) Hellos and API queries on the loop's default executor.
        self._maintenance = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-maintenance")
        self.grpc_port = 0
        self.http_port = 0
        self._server: grpc.aio.Server | None = None
        self._service: TelemetryService | None = None
        self._web: WebServer | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def trackers(self) -> tuple[Tracker, ...]:
        """Every detection loop's tracker: node-level detection's, and fleet detection's where the
        database is shared (what /metrics, the status API and the detector lists read)."""
        return (self.tracker,) if self.fleet is None else (self.tracker, self.fleet.tracker)

    def silences_changed(self) -> None:
        """A silence was added or expired: Alertmanager's feed changes at once; the outbox reads them at each send."""
        if self.alertmanagers is not None:
            self.alertmanagers.wake()

    def _alerts_changed(self) -> None:
        self.outbox.wake()
        if self.alertmanagers is not None:
            self.alertmanagers.wake()

    # -- ingest callbacks (event loop thread) -------------------------------------------------

    def _on_hello(self, hello: pb.Hello, now: float) -> None:
        interval = reporting_interval_seconds(hello, self.config.agent_sampling_interval_seconds)
        if self.shared_database and hello.node not in self._adopted:
            # Its firing alerts and recent window, from wherever it streamed before.
            self._adopted.add(hello.node)
            self.detection.feed(functools.partial(self._adopt, node=hello.node))
        note = functools.partial(
            RecentData.note_node,
            node=hello.node,
            t=now,
            boot_id=hello.boot_id,
            sampling_interval_seconds=interval,
            gpu_count=len(hello.gpus) or None,
        )
        self.detection.feed(note)
        if self.fleet is not None:
            self.fleet.loop.feed(note)

    def _adopt(self, recent: RecentData, node: str) -> None:
        """In the detection thread: a node that streams here now takes its firing node-level
        alerts and recent data from the database, so they close here when their condition ends."""
        ids = {d.id for d in self.tracker.detectors}
        firing = [a for a in self.store.firing_alerts() if a["node"] == node and a["detector"] in ids]
        self.tracker.restore((finding_from_alert(a) for a in firing), hold_until=self.clock() + TAKEOVER_HOLD_SECONDS)
        _load_recent(self.store, recent, self.clock(), node=node)

    def _let_go_of_moved_nodes(self, holders: Mapping[str, str | None]) -> None:
        """Nodes that stream to another collector now: their detection state goes (not resolved)."""
        for node in list(self._adopted):
            link = self.stats.links.get(node)
            holder = holders.get(node)
            if (link is None or not link.connected) and holder is not None and holder != self.cluster.id:
                self._adopted.discard(node)
                self.detection.feed(functools.partial(_forget_node, tracker=self.tracker, node=node))
                log.info("node %s streams to collector %s now: its detection state moved there", node, holder)

    def _on_stored(self, items: Sequence[IngestBatch], stored: Sequence[bool]) -> None:
        """Count what was stored and hand it to detection (applied in its thread)."""
        has_events = False
        for item, new in zip(items, stored):
            if not new:
                continue
            self.stats.batches += 1
            self.stats.gpu_samples += item.gpu_sample_count
            self.stats.host_samples += len(item.host_samples)
            self.stats.events += len(item.events)
            has_events = has_events or bool(item.events)
            for sample in item.gpu_samples:
                key = (item.node, sample.gpu)
                newest = self.latest_gpu.get(key)
                if newest is None or sample.t >= newest[0]:
                    self.latest_gpu[key] = (sample.t, sample.metrics)
            self.live_jobs.add_samples(item.node, item.gpu_samples)
            rows = item.gpu_rows
            if rows is not None:
                self.live_jobs.add_rows(item.node, rows)
                for gpu, row in rows.newest_rows().items():
                    t = float(rows.t[row])
                    newest = self.latest_gpu.get((item.node, gpu))
                    if newest is None or t >= newest[0]:
                        # Read only by /api/v1/status: the row, not a dict made for every batch.
                        self.latest_gpu[(item.node, gpu)] = (t, RowMetrics(rows.values[row].tolist()))
        self.detection.feed(functools.partial(feed_recent, items=list(items), stored=list(stored)))
        if self.fleet is not None:
            self.fleet.feed_local(items, stored)
        if self.remote_write is not None:
            self.remote_write.enqueue(items, stored)
        if has_events:
            self.detection.trigger()

    # -- lifecycle ----------------------------------------------------------------------------

    def _warm_start(self) -> None:
        """Reload what detection needs after a restart: firing alerts and the recent window.

        With a shared database, a node's state is loaded when its agent says Hello here instead
        (`_adopt`), and the fleet detectors' when the lease comes here (collector/fleet.py).
        """
        self.store.migrate()
        self.latest_gpu.update({key: (s.t, s.metrics) for key, s in self.store.latest_gpu_samples().items()})
        if self.shared_database:
            return
        self.tracker.restore(finding_from_alert(a) for a in self.store.firing_alerts())
        _load_recent(self.store, self.recent, self.clock())

    async def start(self) -> None:
        """Raises ConfigError, before migrating or listening, for TLS files or listen addresses that are refused."""
        tls = await asyncio.to_thread(load_server_tls, self.config)
        for warning in check_listen_security(self.config, tls=tls is not None):
            log.warning("%s", warning)
        await asyncio.to_thread(self._warm_start)
        self.detection.start()
        if self.fleet is not None:
            self.fleet.loop.start()
        self.writer.start()
        if self.remote_write is not None:
            self.remote_write.start()
        self._service = service = TelemetryService(
            self.store,
            self.writer,
            self.stats,
            sampling_interval_seconds=self.config.agent_sampling_interval_seconds,
            on_hello=self._on_hello,
            clock=self.clock,
            authenticate_peers=tls is not None,
            window=ClockWindow(self.config.max_clock_skew_seconds, self.config.max_data_age_seconds),
            max_streams=self.config.max_agent_streams,
        )
        limit = self.config.max_message_bytes
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)])
        pb_grpc.add_TelemetryServicer_to_server(service, self._server)
        try:
            if tls is None:
                self.grpc_port = self._server.add_insecure_port(self.config.grpc_listen)
            else:
                self.grpc_port = self._server.add_secure_port(self.config.grpc_listen, tls.credentials())
        except RuntimeError as exc:
            raise OSError(f"cannot listen for agents on {self.config.grpc_listen}: {exc}") from None
        await self._server.start()
        host, port = parse_host_port(self.config.http_listen)
        self._web = WebServer(self)
        self.http_port = await self._web.start(host, port)
        if not self.config.external_url:
            self.links.external_url = default_external_url(host, self.http_port, https=tls is not None)
        self.cluster.grpc_address = f"{parse_host_port(self.config.grpc_listen)[0]}:{self.grpc_port}"
        self.cluster.http_address = f"{host}:{self.http_port}"
        # The leases first: a lone collector delivers from its first second.
        await asyncio.to_thread(self.cluster.tick, *self._streams())
        self._tasks = [
            asyncio.create_task(self.detection.watchdog(self._stop), name="watchdog"),
            asyncio.create_task(self.outbox.run(self._stop), name="outbox"),
            *(
                [asyncio.create_task(self.alertmanagers.run(self._stop), name="alertmanager")]
                if self.alertmanagers is not None
                else []
            ),
            asyncio.create_task(self._housekeeping_loop(), name="housekeeping"),
            asyncio.create_task(self.cluster.run(self._stop, self._streams), name="cluster"),
            *([asyncio.create_task(self._fleet_poll_loop(self.fleet), name="fleet-poll")] if self.fleet else []),
            asyncio.create_task(self._storage_loop(), name="storage-maintenance"),
        ]
        log.info(
            "collector listening: gRPC %s (port %d, %s), HTTP %s (port %d), database %s, %d alert targets",
            self.config.grpc_listen,
            self.grpc_port,
            "plaintext" if tls is None else "mTLS, streams bound to their certificate's node",
            self.config.http_listen,
            self.http_port,
            self.store.url_for_log,
            len(self.targets),
        )

    def maintain_storage(self, *, roll_up_and_expire: bool = True) -> None:
        """Compact batches into blocks; then roll finished hours up and drop blocks past retention (blocking).

        Runs in the storage-maintenance thread; tests call it directly, e.g. after moving the clock.
        """
        now = self.clock()
        result = compact(self.store, now, after_seconds=self.config.compact_after_seconds)
        self.storage_stats.batches_compacted += result.batches
        self.storage_stats.blocks_written += result.blocks
        if result.batches:
            log.debug("compaction: %d batches into %d blocks", result.batches, result.blocks)
        if result.undecodable:
            log.error("compaction: %d batches could not be decoded and were dropped", result.undecodable)
        if roll_up_and_expire:
            self.storage_stats.rollup_blocks_written += roll_up(self.store, now)
            dropped = expire(
                self.store,
                now,
                raw_retention_seconds=self.config.raw_retention_hours * 3600,
                rollup_retention_seconds=self.config.rollup_retention_days * 86400,
            )
            self.storage_stats.blocks_expired += dropped
            if dropped:
                log.info("retention: dropped %d blocks past raw or rollup retention", dropped)

    async def _storage_loop(self) -> None:
        """Compaction every COMPACT_EVERY_SECONDS, rollups and block expiry every PURGE_EVERY_SECONDS, in one thread."""
        loop = asyncio.get_running_loop()
        every = min(COMPACT_EVERY_SECONDS, self.config.compact_after_seconds)
        next_rollup = self.clock()
        while not self._stop.is_set():
            roll = self.clock() >= next_rollup
            if roll:
                next_rollup = self.clock() + PURGE_EVERY_SECONDS
            try:
                work = functools.partial(self.maintain_storage, roll_up_and_expire=roll)
                await loop.run_in_executor(self._maintenance, work)
            except Exception:
                log.exception("storage maintenance (compaction, rollups, expiry) failed; retrying")
            await wait_any(self._stop, timeout_seconds=every)

    async def _housekeeping_loop(self) -> None:
        retention_seconds = self.config.retention_hours * 3600
        next_purge = self.clock()
        while not self._stop.is_set():
            try:
                seen = {n: link.last_received_at for n, link in self.stats.links.items() if link.last_received_at}
                if seen:
                    await asyncio.to_thread(self.store.touch_nodes, seen)
                if self.shared_database and self._adopted:
                    self._let_go_of_moved_nodes(await asyncio.to_thread(self.store.node_holders))
                if self.clock() >= next_purge and self.cluster.holds(RETENTION):
                    next_purge = self.clock() + PURGE_EVERY_SECONDS
                    deleted = await asyncio.to_thread(self.store.purge, self.clock() - retention_seconds)
                    if deleted:
                        log.info("retention: purged %d rows older than %.0f h", deleted, self.config.retention_hours)
            except Exception:
                log.exception("housekeeping (node last_seen, retention) failed")
            await wait_any(self._stop, timeout_seconds=TOUCH_NODES_EVERY_SECONDS)

    async def _fleet_poll_loop(self, fleet: FleetDetection) -> None:
        """While this collector holds fleet detection: the other collectors' batches, as they commit."""
        while not self._stop.is_set():
            if self.cluster.holds(FLEET_DETECTION):
                try:
                    await asyncio.to_thread(fleet.poll)
                except Exception:
                    log.exception("fleet detection could not read the other collectors' batches; retrying")
            await wait_any(self._stop, timeout_seconds=self.config.detect_interval_seconds)

    def _streams(self) -> tuple[int, list[str]]:
        """Open agent streams, and the nodes streaming here (what the cluster records)."""
        return self.stats.streams_open, [node for node, link in self.stats.links.items() if link.connected]

    async def stop(self, grace_seconds: float = 2.0) -> None:
        """Drain (agents told to move, their in-flight batches acked, for up to grace_seconds), then close."""
        if self._service is not None:
            left = await self._service.drain(grace_seconds)
            if left:
                log.warning("%d agent streams still open after %.1f s of draining; closing them", left, grace_seconds)
        self._stop.set()
        if self._server is not None:
            await self._server.stop(grace_seconds)
        await asyncio.to_thread(self.writer.stop)
        if self.remote_write is not None:  # what the writer stored last, sent for up to grace_seconds
            await self.remote_write.close(grace_seconds)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._web is not None:
            await self._web.stop()
        # Database work in progress finishes before the store closes; a send to a hanging webhook is
        # not waited for (it ends by its own timeout).
        await asyncio.to_thread(self.outbox.close)
        if self.alertmanagers is not None:
            self.alertmanagers.close()
        await asyncio.to_thread(self.detection.close)
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.loop.close)
        await asyncio.to_thread(self.readiness.close)
        # A compaction in progress commits or rolls back whole before the store closes.
        await asyncio.to_thread(self._maintenance.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self.cluster.leave)
        self.store.close()
