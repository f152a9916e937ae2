"""Notifiers: one module per alert destination, picked by the prefix of a delivery target.

A target is stored with each outbox row: "log" or "webhook:<url>".
"""

from __future__ import annotations

from fleetwatch.collector.notify.base import Notifier, NotifyError
from fleetwatch.collector.notify.log import LogNotifier
from fleetwatch.collector.notify.webhook import WebhookNotifier

NOTIFIERS: tuple[type[Notifier], ...] = (LogNotifier, WebhookNotifier)


def notifier_for(target: str, *, timeout_seconds: float = 5.0) -> Notifier:
    scheme, _, rest = target.partition(":")
    for cls in NOTIFIERS:
        if cls.scheme == scheme:
            return cls(rest, timeout_seconds=timeout_seconds)
    raise NotifyError(f"no notifier for target {target!r} (known: {', '.join(c.scheme for c in NOTIFIERS)})")


__all__ = ["NOTIFIERS", "Notifier", "NotifyError", "notifier_for"]
