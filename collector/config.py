"""The collector's configuration: one typed object, from /etc/fleetwatch/collector.toml, FLEETWATCH_* and flags."""

from __future__ import annotations

from dataclasses import dataclass

from fleetwatch.agent.config import LOG_LEVELS
from fleetwatch.configfile import non_negative, one_of, positive, setting

DEFAULT_PATH = "/etc/fleetwatch/collector.toml"


def _address(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "must be HOST:PORT (port 0 picks a free port)"
    return None


def _webhooks(urls: list[str]) -> str | None:
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    return f"not http(s) URLs: {', '.join(bad)}" if bad else None


@dataclass(frozen=True)
class CollectorConfig:
    grpc_listen: str = setting("0.0.0.0:9470", "address agents stream to (gRPC)", check=_address)
    http_listen: str = setting(
        "0.0.0.0:9471", "address of /metrics, /healthz and the JSON API (/api/v1/...)", check=_address
    )
    database_url: str = setting(
        "sqlite:////var/lib/fleetwatch/collector.db",
        "SQLAlchemy URL: sqlite:///PATH (embedded) or postgresql+psycopg://USER@HOST/DB",
    )
    webhook_urls: list[str] = setting([], "webhooks that receive alerts (Alertmanager webhook v4 body)", check=_webhooks)
    log_alerts: bool = setting(True, "also write every alert transition to the log")
    detect_interval_seconds: float = setting(1.0, "how often detectors run over recent data", check=positive)
    agent_sampling_interval_seconds: float = setting(
        0.0, "sampling interval pushed to every agent on connect (0: agents keep their own)", check=non_negative
    )
    retention_hours: float = setting(168.0, "raw samples, events and steps older than this are purged", check=positive)
    max_message_bytes: int = setting(4 * 1024 * 1024, "largest gRPC message accepted from an agent", check=positive)
    ingest_max_batches_per_commit: int = setting(256, "batches written in one database transaction", check=positive)
    delivery_max_attempts: int = setting(12, "tries per alert delivery before it is marked failed", check=positive)
    delivery_backoff_min_seconds: float = setting(1.0, "first retry delay of a failed delivery", check=positive)
    delivery_backoff_max_seconds: float = setting(300.0, "longest retry delay of a failed delivery", check=positive)
    webhook_timeout_seconds: float = setting(5.0, "HTTP timeout of one webhook POST", check=positive)
    log_level: str = setting("info", "log level", check=one_of(*LOG_LEVELS))
