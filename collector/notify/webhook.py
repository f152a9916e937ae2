"""POSTs alert groups to a URL in the Alertmanager webhook (version 4) shape, so existing receivers work.

A body holds one node's transitions gathered over webhook_group_wait_seconds (the outbox groups
them), with the fingerprint, URLs and common labels Alertmanager would fill in. Per-target
settings ([[webhooks]]) add a bearer token, basic authentication, headers, a CA file and an
HMAC-SHA256 signature of the body (X-Fleetwatch-Signature-256: sha256=<hex>, as GitHub signs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetwatch.collector.notify.base import AlertLinks, Notifier, NotifyError, common, webhook_alert
from fleetwatch.configfile import url_origin

if TYPE_CHECKING:
    from fleetwatch.collector.config import WebhookTarget

# What stands in an error message for a part of the URL that may hold a token.
HIDDEN = "..."
SIGNATURE_HEADER = "X-Fleetwatch-Signature-256"
# Characters of a refusing receiver's answer kept in the error (last_error, the log).
ANSWER_CHARS = 200
# 4xx answers that say "later", not "never": retried like 5xx.
RETRYABLE_CLIENT_ERRORS = frozenset({408, 425, 429})


def webhook_body(
    alerts: Sequence[Mapping[str, Any]], links: AlertLinks, receiver: str = "fleetwatch"
) -> dict[str, Any]:
    """Alertmanager's webhook body for one group: the alerts of one node (or of one alert without a node)."""
    items = [webhook_alert(alert, links) for alert in alerts]
    labels = [item["labels"] for item in items]
    shared = common(labels)
    group_labels = {"node": shared["node"]} if "node" in shared else {"alertname": shared.get("alertname", "")}
    group_key = ", ".join(f"{name}={json.dumps(value)}" for name, value in sorted(group_labels.items()))
    return {
        "version": "4",
        "groupKey": f"{{}}:{{{group_key}}}",
        "truncatedAlerts": 0,
        "status": "firing" if any(item["status"] == "firing" for item in items) else "resolved",
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": shared,
        "commonAnnotations": common([item["annotations"] for item in items]),
        "externalURL": links.external_url,
        "alerts": items,
    }


def signature(secret: bytes, body: bytes) -> str:
    """The X-Fleetwatch-Signature-256 value a receiver recomputes to trust the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


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

    def __init__(
        self,
        address: str,
        *,
        timeout_seconds: float = 5.0,
        links: AlertLinks | None = None,
        settings: WebhookTarget | None = None,
    ) -> None:
        super().__init__(address, timeout_seconds=timeout_seconds, links=links)
        self.settings = settings

    @staticmethod
    def redact(address: str) -> str:
        return url_origin(address)

    def _secret(self, setting: str) -> bytes:
        path = getattr(self.settings, setting)
        try:
            value = Path(path).read_bytes().strip()
        except OSError as exc:
            raise NotifyError(f"{self.address_for_log}: cannot read {setting} {path}: {exc.strerror or exc}") from None
        if not value:
            raise NotifyError(f"{self.address_for_log}: {setting} {path} is empty")
        return value

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "fleetwatch"}
        settings = self.settings
        if settings is None:
            return headers
        headers.update(settings.headers)
        if settings.bearer_token_file:
            headers["Authorization"] = "Bearer " + self._secret("bearer_token_file").decode(errors="replace")
        if settings.basic_auth_username:
            password = self._secret("basic_auth_password_file") if settings.basic_auth_password_file else b""
            credentials = settings.basic_auth_username.encode() + b":" + password
            headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        if settings.hmac_secret_file:
            headers[SIGNATURE_HEADER] = signature(self._secret("hmac_secret_file"), body)
        return headers

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.settings is None or not self.settings.ca_file:
            return None
        try:
            return ssl.create_default_context(cafile=self.settings.ca_file)
        except OSError as exc:  # ssl.SSLError too: no PEM certificate in it
            raise NotifyError(f"{self.address_for_log}: cannot load ca_file {self.settings.ca_file}: {exc}") from None

    def send(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        body = json.dumps(webhook_body(alerts, self.links)).encode()
        headers = self._headers(body)
        try:
            # urllib does not send userinfo as credentials (it takes it for part of the host): do it here.
            url, authorization = split_userinfo(self.address)
            if authorization is not None:
                headers["Authorization"] = authorization
            request = urllib.request.Request(url, data=body, method="POST", headers=headers)
            with urllib.request.urlopen(request, timeout=self.timeout_seconds, context=self._ssl_context()) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            answer = scrub(exc.read(ANSWER_CHARS).decode(errors="replace").strip(), self.address)
            permanent = 400 <= exc.code < 500 and exc.code not in RETRYABLE_CLIENT_ERRORS
            said = f": {answer}" if answer else ""
            raise NotifyError(f"{self.address_for_log} answered HTTP {exc.code}{said}", permanent=permanent) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            # ValueError and InvalidURL (an HTTPException) quote a malformed URL (e.g. from an old database row).
            reason = getattr(exc, "reason", exc)
            raise NotifyError(f"{self.address_for_log}: {scrub(str(reason), self.address)}") from None
