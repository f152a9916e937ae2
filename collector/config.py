"""The collector's configuration: one typed object, from /etc/fleetwatch/collector.toml, FLEETWATCH_* and flags."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from fleetwatch.addresses import parse_host_port
from fleetwatch.collector.storage.store import redact_url
from fleetwatch.configfile import (
    MASK,
    ConfigError,
    Secret,
    non_negative,
    one_of,
    positive,
    setting,
    url_origin,
    wrap_secrets,
)
from fleetwatch.limits import DEFAULT_MAX_AGENT_STREAMS, DEFAULT_MAX_CLOCK_SKEW_SECONDS, DEFAULT_MAX_DATA_AGE_SECONDS
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


class ApiToken(Secret):
    """A bearer token of the HTTP API; never shown, only whether it is set."""

    @staticmethod
    def redact(value: str) -> str:
        return MASK if value else ""


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
        "0.0.0.0:9471", "address of /metrics, /healthz, /readyz and the JSON API (/api/v1/...)", check=_address
    )
    tls_cert_file: str = setting("", "server certificate (PEM) for gRPC and HTTP")
    tls_key_file: str = setting("", "its private key (PEM)")
    # The tokens themselves are file/environment only (flag=False): a flag would show them in `ps`.
    api_read_token: ApiToken = setting(
        "",
        "bearer token that GETs of the JSON API (/api/v1/...) must carry (empty: reads are open); "
        "prefer api_read_token_file",
        flag=False,
    )
    api_read_token_file: str = setting(
        "", "file holding api_read_token, read at start (instead of api_read_token)", file_for="api_read_token"
    )
    api_admin_token: ApiToken = setting(
        "",
        "bearer token that routes changing state must carry; it also reads (empty: with api_read_token set, "
        "those routes are refused; with neither set, everything is open); prefer api_admin_token_file",
        flag=False,
    )
    api_admin_token_file: str = setting(
        "", "file holding api_admin_token, read at start (instead of api_admin_token)", file_for="api_admin_token"
    )
    health_require_token: bool = setting(False, "put /healthz and /readyz behind api_read_token")
    metrics_require_token: bool = setting(False, "put /metrics behind api_read_token")
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
    # Agents send 10 s of samples at once (batch_interval_seconds), so a pass every second mostly
    # re-reads what the last one read; events (XIDs, a GPU lost) still start a pass at once.
    detect_interval_seconds: float = setting(
        2.0, "how often detectors run over recent data (events start a pass at once)", check=positive
    )
    agent_sampling_interval_seconds: float = setting(
        0.0, "sampling interval pushed to every agent on connect (0: agents keep their own)", check=non_negative
    )
    retention_hours: float = setting(
        168.0, "events, step reports and the keys of stored batches older than this are purged", check=positive
    )
    raw_retention_hours: float = setting(
        72.0, "full-resolution samples are kept this long (their 1-minute rollups longer)", check=positive
    )
    rollup_retention_days: float = setting(90.0, "1-minute rollups of every field are kept this long", check=positive)
    compact_after_seconds: float = setting(
        60.0, "batches are compressed into column blocks once this old (the rows hold them until then)", check=positive
    )
    max_message_bytes: int = setting(4 * 1024 * 1024, "largest gRPC message accepted from an agent", check=positive)
    ingest_max_batches_per_commit: int = setting(256, "batches written in one database transaction", check=positive)
    # A SQLite commit costs about 0.6 ms whatever it holds, a dense batch about 0.05 ms more: at
    # 60 batches a second (300 nodes) 0.2 s gathers 12 a commit, a third of the writer's CPU of 3.
    ingest_commit_wait_seconds: float = setting(
        0.2,
        "while batches arrive fast (two or more in the wait), how long the writer waits for more to "
        "commit with one: fewer, larger transactions for that much more ack latency (0: commit what "
        "is queued at once)",
        check=non_negative,
    )
    max_clock_skew_seconds: float = setting(
        DEFAULT_MAX_CLOCK_SKEW_SECONDS,
        "a batch with a time further ahead of the collector's clock is refused (a node's clock is wrong)",
        check=positive,
    )
    max_data_age_seconds: float = setting(
        DEFAULT_MAX_DATA_AGE_SECONDS,
        "a batch with a time older than this is refused; spooled batches and kernel-log XIDs can be old",
        check=positive,
    )
    max_agent_streams: int = setting(
        DEFAULT_MAX_AGENT_STREAMS, "agent streams open at once; more are refused (RESOURCE_EXHAUSTED)", check=positive
    )
    delivery_max_attempts: int = setting(12, "tries per alert delivery before it is marked failed", check=positive)
    delivery_backoff_min_seconds: float = setting(1.0, "first retry delay of a failed delivery", check=positive)
    delivery_backoff_max_seconds: float = setting(300.0, "longest retry delay of a failed delivery", check=positive)
    webhook_timeout_seconds: float = setting(5.0, "HTTP timeout of one webhook POST", check=positive)
    # tls_cert_file and tls_key_file (above) serve gRPC too; agents must then present a certificate.
    tls_client_ca_file: str = setting(
        "",
        "CA certificate(s) (PEM) agents' client certificates must chain to (mTLS, required with tls_cert_file); "
        "a stream may then speak only for the node its certificate names (fleetwatchctl certs)",
    )
    insecure: bool = setting(
        False,
        "allow plaintext gRPC (no TLS) and HTTP on an address other than loopback: anyone who reaches the "
        "port can then send data as any node",
    )
    log_level: str = setting("info", "log level", check=one_of(*LOG_LEVELS))

    def __post_init__(self) -> None:
        wrap_secrets(self)
        _check_api_tokens(self)


def _check_api_tokens(config: CollectorConfig) -> None:
    """Token settings that only make sense together; ConfigError stops the collector at start."""
    read, admin = config.api_read_token.reveal(), config.api_admin_token.reveal()
    if read and read == admin:
        # One token for both would hand every reader the right to change state.
        raise ConfigError("api_read_token and api_admin_token are the same token; give admins their own")
    for name in ("health_require_token", "metrics_require_token"):
        if getattr(config, name) and not read:
            raise ConfigError(f"{name}: needs api_read_token (or api_read_token_file) to be set")
