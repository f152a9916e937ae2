"""`fleetwatch-collector`: the fleet's collector daemon (one per cluster, run by systemd)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import DEFAULT_PATH, CollectorConfig
from fleetwatch.collector.storage.store import Store, StoreError
from fleetwatch.configfile import ConfigError, daemon_parser, describe, load_config
from fleetwatch.systemd import notify, setup_logging

log = logging.getLogger("fleetwatch.collector")

# Python's cycle collector runs a young collection every 700 net allocations by default: at a
# fleet's ingest rate that is hundreds a second, each walking the young objects, and now and then
# the whole detection window: 3.7% of the collector's CPU at 300 nodes, 1.8% with these settings.
# Almost nothing here forms cycles (refcounting frees it), so young collections wait for 30x as
# many allocations, and what start-up built (modules, the app) is frozen out of every collection.
GC_THRESHOLDS = (20_000, 20, 20)


def build_parser() -> argparse.ArgumentParser:
    parser = daemon_parser(
        "fleetwatch-collector",
        "Receives agent streams over gRPC, stores them (SQLite by default, PostgreSQL by URL), runs the "
        "detectors, raises alerts to the log and webhooks, and serves /metrics and a JSON API.",
        CollectorConfig,
        DEFAULT_PATH,
    )
    parser.add_argument(
        "--migrate-only",
        action="store_true",
        help="upgrade the database schema at database_url to this version's and exit (no servers); "
        "a normal start does this first too",
    )
    return parser


def migrate_only(config: CollectorConfig) -> int:
    """`--migrate-only`: the schema upgrade of a start, alone (e.g. before a fleet of collectors)."""
    try:
        store = Store(config.database_url.reveal())
        try:
            store.migrate()
        finally:
            store.close()
    except StoreError as exc:
        log.error("migration failed: %s", exc)
        return 1
    return 0


async def serve(config: CollectorConfig) -> None:
    app = CollectorApp(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    gc.collect()
    gc.freeze()
    notify("READY=1")
    try:
        await stop.wait()
    finally:
        notify("STOPPING=1")
        log.info("stopping")
        await app.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(CollectorConfig, path=args.config, flags=args)
    except ConfigError as exc:
        print(f"fleetwatch-collector: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    # Store.migrate logs in one line what Alembic's INFO lines (plugins, context, steps) spell out.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.migrate_only:
        return migrate_only(config)
    log.info("starting with %s", describe(config))
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # TLS files and listen addresses are checked when the servers start
        log.error("cannot start: configuration error: %s", exc)
        return 2
    except (StoreError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
