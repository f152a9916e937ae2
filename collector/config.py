"""The collector's configuration: one typed object, from /etc/fleetwatch/collector.toml, FLEETWATCH_* and flags."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from fleetwatch.addresses import parse_host_port
from fleetwatch.collector.storage.store import redact_url
from fleetwatch.configfile import Secret, non_negative, one_of, positive, setting, url_origin, wrap_secrets
from fleetwatch.systemd import LOG_LEVELS

DEFAULT_PATH = "/etc/fleetwatch/collector.toml"


def _address(value: str) -> str | None:
    try:
        parse_host_port(value)
    except ValueError as exc:
        return str(exc)
    return None


class DatabaseUrl(Secret):
    """A SQLAlchemy URL; shown with its password (userinfo or query parameter) masked."""

    @staticmethod
    def redact(value: str) -> str:
        return redact_url(value)


class WebhookUrl(Secret):
    """A webhook URL; shown as scheme://host[:port]/... since tokens ride in the path, query or userinfo."""

    @staticmethod
    def redact(value: str) -> str:
        return url_origin(value)


def _database_url(url: DatabaseUrl) -> str | None:
    # Checked here so that no parse error (which quotes the part it chokes on) is printed later.
    try:
        make_url(url.reveal())
    except (ArgumentError, ValueError):
        return (
            "must be a SQLAlchemy URL, sqlite:///PATH or postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DB "
            "(characters such as @ / : in the password %-encoded)"
        )
    return None


def _is_http_url(url: str) -> bool:
    # Whitespace and control characters would make http.client quote the URL's path in its error.
    if any(c.isspace() or not c.isprintable() for c in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number or out of range
        return False


def _webhooks(urls: list[WebhookUrl]) -> str | None:
    bad = [str(u) for u in urls if not _is_http_url(u.reveal())]
    return f"not http(s) URLs with a host: {', '.join(bad)}" if bad else None


@dataclass(frozen=True)
class CollectorConfig:
    grpc_listen: str = setting("0.0.0.0:9470", "address agents stream to (gRPC)", check=_address)
    http_listen: str = setting(
        "0.0.0.0:9471", "address of /metrics, /healthz and the JSON API (/api/v1/...)", check=_address
    )
    database_url: DatabaseUrl = setting(
        "sqlite:////var/lib/fleetwatch/collector.db",
        "SQLAlchemy URL: sqlite:///PATH (embedded) or postgresql+psycopg://USER[:PASSWORD]@HOST/DB; "
        "logged with the password masked",
        check=_database_url,
    )
    database_url_file: str = setting(
        "",
        "file holding database_url, read at start (instead of database_url; keeps the password out of "
        "the configuration and the environment)",
        file_for="database_url",
    )
    webhook_urls: list[WebhookUrl] = setting(
        [],
        "webhooks that receive alerts (Alertmanager webhook v4 body); logged as scheme://host:port/... only",
        check=_webhooks,
    )
    webhook_urls_file: str = setting(
        "",
        "file holding webhook_urls, one a line (# comments), read at start (instead of webhook_urls)",
        file_for="webhook_urls",
    )
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

    def __post_init__(self) -> None:
        wrap_secrets(self)
