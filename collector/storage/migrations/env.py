"""Alembic's entry point: runs the revisions on the connection that Store.migrate passes in."""

from __future__ import annotations

from alembic import context

from fleetwatch.collector.storage import schema

# The caller's connection, already inside its transaction: the whole upgrade commits or rolls
# back with it (offline SQL scripts are not supported; there is no URL to build an engine from).
context.configure(connection=context.config.attributes["connection"], target_metadata=schema.metadata)
with context.begin_transaction():
    context.run_migrations()
