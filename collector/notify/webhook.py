"""POSTs alerts to a URL in the Alertmanager webhook (version 4) shape, so existing receivers work."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Mapping

from fleetwatch.collector.notify.base import Notifier, NotifyError, alert_labels, alertmanager_alert


def webhook_body(alert: Mapping[str, Any], transition: str, receiver: str = "fleetwatch") -> dict[str, Any]:
    labels = alert_labels(alert)
    return {
        "version": "4",
        "groupKey": f"{{}}:{{alertname=\"{labels['alertname']}\", fingerprint=\"{alert['fingerprint']}\"}}",
        "truncatedAlerts": 0,
        "status": transition,
        "receiver": receiver,
        "groupLabels": {"alertname": labels["alertname"]},
        "commonLabels": labels,
        "commonAnnotations": {"summary": alert["summary"], "action": alert["action"]},
        "externalURL": "",
        "alerts": [alertmanager_alert(alert, transition)],
    }


class WebhookNotifier(Notifier):
    scheme = "webhook"

    def send(self, alert: Mapping[str, Any], transition: str) -> None:
        body = json.dumps(webhook_body(alert, transition)).encode()
        request = urllib.request.Request(
            self.address, data=body, method="POST", headers={"Content-Type": "application/json", "User-Agent": "fleetwatch"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise NotifyError(f"{self.address} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise NotifyError(f"{self.address}: {reason}") from None
