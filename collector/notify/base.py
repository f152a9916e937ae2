"""The notifier interface and the Alertmanager-compatible alert shape every notifier shares."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fleetwatch.configfile import MASK

# Alertmanager's "zero" endsAt for an alert that is still firing.
ZERO_TIME = "0001-01-01T00:00:00Z"


class NotifyError(Exception):
    """A delivery failed; the outbox retries it later.

    The message is logged and stored as the delivery's last_error, so it names the destination by
    `Notifier.address_for_log` and never quotes the address itself.
    """


class TargetNotConfigured(NotifyError):
    """The delivery's target names no configured destination: retrying cannot help, it fails at once."""


def rfc3339(ts: float | None) -> str:
    if ts is None:
        return ZERO_TIME
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def alert_labels(alert: Mapping[str, Any]) -> dict[str, str]:
    labels = {
        "alertname": f"fleetwatch_{alert['detector'].replace('.', '_')}",
        "detector": alert["detector"],
        "severity": alert["severity"],
    }
    for key in ("node", "gpu", "job", "rank"):
        if alert.get(key) is not None:
            labels[key] = str(alert[key])
    return labels


def alertmanager_alert(alert: Mapping[str, Any], transition: str) -> dict[str, Any]:
    """One alert as Alertmanager's webhook (version 4) and API v2 describe it."""
    return {
        "status": transition,
        "labels": alert_labels(alert),
        "annotations": {"summary": alert["summary"], "action": alert["action"]},
        "startsAt": rfc3339(alert["starts_at"]),
        "endsAt": rfc3339(alert.get("ends_at") if transition == "resolved" else None),
        "generatorURL": "",
        "fingerprint": alert["fingerprint"],
    }


class Notifier(abc.ABC):
    scheme: str = ""

    def __init__(self, address: str, *, timeout_seconds: float = 5.0) -> None:
        self.address = address
        self.timeout_seconds = timeout_seconds

    @staticmethod
    def redact(address: str) -> str:
        """The address as logs, error messages and API answers may show it.

        Everything is hidden unless a notifier knows which part is safe: addresses carry tokens.
        """
        return MASK

    @property
    def address_for_log(self) -> str:
        return self.redact(self.address)

    @abc.abstractmethod
    def send(self, alert: Mapping[str, Any], transition: str) -> None:
        """Deliver one alert transition ('firing' or 'resolved'); raise NotifyError on failure."""
