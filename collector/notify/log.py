"""Writes every alert transition to the collector's log (journald under systemd)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fleetwatch.collector.notify.base import Notifier

log = logging.getLogger("fleetwatch.alerts")


class LogNotifier(Notifier):
    scheme = "log"

    def send(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        for alert in alerts:
            transition = alert["transition"]
            where = " ".join(f"{k}={alert[k]}" for k in ("node", "gpu", "job", "rank") if alert.get(k) is not None)
            level = logging.WARNING if transition == "firing" and alert["severity"] != "info" else logging.INFO
            log.log(
                level,
                "%s %s %s [%s] %s (action: %s)",
                transition.upper(),
                alert["severity"],
                alert["detector"],
                where,
                alert["summary"],
                alert["action"],
            )
