"""Notifiers: one module per alert destination, picked by the prefix of a delivery target.

A target is stored with each outbox row: "log" or "webhook:<url>". The database is trusted
with the whole URL; what is read back from it for a log line goes through `target_for_log`.
"""

from __future__ import annotations

from fleetwatch.collector.notify.base import Notifier, NotifyError
from fleetwatch.collector.notify.log import LogNotifier
from fleetwatch.collector.notify.webhook import WebhookNotifier

NOTIFIERS: tuple[type[Notifier], ...] = (LogNotifier, WebhookNotifier)


def _notifier_class(scheme: str) -> type[Notifier] | None:
    return next((cls for cls in NOTIFIERS if cls.scheme == scheme), None)


def notifier_for(target: str, *, timeout_seconds: float = 5.0) -> Notifier:
    scheme, _, address = target.partition(":")
    cls = _notifier_class(scheme)
    if cls is None:
        # Only the scheme: the rest of an unknown target may be a URL with a token.
        known = ", ".join(c.scheme for c in NOTIFIERS)
        raise NotifyError(f"no notifier for target scheme {scheme!r} (known: {known})")
    return cls(address, timeout_seconds=timeout_seconds)


def target_for_log(target: str) -> str:
    """A stored delivery target as logs may show it: "log", "webhook:https://host/..."."""
    scheme, _, address = target.partition(":")
    if not address:
        return scheme
    cls = _notifier_class(scheme)
    return f"{scheme}:{(cls or Notifier).redact(address)}"


__all__ = ["NOTIFIERS", "Notifier", "NotifyError", "notifier_for", "target_for_log"]
