"""Database fixtures for the collector tests: each `store` test runs on SQLite and on PostgreSQL.

PostgreSQL comes from FLEETWATCH_TEST_PG_URL (default: the local trust-auth server); every test
gets its own schema, dropped afterwards. When the server is unreachable the PostgreSQL variants
skip, except on CI (CI set), where they fail so a missing server is never silently green.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from fleetwatch.collector.storage.store import Store, redact_url

PG_URL_ENV = "FLEETWATCH_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Long enough for a loaded CI host, short enough that a firewalled address fails fast.
PG_CONNECT_TIMEOUT_SECONDS = 5


@dataclass(frozen=True)
class DbUnderTest:
    kind: str  # "sqlite" or "postgres"
    url: str  # what Store() is given
    # PostgreSQL only: an autocommit connection pool outside the test's schema, for fault injection.
    admin: Engine | None = None
    # PostgreSQL only: the test's own schema (every connection of `url` has it as search_path).
    pg_schema: str | None = None


@pytest.fixture(scope="session")
def pg_admin_engine() -> Iterator[tuple[str, Engine]]:
    url = os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)
    engine = create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS},
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to reach the server means "no PostgreSQL here"
        engine.dispose()
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        reason = f"PostgreSQL at {redact_url(url)} ({PG_URL_ENV}) unreachable: {detail}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    yield url, engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path) -> Iterator[DbUnderTest]:
    if request.param == "sqlite":
        yield DbUnderTest(kind="sqlite", url=f"sqlite:///{tmp_path / 'fleetwatch.db'}")
        return
    base_url, admin = request.getfixturevalue("pg_admin_engine")
    schema_name = f"fw_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema_name}"'))
    # search_path in the URL confines every connection of the Store under test to this schema.
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema_name}"})
    try:
        yield DbUnderTest(
            kind="postgres",
            url=url.render_as_string(hide_password=False),
            admin=admin,
            pg_schema=schema_name,
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema_name}" CASCADE'))


@pytest.fixture
def store(database: DbUnderTest) -> Iterator[Store]:
    st = Store(database.url)
    st.migrate()
    try:
        yield st
    finally:
        st.close()
