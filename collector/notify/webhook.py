"""POSTs alerts to a URL in the Alertmanager webhook (version 4) shape, so existing receivers work."""

from __future__ import annotations

import base64
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from fleetwatch.collector.notify.base import Notifier, NotifyError, alert_labels, alertmanager_alert
from fleetwatch.configfile import url_origin

# What stands in an error message for a part of the URL that may hold a token.
HIDDEN = "..."


def webhook_body(alert: Mapping[str, Any], transition: str, receiver: str = "fleetwatch") -> dict[str, Any]:
    labels = alert_labels(alert)
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{labels["alertname"]}", fingerprint="{alert["fingerprint"]}"}}',
        "truncatedAlerts": 0,
        "status": transition,
        "receiver": receiver,
        "groupLabels": {"alertname": labels["alertname"]},
        "commonLabels": labels,
        "commonAnnotations": {"summary": alert["summary"], "action": alert["action"]},
        "externalURL": "",
        "alerts": [alertmanager_alert(alert, transition)],
    }


def split_userinfo(url: str) -> tuple[str, str | None]:
    """The URL without user:password@, and the Basic Authorization header value they make (None without)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, "Basic " + base64.b64encode(credentials.encode()).decode()


def scrub(text: str, url: str) -> str:
    """`text` with every part of `url` that may hold a token replaced by HIDDEN.

    http.client quotes the URL's path in some errors (InvalidURL) and its host[:port] with the
    userinfo in others; the URL as a whole, raw or repr-escaped, is replaced as well.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. a broken IPv6 literal: nothing but the whole URL to look for
        return text.replace(url, HIDDEN)
    userinfo = parts.netloc.rpartition("@")[0]
    path_query = parts.path + (f"?{parts.query}" if parts.query else "")
    candidates = {url, userinfo, parts.username, parts.password, path_query, parts.path, parts.query, parts.fragment}
    for secret in sorted((c for c in candidates if c), key=len, reverse=True):
        if len(secret) > 1:  # "/" hides nothing
            text = text.replace(secret, HIDDEN).replace(repr(secret)[1:-1], HIDDEN)
    return text


class WebhookNotifier(Notifier):
    scheme = "webhook"

    @staticmethod
    def redact(address: str) -> str:
        return url_origin(address)

    def send(self, alert: Mapping[str, Any], transition: str) -> None:
        body = json.dumps(webhook_body(alert, transition)).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "fleetwatch"}
        try:
            # urllib does not send userinfo as credentials (it takes it for part of the host): do it here.
            url, authorization = split_userinfo(self.address)
            if authorization is not None:
                headers["Authorization"] = authorization
            request = urllib.request.Request(url, data=body, method="POST", headers=headers)
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise NotifyError(f"{self.address_for_log} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            # ValueError and InvalidURL (an HTTPException) quote a malformed URL (e.g. from an old database row).
            reason = getattr(exc, "reason", exc)
            raise NotifyError(f"{self.address_for_log}: {scrub(str(reason), self.address)}") from None
