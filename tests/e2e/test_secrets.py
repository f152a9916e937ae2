"""A real collector on PostgreSQL with a password and webhooks with tokens: neither shows in its log or API.

The collector runs as a process on a fresh PostgreSQL schema (the password is a sentinel the local
trust-auth server accepts), streams from a simulated agent with an XID fault, and fails to deliver
the alert to webhooks on a closed port, which it logs. Its whole output and every API answer must
hold the redacted forms only. Without PostgreSQL these tests skip, except on CI, where they fail.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url

from fleetwatch.collector.notify import webhook_target
from fleetwatch.collector.storage import schema
from fleetwatch.collector.storage.store import redact_url
from tests.collector import conftest as collector_conftest
from tests.e2e.e2e_support import clean_env, free_port, wait_for

PASSWORD = "PASSWORD-SENTINEL-e2e-51c3"
TOKEN = "TOKEN-SENTINEL-e2e-a9d0"

# The collector tests' PostgreSQL fixture: skip without a server, fail on CI.
pg_admin_engine = collector_conftest.pg_admin_engine
pytestmark = pytest.mark.postgres


class Process:
    """A fleetwatch daemon with stdout and stderr in one log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.proc = subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def pg_url(pg_admin_engine: tuple[str, Engine]) -> Iterator[tuple[str, Engine]]:
    """A URL with the sentinel password confined to a fresh schema, and an engine for that schema."""
    base_url, admin = pg_admin_engine
    schema_name = f"fw_secrets_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema_name}"'))
    url = make_url(base_url).set(password=PASSWORD).update_query_dict({"options": f"-csearch_path={schema_name}"})
    try:
        yield (
            url.render_as_string(hide_password=False),
            admin.execution_options(schema_translate_map={None: schema_name}),
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema_name}" CASCADE'))


def start_collector(env_settings: dict[str, str], log: Path) -> tuple[Process, int, int]:
    grpc_port, http_port = free_port(), free_port()
    args = [
        sys.executable, "-m", "fleetwatch.collector.main", "--config", "/dev/null",
        "--grpc-listen", f"127.0.0.1:{grpc_port}", "--http-listen", f"127.0.0.1:{http_port}",
        "--detect-interval-seconds", "0.2", "--delivery-backoff-min-seconds", "0.2",
        "--delivery-backoff-max-seconds", "0.5", "--log-level", "debug",
    ]  # fmt: skip
    collector = Process(args, {**clean_env(), **env_settings}, log)
    wait_for(lambda: healthy(http_port) or collector.proc.poll() is not None, 30, "the collector to start")
    assert collector.proc.poll() is None, f"the collector exited:\n{log.read_text()}"
    return collector, grpc_port, http_port


def start_agent(grpc_port: int, spool: Path, log: Path) -> Process:
    args = [
        sys.executable, "-m", "fleetwatch.agent.main", "--config", "/dev/null", "--simulate",
        "--node", "s01", "--sim-gpus", "2", "--sim-faults", "xid:79@0+1",
        "--collector-address", f"127.0.0.1:{grpc_port}", "--sampling-interval-seconds", "0.2",
        "--spool-dir", str(spool), "--no-spool-fsync", "--metrics-listen", "", "--step-socket", "", "--kmsg-path", "",
    ]  # fmt: skip
    return Process(args, clean_env(), log)


def get(http_port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=5) as r:
        return r.read().decode()


def healthy(http_port: int) -> bool:
    try:
        return json.loads(get(http_port, "/healthz"))["ok"]
    except OSError:
        return False


def closed_port() -> int:
    return free_port()  # bound, then released: nothing listens there


def test_password_and_tokens_stay_out_of_log_and_api(tmp_path: Path, pg_url: tuple[str, Engine]) -> None:
    database_url, db = pg_url
    hook_port = closed_port()
    webhooks = [
        f"http://127.0.0.1:{hook_port}/services/T0/B0/{TOKEN}?token={TOKEN}",
        f"http://ops:{TOKEN}@127.0.0.1:{hook_port}/alerts",
    ]
    log = tmp_path / "collector.log"
    env = {"FLEETWATCH_DATABASE_URL": database_url, "FLEETWATCH_WEBHOOK_URLS": ",".join(webhooks)}
    collector, grpc_port, http_port = start_collector(env, log)
    agent = start_agent(grpc_port, tmp_path / "spool", tmp_path / "agent.log")
    try:
        # Each webhook by its outbox reference: the origin and a key, "#" then 16 hex digits.
        failed = re.compile(rf"delivery to webhook:http://127\.0\.0\.1:{hook_port}/\.\.\.#[0-9a-f]{{16}} failed")
        wait_for(
            lambda: len(failed.findall(log.read_text())) >= 4, 40, "failed deliveries to both webhooks to be logged"
        )
        answers = {path: get(http_port, path) for path in ("/api/v1/status", "/api/v1/alerts?status=all", "/metrics")}
    finally:
        agent.stop()
        collector.stop()
    output = log.read_text()

    assert any(a["detector"] == "xid" for a in json.loads(answers["/api/v1/alerts?status=all"])["alerts"])
    for where, body in {**answers, "collector output": output}.items():
        assert PASSWORD not in body, f"the database password leaked into {where}"
        assert TOKEN not in body, f"a webhook token leaked into {where}"
    redacted_db = redact_url(database_url)
    assert ":***@" in redacted_db
    assert f"'database_url': '{redacted_db}'" in output  # the start-up line
    assert f"database {redacted_db}" in output  # "collector listening: ..."
    assert f"'webhook_urls': ['http://127.0.0.1:{hook_port}/...', 'http://127.0.0.1:{hook_port}/...']" in output

    deliveries = schema.deliveries
    with db.connect() as conn:
        query = select(deliveries.c.target, deliveries.c.last_error).where(deliveries.c.target.like("webhook:%"))
        stored = conn.execute(query).all()
    assert {target for target, _ in stored} == {webhook_target(url) for url in webhooks}  # references, no URLs
    assert all(error and TOKEN not in error for _, error in stored)


def test_database_url_and_webhooks_from_files(tmp_path: Path, pg_url: tuple[str, Engine]) -> None:
    database_url, _ = pg_url
    db_file = tmp_path / "database_url"
    db_file.write_text(database_url + "\n")
    hooks_file = tmp_path / "webhook_urls"
    hooks_file.write_text(f"# on-call\nhttps://hooks.slack.com/services/T0/B0/{TOKEN}\n")
    log = tmp_path / "collector.log"
    env = {"FLEETWATCH_DATABASE_URL_FILE": str(db_file), "FLEETWATCH_WEBHOOK_URLS_FILE": str(hooks_file)}
    collector, _, http_port = start_collector(env, log)
    try:
        status = get(http_port, "/api/v1/status")
    finally:
        collector.stop()
    output = log.read_text()

    assert json.loads(status)["nodes"] == []
    assert PASSWORD not in output and TOKEN not in output
    assert f"'database_url_file': '{db_file}'" in output
    assert f"database {redact_url(database_url)}" in output
    assert "'webhook_urls': ['https://hooks.slack.com/...']" in output
