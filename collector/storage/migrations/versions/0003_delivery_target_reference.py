"""Outbox rows name a webhook by reference (origin and a key), never by its URL with tokens.

Revision ID: 0003
Revises: 0002

Until 0002 a webhook delivery's target was "webhook:<the whole URL>", tokens and userinfo included,
and 0.1.0 also quoted the URL in last_error. Each such target becomes
"webhook:<scheme://host:port>/...#<key>", key being the start of the SHA-256 of the URL, which the
collector looks up among its configured webhook_urls when it sends; each URL in last_error becomes
its origin. No schema change.

The downgrade leaves the references: the URLs are gone on purpose. A collector of 0002 would try to
POST to a reference and fail those deliveries; the ones still pending are easier re-raised than kept.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Frozen copies of fleetwatch.collector.notify's: the migration must not follow later changes.
WEBHOOK_PREFIX = "webhook:"
KEY_HEX_DIGITS = 16
MASK = "********"
HIDDEN = "..."
_REFERENCE = re.compile(rf"(?:[a-z][a-z0-9+.-]*://[^/#]+/\.\.\.|{re.escape(MASK)})#[0-9a-f]{{{KEY_HEX_DIGITS}}}")

_deliveries = sa.table(
    "deliveries",
    sa.column("id", sa.BigInteger),
    sa.column("target", sa.Text),
    sa.column("last_error", sa.Text),
)


def origin(url: str) -> str:
    """`scheme://host[:port]/...`, or MASK for a URL that cannot be taken apart (url_origin as of 0003)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return MASK
    if not parts.scheme or not host:
        return MASK
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}/..."


def reference(url: str) -> str:
    """The stored target of a webhook URL (notify.webhook_target as of 0003)."""
    return f"{WEBHOOK_PREFIX}{origin(url)}#{hashlib.sha256(url.encode()).hexdigest()[:KEY_HEX_DIGITS]}"


def scrubbed(text: str, url: str) -> str:
    """`text` with the URL shown as its origin, and any other part of it that may hold a token hidden."""
    text = text.replace(url, origin(url))
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return text
    userinfo = parts.netloc.rpartition("@")[0]
    path_query = parts.path + (f"?{parts.query}" if parts.query else "")
    candidates = {userinfo, parts.username, parts.password, path_query, parts.path, parts.query, parts.fragment}
    for secret in sorted((c for c in candidates if c and len(c) > 1), key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text


def upgrade() -> None:
    conn = op.get_bind()
    d = _deliveries
    query = sa.select(d.c.id, d.c.target, d.c.last_error).where(d.c.target.like(f"{WEBHOOK_PREFIX}%"))
    rows = conn.execute(query).all()
    changes = []
    for row in rows:
        url = row.target[len(WEBHOOK_PREFIX) :]
        if _REFERENCE.fullmatch(url):
            continue  # written by a collector of this revision already
        error = row.last_error
        changes.append(
            {
                "b_id": row.id,
                "b_target": reference(url),
                "b_last_error": None if error is None else scrubbed(error, url),
            }
        )
    if changes:
        conn.execute(
            sa.update(d)
            .where(d.c.id == sa.bindparam("b_id"))
            .values(target=sa.bindparam("b_target"), last_error=sa.bindparam("b_last_error")),
            changes,
        )


def downgrade() -> None:
    """Nothing to undo that can be undone: the URLs are not kept anywhere (see the module's text)."""
