"""The agent's configuration: one typed object, from /etc/fleetwatch/agent.toml, FLEETWATCH_* and flags."""

from __future__ import annotations

from dataclasses import dataclass

from fleetwatch.configfile import non_negative, one_of, positive, setting
from fleetwatch.stepreport import DEFAULT_SOCKET
from fleetwatch.systemd import LOG_LEVELS

DEFAULT_PATH = "/etc/fleetwatch/agent.toml"


@dataclass(frozen=True)
class AgentConfig:
    node: str = setting("", "node name reported to the collector (empty: the host name)")
    collector_address: str = setting("127.0.0.1:9470", "collector gRPC address, host:port")
    sampling_interval_seconds: float = setting(1.0, "seconds between samples", check=positive)
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
    metrics_listen: str = setting("0.0.0.0:9472", "address of the agent's own Prometheus /metrics (empty: off)")
    dcgm_names: bool = setting(False, "also export DCGM exporter metric names so existing dashboards keep working")
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
