"""/healthz answers while the loop does; /readyz tells the truth about the database and ingest, within 5 s."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.health import MIN_FREE_DISK_BYTES, Readiness
from fleetwatch.collector.storage.store import StoreError
from fleetwatch.v1 import telemetry_pb2 as pb
from tests.collector.conftest import DbUnderTest
from tests.collector.test_collector_app import METHOD, batch, hello

# What the issue asks: 503 within 5 s of the database going away, 200 within 5 s of its return.
VERDICT_BUDGET_SECONDS = 5.0


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def get(app: CollectorApp, path: str) -> tuple[int, dict[str, Any]]:
    """GET from a worker thread: the collector answers on this test's event loop."""
    return await asyncio.to_thread(_get, f"http://127.0.0.1:{app.http_port}{path}")


async def seconds_until(app: CollectorApp, status: int) -> tuple[float, dict[str, Any]]:
    """Seconds until /readyz answers `status` (and that answer), polling; fails past twice the budget."""
    started = time.monotonic()
    while True:
        answered, body = await get(app, "/readyz")
        elapsed = time.monotonic() - started
        if answered == status:
            return elapsed, body
        if elapsed > 2 * VERDICT_BUDGET_SECONDS:
            raise AssertionError(f"/readyz still {answered} after {elapsed:.1f} s: {body}")
        await asyncio.sleep(0.1)


class Agent:
    """Streams a batch every 50 ms as an agent does: resends what is not acked on its next stream."""

    def __init__(self, port: int, node: str = "n01") -> None:
        self.port = port
        self.node = node
        self.produced = 0
        self.acked = 0
        self.streams = 0
        self._producing = True
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Agent:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def drain(self, timeout_seconds: float = 20.0) -> None:
        """Stop producing; return once everything produced is acked (stored)."""
        self._producing = False
        deadline = time.monotonic() + timeout_seconds
        while self.acked < self.produced:
            assert time.monotonic() < deadline, f"acked {self.acked} of {self.produced}"
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):  # the collector refused: resend later
                await self._stream_once()
            await asyncio.sleep(0.2)

    async def _stream_once(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            call = channel.stream_stream(
                METHOD,
                request_serializer=pb.AgentMessage.SerializeToString,
                response_deserializer=pb.CollectorMessage.FromString,
            )()
            self.streams += 1
            await call.write(hello(node=self.node, gpus=1))
            welcome = await asyncio.wait_for(call.read(), 60)
            if welcome is grpc.aio.EOF:
                return
            self.acked = max(self.acked, welcome.welcome.last_seq)
            sent = self.acked

            async def read_acks() -> None:
                while (reply := await call.read()) is not grpc.aio.EOF:
                    if reply.WhichOneof("body") == "ack":
                        self.acked = max(self.acked, reply.ack.seq)

            reader = asyncio.create_task(read_acks())
            try:
                while not reader.done():
                    if self._producing:
                        self.produced += 1
                    while sent < self.produced:
                        sent += 1
                        await call.write(batch(sent, gpus=1))
                    await asyncio.sleep(0.05)
                reader.result()
            finally:
                reader.cancel()
                call.cancel()


def config_for(database_url: str) -> CollectorConfig:
    return CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=database_url,
        log_alerts=False,
        detect_interval_seconds=0.5,
    )


@contextlib.asynccontextmanager
async def running(config: CollectorConfig) -> AsyncIterator[CollectorApp]:
    app = CollectorApp(config)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_seconds=0.2)


async def test_healthy_collector_is_live_and_ready(tmp_path: Path) -> None:
    async with running(config_for(f"sqlite:///{tmp_path / 'c.db'}")) as app:
        status, body = await get(app, "/readyz")
        assert status == 200 and body["ready"] is True and body["problems"] == []
        assert body["database"]["writable"] is True and body["database"]["disk_free_bytes"] > 0
        assert body["ingest"]["writer_running"] is True
        status, body = await get(app, "/healthz")
        assert status == 200 and body["ok"] is True and body["ready"] is True
        assert body["readiness"]["database"]["writable"] is True


async def test_locked_sqlite_database_is_not_ready_and_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with running(config_for(f"sqlite:///{path}")) as app, Agent(app.grpc_port) as agent:
        await asyncio.sleep(0.5)
        assert (await get(app, "/readyz"))[0] == 200 and agent.acked > 0
        # Another process holds the write lock: every write waits, then fails "database is locked".
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            elapsed, body = await seconds_until(app, 503)
            assert elapsed < VERDICT_BUDGET_SECONDS, body
            assert body["ready"] is False and any("database" in p for p in body["problems"]), body
            status, live = await get(app, "/healthz")
            assert status == 200 and live["ok"] is True  # liveness: the loop answers
            produced_while_locked = agent.produced
            await asyncio.sleep(1.0)
            assert agent.produced > produced_while_locked  # the agent kept producing meanwhile
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        elapsed, body = await seconds_until(app, 200)
        assert elapsed < VERDICT_BUDGET_SECONDS, body
        await agent.drain()
        assert app.store.count_rows("batches") == agent.produced


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs to fill up; skipped where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros until the filesystem is full; the filler file, to delete for recovery."""
    filler = disk / "filler"
    chunk = b"\0" * (1024 * 1024)
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(chunk)
            f.flush()
    return filler


async def test_full_disk_is_not_ready_and_ready_again_once_freed(small_disk: Path) -> None:
    async with running(config_for(f"sqlite:///{small_disk / 'c.db'}")) as app, Agent(app.grpc_port) as agent:
        await asyncio.sleep(0.5)
        assert (await get(app, "/readyz"))[0] == 200
        filler = await asyncio.to_thread(fill, small_disk)
        elapsed, body = await seconds_until(app, 503)
        assert elapsed < VERDICT_BUDGET_SECONDS, body
        assert body["database"]["disk_free_bytes"] < MIN_FREE_DISK_BYTES
        assert any(p.startswith("disk:") for p in body["problems"]), body
        filler.unlink()
        elapsed, body = await seconds_until(app, 200)
        assert elapsed < VERDICT_BUDGET_SECONDS, body
        await agent.drain()
        assert app.store.count_rows("batches") == agent.produced


@pytest.fixture
def pg_database(pg_admin_engine) -> Iterator[DbUnderTest]:
    """A schema of its own, and an application_name that tells the collector's connections apart."""
    base_url, admin = pg_admin_engine
    schema_name = f"fw_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema_name}"'))
    url = make_url(base_url).update_query_dict(
        {"options": f"-csearch_path={schema_name}", "application_name": schema_name}
    )
    try:
        yield DbUnderTest(
            kind="postgres", url=url.render_as_string(hide_password=False), admin=admin, pg_schema=schema_name
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema_name}" CASCADE'))


@pytest.mark.postgres
async def test_postgres_gone_is_not_ready_and_nothing_is_lost(pg_database: DbUnderTest) -> None:
    assert pg_database.admin is not None
    schema_name = pg_database.pg_schema
    async with running(config_for(pg_database.url)) as app, Agent(app.grpc_port) as agent:
        await asyncio.sleep(0.5)
        assert (await get(app, "/readyz"))[0] == 200 and agent.acked > 0
        with pg_database.admin.connect() as admin:
            # The database "goes away": the collector's sessions are killed, and what it reconnects
            # to cannot write (the tables it writes are locked by this session until released).
            admin.exec_driver_sql("BEGIN")
            admin.exec_driver_sql(f'LOCK TABLE "{schema_name}".meta, "{schema_name}".batches IN ACCESS EXCLUSIVE MODE')
            killed = admin.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :name AND pid != pg_backend_pid()"
                ),
                {"name": schema_name},
            ).scalar_one()
            assert killed >= 1
            try:
                elapsed, body = await seconds_until(app, 503)
                assert elapsed < VERDICT_BUDGET_SECONDS, body
                assert body["ready"] is False, body
                assert (await get(app, "/healthz"))[0] == 200
                produced_while_down = agent.produced
                await asyncio.sleep(1.0)
                assert agent.produced > produced_while_down
            finally:
                admin.exec_driver_sql("ROLLBACK")
        elapsed, body = await seconds_until(app, 200)
        assert elapsed < VERDICT_BUDGET_SECONDS, body
        await agent.drain()
        assert app.store.count_rows("batches") == agent.produced


class StubWriter:
    """The ingest writer's facts as /readyz reads them, set by hand (times on the test's clock)."""

    alive = True
    queued = 0
    commit_started_at: float | None = None
    failing_since: float | None = None
    last_error_at: float | None = None
    last_commit_at: float | None = None


class StubStore:
    """A database whose write probe succeeds, fails, or hangs until released."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.release = threading.Event()
        self.release.set()

    def probe_write(self, now: float, timeout_seconds: float) -> None:
        self.release.wait(30)
        if self.error is not None:
            raise self.error


async def test_ingest_that_is_stuck_failing_or_dead_is_not_ready() -> None:
    now = 1000.0
    writer = StubWriter()
    readiness = Readiness(StubStore(), writer, clock=lambda: now)  # type: ignore[arg-type]
    try:

        async def problems(**facts: Any) -> list[str]:
            for name, value in {**vars(StubWriter), **facts}.items():
                if not name.startswith("_"):
                    setattr(writer, name, value)
            answer = await readiness.check()
            assert answer["ready"] is (not answer["problems"])
            return answer["problems"]

        assert await problems() == []
        assert await problems(alive=False) == ["ingest: the database writer thread is not running"]
        assert await problems(commit_started_at=now - 1) == []  # a commit in progress
        assert await problems(commit_started_at=now - 4) == ["ingest: one commit has been running for 4.0 s"]
        assert await problems(failing_since=now - 1, last_error_at=now - 1) == []  # one failure: not yet
        assert await problems(failing_since=now - 3, last_error_at=now - 0.5) == [
            "ingest: storing batches has failed for 3.0 s"
        ]
        # No batch has come to fail again for a while: the write probe alone speaks for the database.
        assert await problems(failing_since=now - 30, last_error_at=now - 11) == []
    finally:
        readiness.close()


async def test_a_probe_that_hangs_is_not_ready_within_its_timeout() -> None:
    store = StubStore()
    readiness = Readiness(store, StubWriter(), probe_timeout_seconds=0.3)  # type: ignore[arg-type]
    try:
        assert (await readiness.check())["ready"] is True
        await asyncio.sleep(1.1)  # the cached answer goes stale
        store.release.clear()
        started = time.monotonic()
        answer = await readiness.check()
        assert time.monotonic() - started < 1.0
        assert answer["ready"] is False and answer["problems"] == ["database: no answer to a write within 0.3 s"]
        await asyncio.sleep(0.3)
        # /healthz does not wait: it shows the hang, not the stale success before it.
        assert readiness.snapshot()["database"]["writable"] is False
        store.error = StoreError("database x: write probe failed: disk I/O error")
        store.release.set()
        await asyncio.sleep(0.1)
        answer = await readiness.check()
        assert answer["problems"] == ["database not writable: database x: write probe failed: disk I/O error"]
    finally:
        store.release.set()
        readiness.close()
