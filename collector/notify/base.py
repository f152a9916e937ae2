"""The notifier interface and the Alertmanager alert shape every notifier shares.

An alert handed to a notifier is a mapping with the stored alert's fields (detector, severity,
action, node, gpu, uuid, pci_bus_id, job, rank, key, summary, evidence, starts_at, ends_at),
`alert_id` (its row) and `transition` ('firing' or 'resolved'): what the outbox reads.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetwatch.configfile import MASK

# Alertmanager's "zero" endsAt for an alert that is still firing.
ZERO_TIME = "0001-01-01T00:00:00Z"

# What each Finding.action asks of the operator, for the description annotation.
ACTION_TEXT = {
    "none": "nothing to do now; watch whether it repeats",
    "check_app": "check the job running there (its code, data loading, configuration)",
    "reset_gpu": "drain the GPU's work, then reset it (nvidia-smi -r) or reboot",
    "reboot": "drain the node, then reboot it",
    "inspect_hardware": "inspect the hardware (cooling, power, cabling, seating) and open an RMA if it repeats",
    "drain": "drain the node: take it out of scheduling until it is repaired",
}

# Evidence values quoted in the description annotation are cut to this many characters.
EVIDENCE_VALUE_CHARS = 80


class NotifyError(Exception):
    """A delivery failed; the outbox retries it later (unless `permanent`).

    The message is logged and stored as the delivery's last_error, so it names the destination by
    `Notifier.address_for_log` and never quotes the address itself.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        # The receiver refused the request itself (HTTP 4xx but 408 and 429): sending it again cannot help.
        self.permanent = permanent


class TargetNotConfigured(NotifyError):
    """The delivery's target names no configured destination: retrying cannot help, it fails at once."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


def rfc3339(ts: float | None) -> str:
    if ts is None:
        return ZERO_TIME
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def alert_labels(alert: Mapping[str, Any]) -> dict[str, str]:
    """The label set that names the alert in Alertmanager: two fleetwatch alerts never share one.

    The XID number is the `xid` label; another detector's finding key (e.g. "dbe" beside
    "sbe_rate" for ecc) is `key`, so findings of one detector on one GPU stay apart.
    """
    labels = {
        "alertname": f"fleetwatch_{alert['detector'].replace('.', '_')}",
        "detector": alert["detector"],
        "severity": alert["severity"],
        "action": alert["action"],
    }
    for name in ("node", "gpu", "uuid", "pci_bus_id", "serial", "job", "rank"):
        if alert.get(name) is not None:
            labels[name] = str(alert[name])
    key = alert.get("key") or ""
    if key:
        if alert["detector"] == "xid":
            # "79", or "79@0000:9b:00.0" for a board whose index was unknown (its pci_bus_id label says which)
            labels["xid"] = key.partition("@")[0]
        else:
            labels["key"] = key
    return labels


# Prometheus's label-set hash (prometheus/common model.LabelSet.Fingerprint): FNV-1a 64 over
# "name\xffvalue\xff" of the labels sorted by name. The webhook's fingerprint is what
# Alertmanager itself would show for the same labels.
_FNV64_OFFSET = 0xCBF29CE484222325
_FNV64_PRIME = 0x100000001B3
_SEPARATOR = b"\xff"


def labels_fingerprint(labels: Mapping[str, str]) -> str:
    digest = _FNV64_OFFSET
    for name in sorted(labels):
        for part in (name.encode(), _SEPARATOR, labels[name].encode(), _SEPARATOR):
            for byte in part:
                digest = ((digest ^ byte) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"


@dataclass
class AlertLinks:
    """Where an alert's links point: the collector's own address as users reach it, and the runbooks.

    Shared by every notifier; the collector fills external_url in at start when it is not configured.
    """

    external_url: str
    runbook_base_url: str = ""

    def generator_url(self, alert_id: int | None) -> str:
        base = self.external_url.rstrip("/")
        return f"{base}/api/v1/alerts/{alert_id}" if alert_id is not None else f"{base}/api/v1/alerts"

    def runbook_url(self, detector: str) -> str:
        base = (self.runbook_base_url or f"{self.external_url.rstrip('/')}/runbooks").rstrip("/")
        return f"{base}/{detector}"


def _evidence_text(evidence: Mapping[str, Any]) -> str:
    parts = []
    for name, value in evidence.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if len(text) > EVIDENCE_VALUE_CHARS:
            text = text[: EVIDENCE_VALUE_CHARS - 3] + "..."
        parts.append(f"{name}={text}")
    return ", ".join(parts)


def alert_annotations(alert: Mapping[str, Any], links: AlertLinks) -> dict[str, str]:
    description = f"{alert['summary']}. Suggested action ({alert['action']}): {ACTION_TEXT[alert['action']]}."
    evidence = _evidence_text(alert.get("evidence") or {})
    if evidence:
        description += f" Evidence: {evidence}."
    return {
        "summary": alert["summary"],
        "description": description,
        "runbook_url": links.runbook_url(alert["detector"]),
    }


def alert_ends_at(alert: Mapping[str, Any]) -> str:
    return rfc3339(alert.get("ends_at") if alert["transition"] == "resolved" else None)


def webhook_alert(alert: Mapping[str, Any], links: AlertLinks) -> dict[str, Any]:
    """One alert of an Alertmanager webhook (version 4) body."""
    labels = alert_labels(alert)
    return {
        "status": alert["transition"],
        "labels": labels,
        "annotations": alert_annotations(alert, links),
        "startsAt": rfc3339(alert["starts_at"]),
        "endsAt": alert_ends_at(alert),
        "generatorURL": links.generator_url(alert.get("alert_id")),
        "fingerprint": labels_fingerprint(labels),
    }


def common(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The name=value pairs every map shares (commonLabels, commonAnnotations)."""
    if not maps:
        return {}
    first, *rest = maps
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in rest)}


class Notifier(abc.ABC):
    scheme: str = ""

    def __init__(self, address: str, *, timeout_seconds: float = 5.0, links: AlertLinks | None = None) -> None:
        self.address = address
        self.timeout_seconds = timeout_seconds
        self.links = links or AlertLinks(external_url="")

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
    def send(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """Deliver alert transitions (one group: a node's, gathered over group_wait); NotifyError on failure.

        All of them are delivered or none: the outbox retries or fails the group as one.
        """
