"""The agent's configuration: one typed object, from /etc/fleetwatch/agent.toml, FLEETWATCH_* and flags."""

from __future__ import annotations

from dataclasses import dataclass

from fleetwatch.addresses import parse_host_port
from fleetwatch.configfile import ConfigError, Secret, non_negative, one_of, positive, setting, wrap_secrets
from fleetwatch.limits import (
    BATCH_INTERVAL_MAX_SECONDS,
    SAMPLING_INTERVAL_MAX_SECONDS,
    SAMPLING_INTERVAL_MIN_SECONDS,
    node_name_problem,
)
from fleetwatch.stepreport import DEFAULT_SOCKET
from fleetwatch.systemd import LOG_LEVELS

DEFAULT_PATH = "/etc/fleetwatch/agent.toml"


def _collector_address(value: str) -> str | None:
    """HOST:PORT to dial. gRPC would take a bare host for port 443 and never reach a collector on 9470."""
    example = "e.g. collector.example.internal:9470 or [fd00::1]:9470"
    if value.count(":") > 1 and not value.startswith("["):
        return f"must be HOST:PORT; an IPv6 address goes in brackets, [ADDRESS]:PORT ({example})"
    if ":" not in value or value.endswith("]"):
        return f"needs a port, HOST:PORT ({example}; the collector listens on 9470 by default)"
    try:
        _, port = parse_host_port(value)
    except ValueError as exc:
        return f"{exc} ({example})"
    if not value.rpartition(":")[0]:  # ":9470" is fine to listen on, not to dial
        return f"needs a host before the port ({example})"
    if port == 0:
        return f"port 0 cannot be dialed ({example})"
    return None


def _collector_addresses(values: list[str]) -> str | None:
    """Every entry HOST:PORT; the error quotes the entry, since the list may be long."""
    if not values:
        return "needs at least one collector, HOST:PORT"
    for entry in values:
        problem = _collector_address(entry)
        if problem:
            return f"{entry!r}: {problem}"
    return None


def _node_name(value: str) -> str | None:
    """What the collector accepts as a node name (fleetwatch.limits); empty means the host name."""
    return node_name_problem(value) if value else None


def sampling_interval(value: float) -> str | None:
    """The range the collector accepts in a Hello (fleetwatch.limits)."""
    if SAMPLING_INTERVAL_MIN_SECONDS <= value <= SAMPLING_INTERVAL_MAX_SECONDS:
        return None
    return f"must be {SAMPLING_INTERVAL_MIN_SECONDS:g} to {SAMPLING_INTERVAL_MAX_SECONDS:g} seconds"


def batch_interval(value: float) -> str | None:
    if value == 0.0 or 0.0 < value <= BATCH_INTERVAL_MAX_SECONDS:
        return None
    return f"must be 0 (one batch per sampling cycle) or up to {BATCH_INTERVAL_MAX_SECONDS:g} seconds"


@dataclass(frozen=True)
class AgentConfig:
    node: str = setting("", "node name reported to the collector (empty: the host name)", check=_node_name)
    collector_address: list[str] = setting(
        ["127.0.0.1:9470"],
        "collector gRPC addresses, HOST:PORT each (a DNS name or an address; IPv6 in brackets), comma "
        "separated: the agent streams to one at a time and moves to the next (a name's every address in "
        "turn) when it is unreachable or shutting down",
        check=_collector_addresses,
    )
    tls_ca_file: str = setting(
        "",
        "CA certificate (PEM) the collector's certificate must chain to; with tls_cert_file and tls_key_file "
        "the stream uses mTLS (fleetwatchctl certs)",
    )
    tls_cert_file: str = setting("", "this node's client certificate (PEM), issued for the node name")
    tls_key_file: str = setting("", "private key of tls_cert_file (PEM, unencrypted; keep it 0600)")
    tls_server_name: str = setting(
        "",
        "name to verify the collector's certificate against, when it is not issued for the host in "
        "collector_address (e.g. an IP address or a load balancer's name; empty: the entry's host, the "
        "name itself where the agent dials an address that name resolved to)",
    )
    sampling_interval_seconds: float = setting(1.0, "seconds between samples", check=sampling_interval)
    # The collector's cost is mostly per message (gRPC read and ack, a commit): 10 cycles a batch
    # is a third less CPU per value than 5 (tests/bench/collector_fleet.py, README Performance),
    # and data 10 s old is fresher than the 15-30 s scrapes most Prometheus and DCGM exporter
    # setups run; XIDs and vanished GPUs do not wait for it.
    batch_interval_seconds: float = setting(
        10.0,
        "seconds of samples sent together in one batch, for a collector that takes several cycles a "
        "batch (0.2 and later): most of the collector's work is per batch; events are sent at once; "
        "0: one batch per cycle",
        check=batch_interval,
    )
    spool_dir: str = setting("/var/lib/fleetwatch/spool", "directory holding batches until the collector acks them")
    spool_max_bytes: int = setting(
        256 * 1024 * 1024, "spool size bound in bytes; the oldest batches are dropped past it", check=positive
    )
    spool_fsync: bool = setting(True, "fsync each batch before sending it (off only for tests and demos)")
    procfs_root: str = setting("/proc", "where procfs is mounted (a fixture tree in tests)")
    sysfs_root: str = setting("/sys", "where sysfs is mounted: InfiniBand ports are read under it")
    kmsg_path: str = setting("/dev/kmsg", "kernel log to read XIDs from (empty: off)")
    step_socket: str = setting(DEFAULT_SOCKET, "Unix datagram socket training jobs send step times to (empty: off)")
    job_attribution: bool = setting(True, "name the Slurm job / Kubernetes pod and rank of each GPU's processes")
    # The kubelet's own path for it (Kubernetes documentation, Device Plugins, "Monitoring device
    # plugin resources"); dcgm-exporter's default too.
    pod_resources_socket: str = setting(
        "/var/lib/kubelet/pod-resources/kubelet.sock",
        "the kubelet's pod-resources gRPC socket, to name the Kubernetes namespace, pod and container each GPU "
        "is allocated to (empty: off; where it does not exist, e.g. on a Slurm node, the agent waits for it quietly)",
    )
    metrics_listen: str = setting("0.0.0.0:9472", "address of the agent's own Prometheus /metrics (empty: off)")
    dcgm_names: bool = setting(False, "also export DCGM exporter metric names so existing dashboards keep working")
    metrics_tls_cert_file: str = setting("", "certificate (PEM) to serve /metrics over HTTPS with (empty: plain HTTP)")
    metrics_tls_key_file: str = setting("", "private key of metrics_tls_cert_file (PEM, unencrypted)")
    metrics_basic_auth_user: str = setting(
        "", "user name scrapers of /metrics must send with HTTP basic auth (empty: no auth)"
    )
    # File/environment only (flag=False): a flag would show the password in `ps`.
    metrics_basic_auth_password: Secret = setting(
        "", "password of metrics_basic_auth_user; prefer metrics_basic_auth_password_file", flag=False
    )
    metrics_basic_auth_password_file: str = setting(
        "",
        "file holding metrics_basic_auth_password, read at start (instead of metrics_basic_auth_password)",
        file_for="metrics_basic_auth_password",
    )
    disk_path: str = setting("/", "filesystem whose usage is reported as disk_used_bytes/disk_total_bytes")
    reconnect_min_seconds: float = setting(0.5, "first reconnect delay; doubles up to the maximum", check=positive)
    reconnect_max_seconds: float = setting(30.0, "longest reconnect delay", check=positive)
    max_in_flight_batches: int = setting(256, "batches sent but not yet acked before the agent waits", check=positive)
    stop_drain_seconds: float = setting(
        5.0, "on shutdown, how long to wait for the collector to ack what is spooled", check=non_negative
    )
    simulate: bool = setting(False, "sample a simulated node through the fake NVML instead of the real driver")
    sim_gpus: int = setting(8, "simulated GPUs (with --simulate)", check=positive)
    sim_model: str = setting("H100", "simulated GPU model (with --simulate)", check=one_of("H100", "H200"))
    sim_seed: int = setting(0, "seed of the simulated workload (with --simulate)")
    sim_faults: list[str] = setting(
        [], "faults to inject, KIND[:XID]@GPU+SECONDS[/DURATION], comma separated (with --simulate)"
    )
    log_level: str = setting("info", "log level", check=one_of(*LOG_LEVELS))

    def __post_init__(self) -> None:
        wrap_secrets(self)
        if isinstance(self.collector_address, str):
            # Code that builds the config with one address, as before 0.3, gets the list form.
            addresses = [a.strip() for a in self.collector_address.split(",") if a.strip()]
            object.__setattr__(self, "collector_address", addresses)
        _check_metrics_trust(self)


def _check_metrics_trust(config: AgentConfig) -> None:
    """The /metrics TLS and basic auth settings come in pairs; ConfigError stops the agent at start."""
    pairs = (
        ("metrics_tls_cert_file", config.metrics_tls_cert_file, "metrics_tls_key_file", config.metrics_tls_key_file),
        (
            "metrics_basic_auth_user",
            config.metrics_basic_auth_user,
            "metrics_basic_auth_password_file (or metrics_basic_auth_password)",
            config.metrics_basic_auth_password.reveal(),
        ),
    )
    for first, first_value, second, second_value in pairs:
        if bool(first_value) != bool(second_value):
            given, missing = (first, second) if first_value else (second, first)
            raise ConfigError(f"{missing}: must be set with {given}")
    if ":" in config.metrics_basic_auth_user:
        # Basic auth sends user:password; RFC 7617 leaves no way to put a colon in the user.
        raise ConfigError(f"metrics_basic_auth_user: must not contain ':' (got {config.metrics_basic_auth_user!r})")
