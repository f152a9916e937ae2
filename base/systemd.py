"""sd_notify without libsystemd: READY/STOPPING/WATCHDOG messages for Type=notify units."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one sd_notify message; a no-op (False) when not started by systemd with NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", message, exc)
        return False


def watchdog_interval_seconds() -> float | None:
    """Half the WATCHDOG_USEC systemd asked for (pinging at half the limit is systemd's advice)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


# The --log-level choices both daemons accept.
LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str) -> None:
    """journald adds its own timestamps; elsewhere we print ours."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt)
    # grpc's own loggers are noisy at INFO during reconnects
    logging.getLogger("grpc").setLevel(max(logging.WARNING, logging.getLogger().level))
