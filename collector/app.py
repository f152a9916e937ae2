"""Wires the collector together: store, ingest writer, gRPC service, detection loop, outbox, HTTP."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from fleetwatch.addresses import parse_host_port
from fleetwatch.asyncwait import wait_any
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.detection import DetectionLoop, finding_from_alert
from fleetwatch.collector.health import Readiness, sqlite_file
from fleetwatch.collector.ingest import IngestWriter
from fleetwatch.collector.jobs import LiveJobs
from fleetwatch.collector.notify import AlertLinks, Notifiers
from fleetwatch.collector.notify.alertmanager import AlertmanagerPusher
from fleetwatch.collector.outbox import Outbox
from fleetwatch.collector.server import IngestStats, TelemetryService, reporting_interval_seconds
from fleetwatch.collector.storage.compaction import compact, expire, roll_up
from fleetwatch.collector.storage.store import GpuRows, IngestBatch, Store
from fleetwatch.collector.tls import check_listen_security, load_server_tls
from fleetwatch.collector.validate import ClockWindow
from fleetwatch.collector.web import WebServer
from fleetwatch.detectors import default_detectors
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import Detector
from fleetwatch.detectors.table import RowMetrics
from fleetwatch.records import GpuSample, IbSample
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.v1 import telemetry_pb2_grpc as pb_grpc
from fleetwatch.wire import GPU_FIELDS

log = logging.getLogger(__name__)

_FIELD_INDEX = {name: i for i, name in enumerate(GPU_FIELDS)}
_FIELD_COUNT = len(GPU_FIELDS)

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


def feed_recent(recent: RecentData, items: Sequence[IngestBatch], stored: Sequence[bool]) -> None:
    """Stored batches into detection's recent data (in the detection thread)."""
    dense: list[tuple[str, GpuRows]] = []
    for item, new in zip(items, stored):
        recent.note_node(item.node, item.received_at)
        if not new:
            continue
        _add_gpu_samples(recent, item.node, item.gpu_samples)
        if item.gpu_rows is not None and len(item.gpu_rows):
            dense.append((item.node, item.gpu_rows))
        for h in item.host_samples:
            recent.add_host(h)
        for e in item.events:
            recent.add_event(e)
        for st in item.steps:
            recent.add_step(st)
        for port in item.ib_ports:
            recent.add_ib(ib_sample(item.node, port))
    if dense:
        _add_gpu_rows(recent, dense)


def _add_gpu_rows(recent: RecentData, batches: Sequence[tuple[str, GpuRows]]) -> None:
    """Dense batches' rows of every node in one write: detection's cost is per write, not per value."""
    labels = [rows.labels[i] for _, rows in batches for i in rows.label.tolist()]
    recent.add_gpu_rows_timed(
        [node for node, rows in batches for _ in range(len(rows))],
        np.concatenate([rows.t for _, rows in batches]),
        np.concatenate([rows.gpu for _, rows in batches]).tolist(),
        np.concatenate([rows.values for _, rows in batches]),
        [label[0] for label in labels],
        [label[1] for label in labels],
        [label[2] for label in labels],
    )


def _add_gpu_samples(recent: RecentData, node: str, samples: Sequence[GpuSample]) -> None:
    """A batch's GPU samples as rows, one add_gpu_rows per sampling time (one for an agent's batch)."""
    by_time: dict[float, list[GpuSample]] = {}
    for sample in samples:
        by_time.setdefault(sample.t, []).append(sample)
    for t, group in by_time.items():
        rows = [[math.nan] * _FIELD_COUNT for _ in group]
        for row, sample in zip(rows, group):
            for name, value in sample.metrics.items():
                row[_FIELD_INDEX[name]] = value  # check_batch kept canonical fields only
        recent.add_gpu_rows(
            node,
            t,
            [s.gpu for s in group],
            np.array(rows, dtype=np.float64),
            [s.uuid for s in group],
            [s.job for s in group],
            [s.rank for s in group],
        )


def default_external_url(listen_host: str, port: int, *, https: bool) -> str:
    """The collector's address for links in alerts: this host's name where it listens on every address."""
    host = socket.getfqdn() if listen_host in ("", "0.0.0.0", "::") else listen_host
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if https else 'http'}://{host}:{port}"


def ib_sample(node: str, port: Mapping[str, Any]) -> IbSample:
    """An ingested (or stored) InfiniBand port row as the detectors' record."""
    metrics = {k: v for k, v in port.items() if k.startswith("ib_") and v is not None}
    return IbSample(t=port["t"], node=node, device=port["device"], port=int(port["port"]), metrics=metrics)


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
        self.recent = RecentData.for_detectors(detectors)
        self.tracker = Tracker(detectors)
        self.stats = IngestStats()
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
            )
            if config.alertmanager_urls
            else None
        )
        self.outbox = Outbox(
            self.store,
            self.notifiers,
            max_attempts=config.delivery_max_attempts,
            backoff_min_seconds=config.delivery_backoff_min_seconds,
            backoff_max_seconds=config.delivery_backoff_max_seconds,
            clock=clock,
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
        self._web: WebServer | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

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
        self.detection.feed(
            functools.partial(
                RecentData.note_node,
                node=hello.node,
                t=now,
                boot_id=hello.boot_id,
                sampling_interval_seconds=interval,
                gpu_count=len(hello.gpus) or None,
            )
        )

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
        if has_events:
            self.detection.trigger()

    # -- lifecycle ----------------------------------------------------------------------------

    def _warm_start(self) -> None:
        """Reload what detection needs after a restart: firing alerts and the recent window."""
        self.store.migrate()
        self.tracker.restore(finding_from_alert(a) for a in self.store.firing_alerts())
        since = self.clock() - self.recent.retention_seconds
        for node in self.store.nodes():
            self.recent.note_node(
                node["node"],
                node["last_seen"],
                boot_id=node["boot_id"],
                sampling_interval_seconds=node["sampling_interval_seconds"],
            )
        for s in self.store.gpu_samples_since(since):
            self.recent.add_gpu(s)
        self.latest_gpu.update({key: (s.t, s.metrics) for key, s in self.store.latest_gpu_samples().items()})
        for h in self.store.host_samples_since(since):
            self.recent.add_host(h)
        for e in self.store.events_since(self.clock() - self.recent.event_retention_seconds):
            self.recent.add_event(e)
        for st in self.store.steps_since(since):
            self.recent.add_step(st)
        for port in self.store.ib_samples_since(since):
            self.recent.add_ib(ib_sample(port["node"], port))

    async def start(self) -> None:
        """Raises ConfigError, before migrating or listening, for TLS files or listen addresses that are refused."""
        tls = await asyncio.to_thread(load_server_tls, self.config)
        for warning in check_listen_security(self.config, tls=tls is not None):
            log.warning("%s", warning)
        await asyncio.to_thread(self._warm_start)
        self.detection.start()
        self.writer.start()
        service = TelemetryService(
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
        self._tasks = [
            asyncio.create_task(self.detection.watchdog(self._stop), name="watchdog"),
            asyncio.create_task(self.outbox.run(self._stop), name="outbox"),
            *(
                [asyncio.create_task(self.alertmanagers.run(self._stop), name="alertmanager")]
                if self.alertmanagers is not None
                else []
            ),
            asyncio.create_task(self._housekeeping_loop(), name="housekeeping"),
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
                if self.clock() >= next_purge:
                    next_purge = self.clock() + PURGE_EVERY_SECONDS
                    deleted = await asyncio.to_thread(self.store.purge, self.clock() - retention_seconds)
                    if deleted:
                        log.info("retention: purged %d rows older than %.0f h", deleted, self.config.retention_hours)
            except Exception:
                log.exception("housekeeping (node last_seen, retention) failed")
            await wait_any(self._stop, timeout_seconds=TOUCH_NODES_EVERY_SECONDS)

    async def stop(self, grace_seconds: float = 2.0) -> None:
        self._stop.set()
        if self._server is not None:
            await self._server.stop(grace_seconds)
        await asyncio.to_thread(self.writer.stop)
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
        await asyncio.to_thread(self.readiness.close)
        # A compaction in progress commits or rolls back whole before the store closes.
        await asyncio.to_thread(self._maintenance.shutdown, wait=True, cancel_futures=True)
        self.store.close()
