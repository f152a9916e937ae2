"""The collector's configuration: one typed object, from /etc/fleetwatch/collector.toml, FLEETWATCH_* and flags."""

from __future__ import annotations

import re
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


class AlertmanagerUrl(Secret):
    """An Alertmanager's base URL; shown as scheme://host[:port]/... (basic auth may ride in the userinfo)."""

    @staticmethod
    def redact(value: str) -> str:
        return url_origin(value)


class RemoteWriteUrl(Secret):
    """A remote-write receiver's URL; shown as scheme://host[:port]/... (tokens may ride in the userinfo or path)."""

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


def _http_urls(urls: list[WebhookUrl] | list[AlertmanagerUrl] | list[RemoteWriteUrl]) -> str | None:
    bad = [str(u) for u in urls if not _is_http_url(u.reveal())]
    return f"not http(s) URLs with a host: {', '.join(bad)}" if bad else None


def _webhook_url(url: WebhookUrl) -> str | None:
    return None if _is_http_url(url.reveal()) else "must be an http(s) URL with a host"


def _optional_http_url(url: str) -> str | None:
    return None if not url or _is_http_url(url) else "must be an http(s) URL with a host (or empty)"


def _readable_file(path: str) -> str | None:
    """A file named in the configuration must be readable at start, not at the first alert."""
    if not path:
        return None
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"


# A header name is an HTTP token (RFC 9110); a value has no line breaks (no header injection).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers fleetwatch writes itself: a configured one would be silently replaced or clash.
_OWN_HEADERS = frozenset({"content-type", "content-length", "host", "x-fleetwatch-signature-256"})


def _headers(headers: dict[str, str]) -> str | None:
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            return f"{name!r} is not an HTTP header name"
        if name.lower() in _OWN_HEADERS:
            return f"{name} is set by fleetwatch itself"
        if "\r" in value or "\n" in value:
            return f"the value of {name} holds a line break"
    return None


@dataclass(frozen=True)
class WebhookTarget:
    """One [[webhooks]] table: a receiver with its own credentials, CA and signature secret.

    Secrets are named by file, read at each send (a rotated token takes effect without a restart).
    """

    url: WebhookUrl = setting("", "the receiver's http(s) URL", check=_webhook_url)
    bearer_token_file: str = setting(
        "", "file holding a token sent as Authorization: Bearer <token>", check=_readable_file
    )
    basic_auth_username: str = setting("", "user name for HTTP basic authentication")
    basic_auth_password_file: str = setting("", "file holding the basic authentication password", check=_readable_file)
    headers: dict[str, str] = setting({}, "extra HTTP headers sent with every POST", check=_headers)
    ca_file: str = setting(
        "",
        "CA certificate(s) (PEM) the receiver's certificate must chain to [default: the system's]",
        check=_readable_file,
    )
    hmac_secret_file: str = setting(
        "",
        "file holding a shared secret: each POST carries X-Fleetwatch-Signature-256: sha256=<hex HMAC-SHA256 "
        "of the body>",
        check=_readable_file,
    )

    def __post_init__(self) -> None:
        wrap_secrets(self)
        has_userinfo = "@" in urllib.parse.urlsplit(self.url.reveal()).netloc
        schemes = [
            name
            for name, used in (
                ("bearer_token_file", bool(self.bearer_token_file)),
                ("basic_auth_username", bool(self.basic_auth_username)),
                ("user:password@ in url", has_userinfo),
            )
            if used
        ]
        if len(schemes) > 1:
            raise ConfigError(f"{' and '.join(schemes)} both authenticate; set one")
        if self.basic_auth_password_file and not self.basic_auth_username:
            raise ConfigError("basic_auth_password_file needs basic_auth_username")
        if any(name.lower() == "authorization" for name in self.headers) and schemes:
            raise ConfigError(f"headers.Authorization and {schemes[0]} both authenticate; set one")


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
        check=_http_urls,
    )
    webhook_urls_file: str = setting(
        "",
        "file holding webhook_urls, one a line (# comments), read at start (instead of webhook_urls)",
        file_for="webhook_urls",
    )
    webhooks: list[WebhookTarget] = setting(
        [],
        "receivers with settings of their own, as [[webhooks]] tables in the TOML file: url, bearer_token_file, "
        "basic_auth_username, basic_auth_password_file, headers, ca_file, hmac_secret_file",
        flag=False,
    )
    # One second gathers what one agent batch or one detection pass raises on a node (a GPU's XIDs,
    # its other alerts) and keeps an XID's page within about two seconds of the event.
    webhook_group_wait_seconds: float = setting(
        1.0,
        "a webhook POST gathers a node's alert transitions for this long after the first one, as "
        "Alertmanager's group_wait does (0: each pass's transitions at once)",
        check=non_negative,
    )
    alertmanager_urls: list[AlertmanagerUrl] = setting(
        [],
        "Alertmanagers that receive every alert through their API (POST /api/v2/alerts), comma-separated; "
        "list each member of an HA cluster",
        check=_http_urls,
    )
    alertmanager_resend_seconds: float = setting(
        60.0,
        "firing alerts are sent to Alertmanager again this often, each time valid for 4 intervals (as "
        "Prometheus's resend_delay)",
        check=positive,
    )
    alertmanager_ca_file: str = setting(
        "", "CA certificate(s) (PEM) for https:// Alertmanagers [default: the system's]", check=_readable_file
    )
    # Prometheus remote write (collector/remote_write.py). Timing and backoff are Prometheus's own
    # queue_config defaults (configuration docs, <remote_write>): batch_send_deadline 5s,
    # min_backoff 30ms, max_backoff 5s, remote_timeout 30s.
    remote_write_urls: list[RemoteWriteUrl] = setting(
        [],
        "Prometheus remote-write (1.0) receivers that get every stored GPU, host and InfiniBand sample under "
        "the agent's /metrics names, comma-separated (Prometheus --web.enable-remote-write-receiver and "
        "VictoriaMetrics: http://HOST:PORT/api/v1/write); user:password@ is sent as basic auth; logged as "
        "scheme://host:port/... only",
        check=_http_urls,
    )
    remote_write_urls_file: str = setting(
        "",
        "file holding remote_write_urls, one a line (# comments), read at start (instead of remote_write_urls)",
        file_for="remote_write_urls",
    )
    remote_write_shards: int = setting(
        4,
        "parallel senders per receiver, one request in flight each; a node's GPU always goes through the "
        "same one, so its samples arrive in time order",
        check=positive,
    )
    # Not Prometheus's 2000: a request costs the collector about 0.2 ms of CPU (aiohttp), 0.1 us a
    # value at 2000 and 0.02 at 10,000 (tests/bench/remote_write.py); 10,000 is vmagent's default
    # (-remoteWrite.maxRowsPerBlock), and about 50 kB compressed.
    remote_write_max_samples_per_send: int = setting(
        10_000, "samples in one remote-write request at most (Prometheus's max_samples_per_send)", check=positive
    )
    remote_write_batch_send_deadline_seconds: float = setting(
        5.0,
        "a shard sends what it holds after this long even when it has fewer than max_samples_per_send "
        "(Prometheus's batch_send_deadline)",
        check=positive,
    )
    # A minute of the 300-node benchmark fleet (README, Performance: 110,400 values a second) is
    # 6.6 M samples; queued requests are snappy-compressed, 5 bytes a sample on its telemetry
    # (tests/bench/remote_write.py), shared by the receivers while more than one holds them.
    remote_write_capacity_samples: int = setting(
        10_000_000,
        "samples held per receiver while it is slow or down (compressed, about 5 bytes each: 50 MB at the "
        "default, a minute and a half of 300 8-GPU nodes at 1 Hz); past it the oldest are dropped and "
        "counted, ingest never waits",
        check=positive,
    )
    remote_write_min_backoff_seconds: float = setting(
        0.03,
        "first retry delay after a 5xx, 408, 425, 429 or no answer; doubles each retry (Prometheus's min_backoff)",
        check=positive,
    )
    remote_write_max_backoff_seconds: float = setting(
        5.0,
        "longest retry delay (Prometheus's max_backoff); a Retry-After header is honoured instead",
        check=positive,
    )
    remote_write_timeout_seconds: float = setting(
        30.0, "HTTP timeout of one remote-write request (Prometheus's remote_timeout)", check=positive
    )
    external_url: str = setting(
        "",
        "the collector's HTTP address as users reach it, for the links in alerts (generatorURL, runbooks) "
        "[default: http(s)://<this host's name>:<http_listen port>]",
        check=_optional_http_url,
    )
    runbook_base_url: str = setting(
        "",
        "where runbook_url annotations point, <base>/<detector> [default: the collector's own pages, "
        "<external_url>/runbooks]",
        check=_optional_http_url,
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
