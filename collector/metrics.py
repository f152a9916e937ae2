"""The collector's /metrics: a custom collector reading live state at scrape time (no global gauges)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetwatch.collector.cluster import DUTIES
from fleetwatch.collector.notify import target_for_log
from fleetwatch.records import Finding

if TYPE_CHECKING:
    from fleetwatch.collector.app import CollectorApp


class CollectorMetrics(Collector):
    """collect() reads detection state that only the event loop changes: call it there, as /metrics does."""

    def __init__(self, app: CollectorApp) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        stats = app.stats

        def counter(name: str, help: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, help, value=value)

        yield counter("fleetwatch_collector_batches", "Batches stored (first time seen).", stats.batches)
        yield counter(
            "fleetwatch_collector_batches_duplicate", "Batches received again and not stored twice.", stats.duplicates
        )
        samples = CounterMetricFamily("fleetwatch_collector_samples", "Samples stored, by kind.", labels=["kind"])
        samples.add_metric(["gpu"], stats.gpu_samples)
        samples.add_metric(["host"], stats.host_samples)
        yield samples
        yield counter("fleetwatch_collector_events", "Events stored (XIDs, GPU lost, ...).", stats.events)
        storage = app.storage_stats
        yield counter(
            "fleetwatch_collector_batches_compacted",
            "Batches compressed into column blocks.",
            storage.batches_compacted,
        )
        blocks = CounterMetricFamily(
            "fleetwatch_collector_blocks_written", "Compressed blocks written, by kind.", labels=["kind"]
        )
        blocks.add_metric(["samples"], storage.blocks_written)
        blocks.add_metric(["rollups"], storage.rollup_blocks_written)
        yield blocks
        yield counter(
            "fleetwatch_collector_blocks_expired",
            "Blocks dropped past raw or rollup retention.",
            storage.blocks_expired,
        )

        yield counter("fleetwatch_collector_batches_rejected", "Streams ended for a malformed message.", stats.rejected)
        invalid = CounterMetricFamily(
            "fleetwatch_collector_invalid_messages",
            "Agent messages refused for a field beyond the wire contract's limits, by node and field "
            "(node _invalid: a name that is no node name; _unknown: a node this database does not know).",
            labels=["node", "field"],
        )
        for (node, field), n in sorted(stats.invalid.items()):
            invalid.add_metric([node, field], n)
        yield invalid
        dropped = CounterMetricFamily(
            "fleetwatch_collector_metric_values_dropped",
            "Metric values dropped as no measurement (NaN, infinite, NVML's all-ones 'not available'), by field.",
            labels=["field"],
        )
        for name, n in sorted(stats.dropped_values.items()):
            dropped.add_metric([name], n)
        yield dropped
        yield GaugeMetricFamily("fleetwatch_collector_agent_streams", "Agent streams open.", value=stats.streams_open)
        yield counter(
            "fleetwatch_collector_agent_streams_refused",
            "Agent streams refused at max_agent_streams.",
            stats.streams_refused,
        )
        yield counter(
            "fleetwatch_collector_ingest_errors", "Database writes of ingested batches that failed.", app.writer.errors
        )
        yield GaugeMetricFamily(
            "fleetwatch_collector_ingest_queue_batches",
            "Batches waiting for the database writer.",
            value=app.writer.queued,
        )
        yield GaugeMetricFamily(
            "fleetwatch_collector_agents_connected", "Agents with an open stream.", value=stats.agents_connected
        )

        connected = GaugeMetricFamily(
            "fleetwatch_agent_connected", "1 while the node's agent has an open stream.", labels=["node"]
        )
        lag = GaugeMetricFamily(
            "fleetwatch_agent_ingest_lag_seconds",
            "Sampled-at to stored-and-acked of the node's newest batch.",
            labels=["node"],
        )
        spool = GaugeMetricFamily(
            "fleetwatch_agent_spool_bytes",
            "Bytes in the agent's spool (not yet acked) as it last reported.",
            labels=["node"],
        )
        spool_batches = GaugeMetricFamily(
            "fleetwatch_agent_spool_batches", "Batches in the agent's spool as it last reported.", labels=["node"]
        )
        for node, link in sorted(stats.links.items()):
            connected.add_metric([node], 1.0 if link.connected else 0.0)
            if link.ingest_lag_seconds is not None:
                lag.add_metric([node], link.ingest_lag_seconds)
            spool.add_metric([node], link.spool_bytes)
            spool_batches.add_metric([node], link.spool_batches)
        yield from (connected, lag, spool, spool_batches)

        # Copied at once: detection has its own thread (fleet detection another).
        yield from _alert_series([f for tracker in app.trackers for f in list(tracker.open.values())])

        duration = GaugeMetricFamily(
            "fleetwatch_detector_duration_seconds", "Duration of the detector's last run.", labels=["detector"]
        )
        errors = CounterMetricFamily("fleetwatch_detector_errors", "Detector runs that raised.", labels=["detector"])
        for detector_id, st in sorted(item for tracker in app.trackers for item in list(tracker.stats.items())):
            duration.add_metric([detector_id], st.last_duration_seconds)
            errors.add_metric([detector_id], st.errors)
        yield from (duration, errors)

        deliveries = CounterMetricFamily(
            "fleetwatch_alert_deliveries",
            "Alert transitions delivered, by target (as logs show it, no token) and result: sent, retried (a "
            "failed try that will be tried again), failed (given up), silenced (held back by a silence).",
            labels=["target", "result"],
        )
        counts = app.outbox.counts.copy()
        for target in app.notifiers.targets:
            for result in ("sent", "retried", "failed", "silenced"):
                counts.setdefault((target_for_log(target), result), 0)
        for (target, result), n in sorted(counts.items()):
            deliveries.add_metric([target, result], n)
        yield deliveries
        if app.alertmanagers is not None:
            yield from app.alertmanagers.metrics()
        if app.remote_write is not None:
            yield from app.remote_write.metrics()
        cluster = app.cluster
        held = GaugeMetricFamily(
            "fleetwatch_collector_lease_held",
            "1 while this collector holds the fleet-wide lease (alerts, fleet_detection, retention).",
            labels=["lease"],
        )
        taken = CounterMetricFamily(
            "fleetwatch_collector_lease_acquisitions",
            "Times this collector took each fleet-wide lease (another collector held it, or nobody).",
            labels=["lease"],
        )
        for duty in DUTIES:
            held.add_metric([duty], 1.0 if cluster.holds(duty) else 0.0)
            taken.add_metric([duty], cluster.lease_changes[duty])
        yield held
        yield taken
        yield counter(
            "fleetwatch_collector_heartbeat_failures",
            "Heartbeats (with their lease renewals) that could not be written to the database.",
            cluster.renew_failures,
        )
        job_energy = CounterMetricFamily(
            "fleetwatch_job_energy_joules",
            "Energy used by each running job's GPUs since this collector saw the job start (counter "
            "increases between samples naming the job); a job is dropped once ended.",
            labels=["job"],
        )
        for job, joules in sorted(app.live_jobs.running(app.clock()).items()):
            job_energy.add_metric([job], joules)
        yield job_energy


def _alert_series(findings: list[Finding]) -> Iterator[Metric]:
    """fleetwatch_alerts_firing by detector and severity, and fleetwatch_alert_firing per GPU or node.

    The second has a series per entity with a firing alert (bounded by the alerts firing), so a
    Prometheus-only user can alert and graph on GPU faults; its value counts the entity's firing
    alerts of that detector (two XIDs on one GPU: 2).
    """
    firing = GaugeMetricFamily(
        "fleetwatch_alerts_firing", "Alerts firing, by detector and severity.", labels=["detector", "severity"]
    )
    by_detector: Counter[tuple[str, str]] = Counter()
    by_entity: Counter[tuple[str, str, str, str, str]] = Counter()
    for finding in findings:
        by_detector[(finding.detector, finding.severity)] += 1
        gpu = "" if finding.gpu is None else str(finding.gpu)
        by_entity[(finding.detector, finding.severity, finding.action, finding.node or "", gpu)] += 1
    for (detector, severity), n in sorted(by_detector.items()):
        firing.add_metric([detector, severity], n)
    yield firing
    entity = GaugeMetricFamily(
        "fleetwatch_alert_firing",
        "Alerts firing on a node or GPU (gpu empty: the node's, or a job's), by detector, severity and action.",
        labels=["detector", "severity", "action", "node", "gpu"],
    )
    for labels, n in sorted(by_entity.items()):
        entity.add_metric(list(labels), n)
    yield entity
