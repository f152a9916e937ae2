"""Keeps Alertmanagers told of every alert, as Prometheus does: POST /api/v2/alerts, again and again.

Alertmanager resolves an alert by itself once its endsAt passes, so a firing alert is sent again
every alertmanager_resend_seconds with endsAt four intervals ahead (Prometheus's resend_delay and
its 4x margin): a collector that dies leaves its alerts to expire instead of firing for ever. A
resolved alert is sent with its real endsAt for RESOLVED_RESEND_SECONDS after it ended (as
Prometheus keeps resolved alerts), so an Alertmanager that missed the first post still hears it.
Every member of an HA pair is sent everything: they deduplicate between themselves.

The feed is the database's alert state, not the outbox: a post that fails loses nothing, the next
one carries the same state. Alerts a fleetwatch silence covers are left out of the feed.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import logging
import random
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fleetwatch.asyncwait import wait_any
from fleetwatch.backoff import backoff_seconds
from fleetwatch.collector.notify.base import AlertLinks, NotifyError, alert_annotations, alert_labels, rfc3339
from fleetwatch.collector.notify.webhook import ANSWER_CHARS, scrub, split_userinfo
from fleetwatch.collector.storage.store import Store, silence_matches
from fleetwatch.configfile import url_origin

log = logging.getLogger(__name__)
# While another collector holds the alerts lease: how often to look whether this one took it.
INACTIVE_POLL_SECONDS = 1.0

API_PATH = "/api/v2/alerts"
# A firing alert's endsAt is this many resend intervals ahead (Prometheus: 4 x max(resend, evaluation)).
ENDS_AT_INTERVALS = 4
# Resolved alerts are sent again for this long after they end (Prometheus keeps them 15 minutes).
RESOLVED_RESEND_SECONDS = 15 * 60
# First retry after a failed post; later ones back off up to the resend interval.
RETRY_MIN_SECONDS = 1.0


def postable_alerts(
    alerts: Sequence[Mapping[str, Any]], links: AlertLinks, now: float, valid_seconds: float
) -> list[dict[str, Any]]:
    """The API v2 body: firing alerts valid for `valid_seconds`, resolved ones with their real endsAt."""
    body = []
    for alert in alerts:
        firing = alert["status"] == "firing"
        item = {**alert, "alert_id": alert["id"], "transition": alert["status"]}
        body.append(
            {
                "labels": alert_labels(item),
                "annotations": alert_annotations(item, links),
                "startsAt": rfc3339(alert["starts_at"]),
                "endsAt": rfc3339(now + valid_seconds if firing else alert["ends_at"]),
                "generatorURL": links.generator_url(alert["id"]),
            }
        )
    return body


@dataclass
class _Member:
    """One Alertmanager: where it is, when it is next due, and how its posts went."""

    url: str
    name: str  # as logs and metrics show it: scheme://host:port/...
    next_at: float = 0.0
    failures: int = 0
    busy: bool = False
    # Alerts changed since its last post started: post again as soon as it is free.
    wanted: bool = True
    last_success: float | None = None


class AlertmanagerPusher:
    def __init__(
        self,
        store: Store,
        urls: Sequence[str],
        *,
        links: AlertLinks,
        resend_seconds: float = 60.0,
        timeout_seconds: float = 5.0,
        ca_file: str = "",
        clock: Callable[[], float] = time.time,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        """`active`: whether this collector posts the feed now (it holds the alerts lease)."""
        self.store = store
        self.links = links
        self.active = active
        self.resend_seconds = resend_seconds
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self._members = [_Member(url, url_origin(url)) for url in dict.fromkeys(urls)]
        self._context = ssl.create_default_context(cafile=ca_file or None)
        self._executor = ThreadPoolExecutor(max_workers=max(1, len(self._members)), thread_name_prefix="alertmanager")
        self._wake = asyncio.Event()
        self._rng = random.Random()
        # (alertmanager, result) -> posts; result: sent or failed.
        self.posts: Counter[tuple[str, str]] = Counter()
        self.alerts_in_last_post = 0

    def wake(self) -> None:
        """Alerts changed: post to every Alertmanager now instead of at the next resend."""
        for member in self._members:
            member.wanted = True
        self._wake.set()

    def _feed(self, now: float) -> list[dict[str, Any]]:
        alerts = self.store.alerts_to_announce(resolved_since=now - RESOLVED_RESEND_SECONDS)
        silences = [s for s in self.store.silences(now) if s["state"] == "active"]
        shown = [a for a in alerts if not any(silence_matches(s, a) for s in silences)]
        return postable_alerts(shown, self.links, now, ENDS_AT_INTERVALS * self.resend_seconds)

    def _post(self, member: _Member, body: bytes) -> None:
        url, authorization = split_userinfo(member.url.rstrip("/") + API_PATH)
        headers = {"Content-Type": "application/json", "User-Agent": "fleetwatch"}
        if authorization is not None:
            headers["Authorization"] = authorization
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        https = url.startswith("https:")
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout_seconds, context=self._context if https else None
            ) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            answer = scrub(exc.read(ANSWER_CHARS).decode(errors="replace").strip(), member.url)
            raise NotifyError(f"{member.name} answered HTTP {exc.code}: {answer}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise NotifyError(f"{member.name}: {scrub(str(reason), member.url)}") from None

    def _push(self, member: _Member) -> None:
        """Blocking (its own thread): read the feed and post it to one Alertmanager."""
        now = self.clock()
        try:
            alerts = self._feed(now)
            self._post(member, json.dumps(alerts).encode())
        except NotifyError as exc:
            member.failures += 1
            self.posts[(member.name, "failed")] += 1
            retry = backoff_seconds(member.failures - 1, RETRY_MIN_SECONDS, self.resend_seconds, self._rng)
            member.next_at = self.clock() + retry
            log_at = logging.WARNING if member.failures == 1 else logging.DEBUG
            log.log(log_at, "cannot post alerts to Alertmanager %s (%s); retrying in %.0f s", member.name, exc, retry)
            return
        except Exception as exc:  # the database failed: try again soon
            member.failures += 1
            member.next_at = self.clock() + RETRY_MIN_SECONDS * 5
            log.error("cannot read the alerts for Alertmanager %s: %s", member.name, exc)
            return
        if member.failures:
            log.info("Alertmanager %s takes alerts again (after %d failed posts)", member.name, member.failures)
        member.failures = 0
        member.last_success = self.clock()
        member.next_at = now + self.resend_seconds
        self.posts[(member.name, "sent")] += 1
        self.alerts_in_last_post = len(alerts)

    async def run(self, stop: asyncio.Event) -> None:
        if not self._members:
            return
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Future[None]] = set()
        while not stop.is_set():
            self._wake.clear()
            now = self.clock()
            for member in self._members if self.active() else ():
                if not member.busy and (member.wanted or member.next_at <= now):
                    member.busy, member.wanted = True, False
                    future = loop.run_in_executor(self._executor, self._push, member)
                    future.add_done_callback(functools.partial(self._done, member))
                    pending.add(future)
                    future.add_done_callback(pending.discard)
            waiting = [m.next_at for m in self._members if not m.busy and not m.wanted]
            wait = min(waiting, default=now + self.resend_seconds) - now
            if not self.active():  # another collector posts the feed; look again for the lease soon
                wait = INACTIVE_POLL_SECONDS
            await wait_any(self._wake, stop, timeout_seconds=min(self.resend_seconds, max(0.05, wait)))

    def _done(self, member: _Member, _: asyncio.Future[None]) -> None:
        member.busy = False
        self._wake.set()

    def metrics(self) -> Iterator[Metric]:
        posts = CounterMetricFamily(
            "fleetwatch_alertmanager_posts",
            "Posts of the alert feed to an Alertmanager, by result (sent, failed).",
            labels=["alertmanager", "result"],
        )
        last = GaugeMetricFamily(
            "fleetwatch_alertmanager_last_success_timestamp_seconds",
            "When the Alertmanager last took the alert feed (absent: never).",
            labels=["alertmanager"],
        )
        for member in self._members:
            for result in ("sent", "failed"):
                posts.add_metric([member.name, result], self.posts[(member.name, result)])
            if member.last_success is not None:
                last.add_metric([member.name], member.last_success)
        yield posts
        yield last
        yield GaugeMetricFamily(
            "fleetwatch_alertmanager_alerts", "Alerts in the last feed posted.", value=self.alerts_in_last_post
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
