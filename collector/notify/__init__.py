"""Notifiers: one module per alert destination, and the outbox targets that name them without their secrets.

A target is stored with each outbox row: "log", or "webhook:<scheme://host:port>/...#<key>" where
key is the start of the SHA-256 of the whole configured URL. The database never holds a token; the
URL is looked up among the configured webhooks when the delivery is sent. Rows written before
revision 0003 held "webhook:<whole url>"; the migration rewrites them, and `Notifiers.for_target`
still sends one it meets (e.g. from an older collector sharing the database).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from fleetwatch.collector.config import WebhookTarget, WebhookUrl
from fleetwatch.collector.notify.base import AlertLinks, Notifier, NotifyError, TargetNotConfigured
from fleetwatch.collector.notify.log import LogNotifier
from fleetwatch.collector.notify.webhook import WebhookNotifier
from fleetwatch.configfile import MASK, url_origin

NOTIFIERS: tuple[type[Notifier], ...] = (LogNotifier, WebhookNotifier)

# Hex digits of the URL's SHA-256 in a webhook target: 64 bits tell a fleet's webhooks apart.
WEBHOOK_KEY_HEX_DIGITS = 16
# A stored webhook reference: the URL's origin as url_origin shows it, then "#" and the key.
# (url_origin gives MASK for a URL it cannot take apart; configuration refuses those, old rows may not.)
_WEBHOOK_REFERENCE = re.compile(
    rf"(?:[a-z][a-z0-9+.-]*://[^/#]+/\.\.\.|{re.escape(MASK)})#[0-9a-f]{{{WEBHOOK_KEY_HEX_DIGITS}}}"
)


def _notifier_class(scheme: str) -> type[Notifier] | None:
    return next((cls for cls in NOTIFIERS if cls.scheme == scheme), None)


def webhook_target(url: str) -> str:
    """The outbox target of a webhook URL: its origin (for people reading the table) and a key, no token."""
    key = hashlib.sha256(url.encode()).hexdigest()[:WEBHOOK_KEY_HEX_DIGITS]
    return f"{WebhookNotifier.scheme}:{url_origin(url)}#{key}"


def is_reference(target: str) -> bool:
    """Whether a stored target names its destination without a secret ("log", a webhook reference)."""
    scheme, _, address = target.partition(":")
    if scheme == LogNotifier.scheme:
        return not address
    return scheme == WebhookNotifier.scheme and _WEBHOOK_REFERENCE.fullmatch(address) is not None


def notifier_for(target: str, *, timeout_seconds: float = 5.0, links: AlertLinks | None = None) -> Notifier:
    """The notifier of a target that carries its whole address ("log", "webhook:<url>" of old rows)."""
    scheme, _, address = target.partition(":")
    cls = _notifier_class(scheme)
    if cls is None:
        # Only the scheme: the rest of an unknown target may be a URL with a token.
        known = ", ".join(c.scheme for c in NOTIFIERS)
        raise TargetNotConfigured(f"no notifier for target scheme {scheme!r} (known: {known})")
    return cls(address, timeout_seconds=timeout_seconds, links=links)


def target_for_log(target: str) -> str:
    """A stored delivery target as logs may show it: "log", "webhook:https://host/...#key"."""
    if is_reference(target):
        return target
    scheme, _, address = target.partition(":")
    if not address:
        return scheme
    cls = _notifier_class(scheme)
    return f"{scheme}:{(cls or Notifier).redact(address)}"


class Notifiers:
    """The configured destinations: the targets each alert transition is queued for, and their notifiers."""

    def __init__(
        self,
        *,
        log_alerts: bool,
        webhook_urls: Sequence[str] = (),
        webhooks: Sequence[WebhookTarget] = (),
        timeout_seconds: float = 5.0,
        links: AlertLinks | None = None,
        group_wait_seconds: float = 0.0,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.links = links or AlertLinks(external_url="")
        settings = [WebhookTarget(url=WebhookUrl(url)) for url in webhook_urls] + list(webhooks)
        # A URL listed twice is one target, notified once (with the settings listed first).
        self._webhooks: dict[str, WebhookTarget] = {}
        for item in settings:
            self._webhooks.setdefault(webhook_target(item.url.reveal()), item)
        # Each target with the seconds a new transition waits for others of its node (the log: none).
        self.targets: dict[str, float] = {LogNotifier.scheme: 0.0} if log_alerts else {}
        self.targets.update(dict.fromkeys(self._webhooks, group_wait_seconds))

    def lane(self, target: str) -> str:
        """The name deliveries to `target` queue under: its reference (an old row's URL shares its webhook's)."""
        scheme, _, address = target.partition(":")
        if is_reference(target) or scheme != WebhookNotifier.scheme:
            return target
        return webhook_target(address)

    def for_target(self, target: str) -> Notifier:
        """The notifier that sends to `target`; TargetNotConfigured when nothing configured is named by it."""
        options: dict[str, Any] = {"timeout_seconds": self.timeout_seconds, "links": self.links}
        if target == LogNotifier.scheme:
            return LogNotifier("", **options)
        if is_reference(target):  # a webhook's
            settings = self._webhooks.get(target)
            if settings is None:
                # Removed from the configuration, or its token changed (another URL, another key).
                raise TargetNotConfigured(f"{target} is not among the configured webhooks any more")
            return WebhookNotifier(settings.url.reveal(), settings=settings, **options)
        # An old row that holds its whole address: it was configured when it was written.
        return notifier_for(target, **options)


__all__ = [
    "NOTIFIERS",
    "AlertLinks",
    "Notifier",
    "Notifiers",
    "NotifyError",
    "TargetNotConfigured",
    "is_reference",
    "notifier_for",
    "target_for_log",
    "webhook_target",
]
