"""Alembic owns the collector schema: 0.1.0 databases upgrade in place, schema.py matches the head."""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url

from fleetwatch.collector.detection import finding_from_alert
from fleetwatch.collector.notify import webhook_target
from fleetwatch.collector.storage import schema
from fleetwatch.collector.storage.migrations import alembic_config, script_directory
from fleetwatch.collector.storage.store import SchemaMigration, Store, StoreError
from fleetwatch.records import Finding
from tests.collector.conftest import DbUnderTest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "db-0.1.0"
HEAD = script_directory().get_current_head()

# What the 0.1.0 fixtures hold (SOURCE.md): two nodes of 2 GPUs, 30 s of samples, three alerts.
FIXTURE_ROWS = {
    "nodes": 2,
    "gpus": 4,
    "batches": 61,
    "gpu_samples": 120,
    "host_samples": 60,
    "ib_samples": 0,
    "events": 1,
    "steps": 0,
    "alerts": 3,
    "deliveries": 6,
}
FIXTURE_FINGERPRINTS_0_1_0 = {
    "xid|rack1|n01|1|||79",
    "straggler.telemetry|n02|0|||",
    "thermal|n02|0|||",
}

# A 0.1.0 alerts table (no key column) for writing alerts as that version did.
OLD_ALERTS = sa.table(
    "alerts",
    *(
        sa.column(name)
        for name in (
            "fingerprint",
            "detector",
            "severity",
            "action",
            "node",
            "gpu",
            "job",
            "rank",
            "summary",
            "evidence",
            "status",
            "starts_at",
            "updated_at",
        )
    ),
)


def load_0_1_0(database: DbUnderTest) -> None:
    """Put the database that the 0.1.0 collector wrote where `database.url` points."""
    if database.kind == "sqlite":
        # A copy: opening the committed file itself would leave WAL files beside it.
        shutil.copy(FIXTURES / "collector-0.1.0.sqlite", make_url(database.url).database)
        return
    assert database.admin is not None and database.pg_schema is not None
    # str.replace, not str.format: the dumped JSON evidence is full of braces.
    script = (FIXTURES / "collector-0.1.0.postgres.sql").read_text()
    script = script.replace("{schema}", f'"{database.pg_schema}"')
    with database.admin.connect() as conn:
        conn.connection.driver_connection.execute(script)


@contextmanager
def original_0_1_0(database: DbUnderTest, tmp_path: Path) -> Iterator[DbUnderTest]:
    """A second database of the same kind, beside the test's, holding the 0.1.0 fixture."""
    if database.kind == "sqlite":
        original = DbUnderTest(kind="sqlite", url=f"sqlite:///{tmp_path / 'original-0.1.0.db'}")
        load_0_1_0(original)
        yield original
        return
    assert database.admin is not None and database.pg_schema is not None
    pg_schema = f"{database.pg_schema}_orig"
    url = make_url(database.url).update_query_dict({"options": f"-csearch_path={pg_schema}"})
    original = DbUnderTest(
        kind="postgres", url=url.render_as_string(hide_password=False), admin=database.admin, pg_schema=pg_schema
    )
    with database.admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{pg_schema}"'))
    try:
        load_0_1_0(original)
        yield original
    finally:
        with database.admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{pg_schema}" CASCADE'))


@contextmanager
def connect(url: str) -> Iterator[sa.Connection]:
    """A plain SQLAlchemy connection in a transaction, for what the Store never does."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def migrate_to(store: Store, revision: str, *, down: bool = False) -> None:
    """Move the database to `revision` with Alembic directly (what no collector does)."""
    with store._engine.begin() as conn:
        config = alembic_config(conn)
        if down:
            command.downgrade(config, revision)
        else:
            command.upgrade(config, revision)


def old_alert(fingerprint: str, detector: str, node: str | None, gpu: int | None, status: str) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "detector": detector,
        "severity": "warning",
        "action": "none",
        "node": node,
        "gpu": gpu,
        "job": None,
        "rank": None,
        "summary": "s",
        "evidence": "{}",
        "status": status,
        "starts_at": 1.0,
        "updated_at": 1.0,
    }


def revision_module(revision: str) -> ModuleType:
    script = script_directory().get_revision(revision)
    assert script is not None
    return script.module


def schema_signature(conn: sa.Connection) -> list[tuple[Any, ...]]:
    """Every table, column, constraint and index as the database itself describes them."""
    if conn.dialect.name == "sqlite":
        rows = conn.execute(
            sa.text("SELECT type, name, sql FROM sqlite_master WHERE tbl_name != 'alembic_version' ORDER BY name")
        )
        return [tuple(row) for row in rows]
    schema_name = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    queries = (
        "SELECT table_name, column_name, ordinal_position, data_type, character_maximum_length, is_nullable, "
        "column_default FROM information_schema.columns WHERE table_schema = :s",
        "SELECT table_name, constraint_name, constraint_type FROM information_schema.table_constraints "
        "WHERE table_schema = :s AND constraint_type != 'CHECK'",
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = :s",
    )
    # Sequence defaults and index definitions name the schema, which differs per test.
    qualifier = re.compile(rf'"?{re.escape(schema_name)}"?\.')
    signature = []
    for query in queries:
        for row in conn.execute(sa.text(query), {"s": schema_name}):
            values = tuple(qualifier.sub("", v) if isinstance(v, str) else v for v in row)
            if not any("alembic_version" in str(value) for value in values):
                signature.append(values)
    return sorted(signature, key=repr)


def same_server_default(
    context: MigrationContext,
    inspected_column: sa.Column,
    metadata_column: sa.Column,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """Alembic's SQLite comparison cannot unquote an empty literal and reports ('') != ''."""
    if context.dialect.name != "sqlite" or inspected_default is None or rendered_metadata_default is None:
        return None  # Alembic's own comparison
    unquoted = re.sub(r"^\(?'(.*)'\)?$", r"\1", inspected_default)
    return unquoted != re.sub(r"^'(.*)'$", r"\1", rendered_metadata_default)


# -- revision 0001 is the 0.1.0 schema ---------------------------------------------------------


def test_revision_0001_builds_exactly_what_0_1_0_built(database: DbUnderTest, tmp_path: Path) -> None:
    built = Store(database.url)
    try:
        migrate_to(built, "0001")
    finally:
        built.close()
    with connect(database.url) as conn:
        from_migration = schema_signature(conn)
        meta_rows = [tuple(row) for row in conn.execute(sa.select(schema.meta))]
    with original_0_1_0(database, tmp_path) as original, connect(original.url) as conn:
        from_0_1_0 = schema_signature(conn)
    assert any("uq_alerts_firing_fingerprint" in repr(row) for row in from_migration)  # not vacuous
    assert from_migration == from_0_1_0
    assert meta_rows == [("schema_version", "1")]


# -- upgrading a 0.1.0 database ----------------------------------------------------------------


def test_0_1_0_database_is_upgraded_in_place_with_its_data(database: DbUnderTest) -> None:
    load_0_1_0(database)
    store = Store(database.url)
    try:
        assert {table: store.count_rows(table) for table in FIXTURE_ROWS} == FIXTURE_ROWS
        assert store.migrate() == SchemaMigration(from_revision="0001", to_revision=HEAD)
        assert {table: store.count_rows(table) for table in FIXTURE_ROWS} == FIXTURE_ROWS
        with store._engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == HEAD
            assert conn.execute(sa.select(schema.meta.c.value)).scalar_one() == "2"  # 0.1.0 refuses it
        assert [n["node"] for n in store.nodes()] == ["n02", "rack1|n01"]
        assert [(g["node"], g["gpu"]) for g in store.gpus()] == [
            ("n02", 0),
            ("n02", 1),
            ("rack1|n01", 0),
            ("rack1|n01", 1),
        ]
        assert set(store.latest_gpu_samples()) == {("n02", 0), ("n02", 1), ("rack1|n01", 0), ("rack1|n01", 1)}
        [event] = store.events_since(0)
        assert (event.node, event.gpu, event.xid) == ("rack1|n01", 1, 79)
        alerts = {(a["detector"], a["node"], a["gpu"]): a for a in store.alerts(status="firing")}
        assert {k: a["key"] for k, a in alerts.items()} == {
            ("xid", "rack1|n01", 1): "79",
            ("straggler.telemetry", "n02", 0): "",
            ("thermal", "n02", 0): "",
        }
        for alert in alerts.values():
            assert alert["fingerprint"] == finding_from_alert(alert).fingerprint
            assert re.fullmatch(r"[0-9a-f]{16}", alert["fingerprint"])
        assert alerts[("xid", "rack1|n01", 1)]["evidence"] == {"count": 1, "xid": 79}
        # The outbox survives: the webhook deliveries still pend, with their failed attempts.
        pending = store.due_deliveries(now=2e9)
        assert sorted(d["detector"] for d in pending) == ["straggler.telemetry", "thermal", "xid"]
        # Revision 0003: the outbox names the webhook by reference, and no stored error quotes its token.
        assert {d["target"] for d in pending} == {webhook_target("http://127.0.0.1:9/hook?token=s3cret")}
        assert all(d["attempts"] >= 5 and "refused" in d["last_error"] for d in pending)
        assert {d["last_error"] for d in pending} == {"http://127.0.0.1:9/...: [Errno 111] Connection refused"}
    finally:
        store.close()


def test_upgraded_xid_alert_reloads_and_is_not_opened_twice(database: DbUnderTest) -> None:
    load_0_1_0(database)
    store = Store(database.url)
    try:
        store.migrate()
        [alert] = [a for a in store.firing_alerts() if a["detector"] == "xid"]
        reloaded = finding_from_alert(alert)
        assert (reloaded.key, reloaded.node, reloaded.gpu) == ("79", "rack1|n01", 1)
        # The same finding as the XID detector raises it after the restart.
        raised_again = Finding(
            detector="xid",
            severity="critical",
            action="reboot",
            summary="XID 79: GPU has fallen off the bus",
            start=alert["starts_at"] + 30,
            node="rack1|n01",
            gpu=1,
            evidence={"xid": 79, "count": 2},
            key="79",
        )
        for finding in (reloaded, raised_again):
            assert store.open_alert(finding, now=2e9, targets=["log"]) == alert["id"]
        assert store.count_rows("alerts") == FIXTURE_ROWS["alerts"]
        assert store.count_rows("deliveries") == FIXTURE_ROWS["deliveries"]
        assert store.resolve_alert(raised_again.fingerprint, end=2e9, now=2e9, targets=["log"]) == alert["id"]
    finally:
        store.close()


def test_keys_are_recovered_exactly_whatever_the_names_hold(database: DbUnderTest) -> None:
    store = Store(database.url)
    try:
        migrate_to(store, "0001")
        with store._engine.begin() as conn:
            conn.execute(
                sa.insert(OLD_ALERTS),
                [
                    # Node "a|1" with key "k" and node "a", GPU 1 with key "|k": one 0.1.0 fingerprint.
                    old_alert("xid|a|1||||k", "xid", "a|1", None, "firing"),
                    old_alert("xid|a|1||||k", "xid", "a", 1, "resolved"),
                    # "|" in node and key: splitting at the fifth "|" made the key "|pending|limit".
                    old_alert("row_remap|n|x|2|||pending|limit", "row_remap", "n|x", 2, "firing"),
                    old_alert("thermal|n9||||", "thermal", "n9", None, "firing"),
                ],
            )
        store.migrate()
        alerts = store.alerts()
    finally:
        store.close()
    got = {(a["node"], a["gpu"], a["status"]): (a["key"], a["fingerprint"]) for a in alerts}
    assert {k: key for k, (key, _) in got.items()} == {
        ("a|1", None, "firing"): "k",
        ("a", 1, "resolved"): "|k",
        ("n|x", 2, "firing"): "pending|limit",
        ("n9", None, "firing"): "",
    }
    assert got[("a|1", None, "firing")][1] != got[("a", 1, "resolved")][1]
    for alert in alerts:
        assert alert["fingerprint"] == finding_from_alert(alert).fingerprint


def test_frozen_fingerprint_of_revision_0002_equals_finding_fingerprint() -> None:
    frozen = revision_module("0002").fingerprint
    findings = [
        Finding("xid", "critical", "reboot", "s", 0.0, node="rack1|n01", gpu=1, key="79"),
        Finding("xid", "critical", "reboot", "s", 0.0, node="a|1", key="k"),
        Finding("xid", "critical", "reboot", "s", 0.0, node="a", gpu=1, key="|k"),
        Finding("straggler.steps", "warning", "check_app", "s", 0.0, job="train|7", rank=3, key="peers"),
        Finding("thermal", "warning", "none", "s", 0.0, node="n02", gpu=0),
        Finding("row_remap", "warning", "none", "s", 0.0, node='n"ü\\', gpu=0, key="pending|limit"),
        Finding("pcie", "info", "none", "s", 0.0),
    ]
    fingerprints = [f.fingerprint for f in findings]
    assert fingerprints == [frozen(f.detector, f.node, f.gpu, f.job, f.rank, f.key) for f in findings]
    assert len(set(fingerprints)) == len(findings)
    assert all(re.fullmatch(r"[0-9a-f]{16}", fp) for fp in fingerprints)


def test_downgrade_to_0001_gives_back_the_0_1_0_database(database: DbUnderTest) -> None:
    load_0_1_0(database)
    store = Store(database.url)
    try:
        store.migrate()
        migrate_to(store, "0001", down=True)
        with store._engine.connect() as conn:
            assert set(conn.execute(sa.select(OLD_ALERTS.c.fingerprint)).scalars()) == FIXTURE_FINGERPRINTS_0_1_0
            assert "key" not in {c["name"] for c in sa.inspect(conn).get_columns("alerts")}
            assert conn.execute(sa.select(schema.meta.c.value)).scalar_one() == "1"
        assert store.migrate() == SchemaMigration(from_revision="0001", to_revision=HEAD)
        assert {a["key"] for a in store.alerts()} == {"79", ""}
    finally:
        store.close()


def test_a_failed_upgrade_changes_nothing(database: DbUnderTest) -> None:
    load_0_1_0(database)
    with connect(database.url) as conn:  # not a fingerprint 0.1.0 could write
        conn.execute(sa.insert(OLD_ALERTS), [old_alert("made-up", "xid", "n7", 0, "resolved")])
    store = Store(database.url)
    try:
        with pytest.raises(StoreError, match="made-up"):
            store.migrate()
        with store._engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() is None
            assert "key" not in {c["name"] for c in sa.inspect(conn).get_columns("alerts")}
            assert set(conn.execute(sa.select(OLD_ALERTS.c.fingerprint)).scalars()) == {
                *FIXTURE_FINGERPRINTS_0_1_0,
                "made-up",
            }
    finally:
        store.close()


# -- fresh databases, refusals, concurrency ----------------------------------------------------


def test_empty_database_is_built_at_head_and_schema_py_matches_it(database: DbUnderTest) -> None:
    store = Store(database.url)
    try:
        assert store.migrate() == SchemaMigration(from_revision=None, to_revision=HEAD)
        assert store.migrate() == SchemaMigration(from_revision=HEAD, to_revision=HEAD)
        with store._engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": same_server_default}
            )
            # A change to schema.py without a migration (or the reverse) fails here.
            assert compare_metadata(context, schema.metadata) == []
    finally:
        store.close()


def test_a_revision_from_a_newer_fleetwatch_is_refused_by_name(database: DbUnderTest) -> None:
    store = Store(database.url)
    try:
        store.migrate()
        with store._engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
        with pytest.raises(StoreError, match=r"schema revision '0099_from_the_future'.*newer fleetwatch"):
            store.migrate()
    finally:
        store.close()


def test_a_meta_version_0_1_0_never_wrote_is_refused(database: DbUnderTest) -> None:
    load_0_1_0(database)
    with connect(database.url) as conn:
        conn.execute(sa.update(schema.meta).values(value="7"))
    store = Store(database.url)
    try:
        with pytest.raises(StoreError, match="schema_version '7'"):
            store.migrate()
        assert store.count_rows("alerts") == FIXTURE_ROWS["alerts"]
    finally:
        store.close()


def test_two_collectors_migrating_at_once_both_start(database: DbUnderTest) -> None:
    stores = [Store(database.url) for _ in range(2)]
    results: list[SchemaMigration | BaseException] = []

    def migrate(store: Store) -> None:
        try:
            results.append(store.migrate())
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=migrate, args=(store,)) for store in stores]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert set(results) == {
            SchemaMigration(from_revision=None, to_revision=HEAD),
            SchemaMigration(from_revision=HEAD, to_revision=HEAD),
        }
    finally:
        for store in stores:
            store.close()
