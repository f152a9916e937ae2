"""Alerts keep their finding's key in a column of its own; fingerprints become opaque digests.

Revision ID: 0002
Revises: 0001

0.1.0 fingerprints joined detector, node, gpu, job, rank and key with "|", which a node or job
name containing "|" made ambiguous. Each alert's key is recovered exactly from its own columns
(they spell the fingerprint's prefix) and its fingerprint recomputed as the digest.
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Hex digits of the SHA-256 kept: 64 bits, so a collision among one fleet's alerts is negligible.
FINGERPRINT_HEX_DIGITS = 16

# What a 0.1.0 collector reads from meta: it refuses any schema_version but "1", so an older
# collector started on this database stops instead of writing "|"-joined fingerprints into it.
_SCHEMA_VERSION_KEY = "schema_version"
_SCHEMA_VERSION_BEFORE = "1"
_SCHEMA_VERSION_AFTER = "2"

_alerts = sa.table(
    "alerts",
    sa.column("id", sa.BigInteger),
    sa.column("fingerprint", sa.String),
    sa.column("detector", sa.String),
    sa.column("node", sa.String),
    sa.column("gpu", sa.Integer),
    sa.column("job", sa.String),
    sa.column("rank", sa.Integer),
    sa.column("key", sa.String),
)
_meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text))


def fingerprint(detector: str, node: str | None, gpu: int | None, job: str | None, rank: int | None, key: str) -> str:
    """Finding.fingerprint as of this revision (a frozen copy: the migration must not follow it)."""
    parts = [
        detector,
        node,
        None if gpu is None else int(gpu),
        job,
        None if rank is None else int(rank),
        key,
    ]
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode())
    return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]


def joined_prefix(detector: str, node: str | None, gpu: int | None, job: str | None, rank: int | None) -> str:
    """A 0.1.0 fingerprint up to its key: each field (None as "") followed by "|"."""
    return "".join(("" if part is None else str(part)) + "|" for part in (detector, node, gpu, job, rank))


def upgrade() -> None:
    op.add_column("alerts", sa.Column("key", sa.String(255), nullable=False, server_default=""))
    conn = op.get_bind()
    a = _alerts
    rows = conn.execute(sa.select(a.c.id, a.c.fingerprint, a.c.detector, a.c.node, a.c.gpu, a.c.job, a.c.rank)).all()
    changes = []
    for row in rows:
        prefix = joined_prefix(row.detector, row.node, row.gpu, row.job, row.rank)
        if not row.fingerprint.startswith(prefix):
            raise CommandError(
                f"alert {row.id}: fingerprint {row.fingerprint!r} does not begin with {prefix!r}, "
                "the fields of its own columns; it was not written by fleetwatch 0.1.0"
            )
        key = row.fingerprint[len(prefix) :]
        changes.append(
            {
                "b_id": row.id,
                "b_key": key,
                "b_fingerprint": fingerprint(row.detector, row.node, row.gpu, row.job, row.rank, key),
            }
        )
    # An old fingerprint has five "|" and a digest none, so no step of this update can make two
    # firing alerts share one (uq_alerts_firing_fingerprint).
    _update_alerts(conn, changes, "key", "fingerprint")
    _set_schema_version(conn, _SCHEMA_VERSION_AFTER)


def downgrade() -> None:
    conn = op.get_bind()
    a = _alerts
    rows = conn.execute(sa.select(a.c.id, a.c.detector, a.c.node, a.c.gpu, a.c.job, a.c.rank, a.c.key)).all()
    # Two firing alerts whose joined fingerprints coincide (node "a|1" with key "k" beside node "a",
    # GPU 1 with key "|k") violate uq_alerts_firing_fingerprint: the downgrade fails, changing nothing.
    _update_alerts(
        conn,
        [
            {
                "b_id": row.id,
                "b_fingerprint": joined_prefix(row.detector, row.node, row.gpu, row.job, row.rank) + row.key,
            }
            for row in rows
        ],
        "fingerprint",
    )
    op.drop_column("alerts", "key")
    _set_schema_version(conn, _SCHEMA_VERSION_BEFORE)


def _update_alerts(conn: sa.Connection, changes: list[dict[str, object]], *columns: str) -> None:
    """Set `columns` of each alert from its change's b_<column> (b_id names the alert)."""
    if changes:
        conn.execute(
            sa.update(_alerts)
            .where(_alerts.c.id == sa.bindparam("b_id"))
            .values({column: sa.bindparam(f"b_{column}") for column in columns}),
            changes,
        )


def _set_schema_version(conn: sa.Connection, version: str) -> None:
    conn.execute(sa.update(_meta).where(_meta.c.key == _SCHEMA_VERSION_KEY).values(value=version))
