"""The collector's secrets (database password, webhook tokens) stay out of logs, errors and stored errors."""

from __future__ import annotations

import base64
import logging
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from fleetwatch.collector.config import CollectorConfig, DatabaseUrl, WebhookUrl
from fleetwatch.collector.main import build_parser, main
from fleetwatch.collector.notify import Notifiers, NotifyError, notifier_for, target_for_log, webhook_target
from fleetwatch.collector.notify.webhook import WebhookNotifier, scrub
from fleetwatch.collector.outbox import Outbox
from fleetwatch.collector.storage import schema
from fleetwatch.collector.storage.store import Store, redact_url
from fleetwatch.configfile import MASK, ConfigError, describe, load_config
from fleetwatch.records import Finding
from tests.collector.conftest import DbUnderTest

TOKEN = "TOKEN-SENTINEL-9f2c"
PASSWORD = "PASSWORD-SENTINEL-77a1"
ALERT: dict[str, Any] = {
    "fingerprint": "0123456789abcdef",
    "detector": "xid",
    "severity": "critical",
    "action": "reboot",
    "node": "n01",
    "gpu": 3,
    "summary": "XID 79: GPU has fallen off the bus",
    "starts_at": 1_700_000_000.0,
    "transition": "firing",
}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A loopback webhook that answers `status` and records each request's Authorization header."""

    def __init__(self, status: int = 200) -> None:
        self.authorization: list[str | None] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.authorization.append(self.headers.get("Authorization"))
                self.send_response(status)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    r = Receiver(getattr(request, "param", 200))
    yield r
    r.close()


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql+psycopg://fw:{PASSWORD}@db.internal:5432/fw", "postgresql+psycopg://fw:***@db.internal:5432/fw"),
        (
            f"postgresql+psycopg://fw@db.internal/fw?password={PASSWORD}",
            "postgresql+psycopg://fw@db.internal/fw?password=***",
        ),
        (
            f"postgresql+psycopg://fw@db/fw?sslpassword={PASSWORD}&options=-csearch_path%3Dx",
            "postgresql+psycopg://fw@db/fw?options=-csearch_path%3Dx&sslpassword=***",
        ),
        ("sqlite:////var/lib/fleetwatch/collector.db", "sqlite:////var/lib/fleetwatch/collector.db"),
        (f"postgres//fw:{PASSWORD}@db/fw", MASK),  # unparseable, with userinfo
        ("sqlite/x.db", "sqlite/x.db"),  # unparseable, nothing that could be a password
    ],
)
def test_database_url_redaction(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert str(DatabaseUrl(url)) == shown


def test_collector_config_prints_secrets_redacted() -> None:
    env = {
        "FLEETWATCH_DATABASE_URL": f"postgresql+psycopg://fw:{PASSWORD}@db.internal/fw",
        "FLEETWATCH_WEBHOOK_URLS": f"https://hooks.slack.com/services/T0/B0/{TOKEN},http://am:9093/x?token={TOKEN}",
    }
    config = load_config(CollectorConfig, path=None, env=env)
    assert config.database_url.reveal() == env["FLEETWATCH_DATABASE_URL"]
    assert [u.reveal() for u in config.webhook_urls][1] == f"http://am:9093/x?token={TOKEN}"
    line = str(describe(config))
    assert PASSWORD not in line and TOKEN not in line
    assert "postgresql+psycopg://fw:***@db.internal/fw" in line
    assert "['https://hooks.slack.com/...', 'http://am:9093/...']" in line


def test_directly_built_collector_config_holds_secrets() -> None:
    config = CollectorConfig(database_url="sqlite:///x.db", webhook_urls=[f"http://a/{TOKEN}"])  # type: ignore[arg-type]
    assert isinstance(config.database_url, DatabaseUrl) and isinstance(config.webhook_urls[0], WebhookUrl)
    assert TOKEN not in repr(config)


def test_secrets_from_files(tmp_path: Path) -> None:
    db_file = tmp_path / "database_url"
    db_file.write_text(f"postgresql+psycopg://fw:{PASSWORD}@db.internal/fw\n")
    hooks_file = tmp_path / "webhook_urls"
    hooks_file.write_text(f"# paging\nhttps://hooks.slack.com/services/T0/B0/{TOKEN}\n\nhttp://am:9093/x\n")
    env = {"FLEETWATCH_DATABASE_URL_FILE": str(db_file), "FLEETWATCH_WEBHOOK_URLS_FILE": str(hooks_file)}
    config = load_config(CollectorConfig, path=None, env=env)
    assert config.database_url.reveal() == f"postgresql+psycopg://fw:{PASSWORD}@db.internal/fw"
    assert [u.reveal() for u in config.webhook_urls] == [
        f"https://hooks.slack.com/services/T0/B0/{TOKEN}",
        "http://am:9093/x",
    ]
    assert PASSWORD not in str(describe(config)) and TOKEN not in str(describe(config))


def test_database_url_and_its_file_together_is_an_error(tmp_path: Path) -> None:
    toml = tmp_path / "collector.toml"
    toml.write_text('database_url = "sqlite:///x.db"\n')
    with pytest.raises(ConfigError) as error:
        load_config(CollectorConfig, path=toml, env={"FLEETWATCH_DATABASE_URL_FILE": "/run/credentials/db"})
    assert str(error.value) == (
        f"database_url (from {toml}) and database_url_file (from environment FLEETWATCH_DATABASE_URL_FILE) "
        "are both set; set only one"
    )


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://hooks.example/{TOKEN}",
        f"http://hooks.example/a b/{TOKEN}",
        f"http://hooks.example:x/{TOKEN}",
        f"http:///{TOKEN}",
    ],
)
def test_bad_webhook_urls_are_rejected_without_their_tokens(url: str) -> None:
    with pytest.raises(ConfigError, match="webhook_urls: not http") as error:
        load_config(CollectorConfig, path=None, env={"FLEETWATCH_WEBHOOK_URLS": url})
    assert TOKEN not in str(error.value)


@pytest.mark.parametrize(
    "url", [f"postgresql+psycopg://fw@db.internal:{PASSWORD}/fw", f"postgresql+psycopg//fw:{PASSWORD}@db.internal/fw"]
)
def test_unparseable_database_url_is_rejected_without_its_password(url: str) -> None:
    # A password where the port belongs would otherwise surface in SQLAlchemy's ValueError at start.
    with pytest.raises(ConfigError, match="database_url: must be a SQLAlchemy URL") as error:
        load_config(CollectorConfig, path=None, env={"FLEETWATCH_DATABASE_URL": url})
    assert PASSWORD not in str(error.value)


def test_configuration_error_printed_by_main_holds_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "collector.toml"
    toml.write_text(f'webhook_urls = ["ftp://ops:{PASSWORD}@hooks.example/{TOKEN}"]\n')
    assert main(["--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "webhook_urls" in err and "ftp://hooks.example/..." in err
    assert PASSWORD not in err and TOKEN not in err


def test_missing_secret_file_is_named_by_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-file"
    assert main(["--config", "/dev/null", "--database-url-file", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"database_url_file (from --database-url-file): cannot read {missing}" in err


def test_help_documents_the_file_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--database-url-file" in out and "FLEETWATCH_DATABASE_URL_FILE" in out
    assert "--webhook-urls-file" in out and "FLEETWATCH_WEBHOOK_URLS_FILE" in out


# -- notifiers ------------------------------------------------------------------------------------


def test_target_for_log() -> None:
    assert target_for_log("log") == "log"
    assert (
        target_for_log(f"webhook:https://hooks.slack.com/services/T0/B0/{TOKEN}")
        == "webhook:https://hooks.slack.com/..."
    )
    assert target_for_log(f"pager:https://pager.example/{TOKEN}") == f"pager:{MASK}"  # unknown: nothing shown
    reference = webhook_target(f"https://hooks.slack.com/services/T0/B0/{TOKEN}")
    assert target_for_log(reference) == reference and TOKEN not in reference  # what the outbox stores


def test_unknown_target_error_names_only_the_scheme() -> None:
    with pytest.raises(NotifyError, match="no notifier for target scheme 'webhok'") as error:
        notifier_for(f"webhok:https://hooks.example/{TOKEN}")
    assert TOKEN not in str(error.value)


def test_unreachable_webhook_error_has_no_token() -> None:
    port = closed_port()
    notifier = WebhookNotifier(f"http://127.0.0.1:{port}/hook?token={TOKEN}", timeout_seconds=2)
    with pytest.raises(NotifyError) as error:
        notifier.send([ALERT])
    message = str(error.value)
    assert TOKEN not in message
    assert message.startswith(f"http://127.0.0.1:{port}/...: ") and "refused" in message


@pytest.mark.parametrize("receiver", [500], indirect=True)
def test_http_error_answer_has_no_token(receiver: Receiver) -> None:
    notifier = WebhookNotifier(f"http://127.0.0.1:{receiver.port}/services/{TOKEN}", timeout_seconds=2)
    with pytest.raises(NotifyError) as error:
        notifier.send([ALERT])
    assert str(error.value).startswith(f"http://127.0.0.1:{receiver.port}/... answered HTTP 500")
    assert TOKEN not in str(error.value)


def test_malformed_url_quoted_by_http_client_is_scrubbed() -> None:
    # A space in the path makes http.client raise InvalidURL quoting the path (config rejects such
    # URLs, an older database row may still hold one).
    notifier = WebhookNotifier(f"http://127.0.0.1:{closed_port()}/a b?token={TOKEN}", timeout_seconds=2)
    with pytest.raises(NotifyError) as error:
        notifier.send([ALERT])
    assert "can't contain control characters" in str(error.value)
    assert TOKEN not in str(error.value)


def test_userinfo_is_sent_as_basic_auth_and_never_shown(receiver: Receiver) -> None:
    WebhookNotifier(f"http://ops:{PASSWORD}@127.0.0.1:{receiver.port}/hook", timeout_seconds=2).send([ALERT])
    assert receiver.authorization == ["Basic " + base64.b64encode(f"ops:{PASSWORD}".encode()).decode()]
    notifier = WebhookNotifier(f"http://ops:{PASSWORD}@127.0.0.1:{closed_port()}/hook", timeout_seconds=2)
    with pytest.raises(NotifyError) as error:
        notifier.send([ALERT])
    assert PASSWORD not in str(error.value) and "ops" not in str(error.value)


def test_scrub_hides_every_token_bearing_part() -> None:
    url = f"http://ops:{PASSWORD}@hooks.example:8080/services/{TOKEN}?key={TOKEN}#{TOKEN}"
    for text in (url, f"nonnumeric port: '{PASSWORD}@hooks.example'", repr(f"/services/{TOKEN}\n")):
        assert TOKEN not in scrub(text, url) and PASSWORD not in scrub(text, url)
    assert scrub("[Errno 111] Connection refused", url) == "[Errno 111] Connection refused"


# -- the outbox -----------------------------------------------------------------------------------


def stored_deliveries(database: DbUnderTest) -> list[tuple[str, str | None]]:
    engine = create_engine(database.url)
    try:
        with engine.connect() as conn:
            query = select(schema.deliveries.c.target, schema.deliveries.c.last_error).order_by(schema.deliveries.c.id)
            return [(target, last_error) for target, last_error in conn.execute(query)]
    finally:
        engine.dispose()


def test_outbox_logs_and_stores_only_redacted_targets(
    store: Store, database: DbUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    url = f"http://ops:{PASSWORD}@127.0.0.1:{port}/hook?token={TOKEN}"
    notifiers = Notifiers(log_alerts=False, webhook_urls=[url], timeout_seconds=2)
    (target,) = notifiers.targets
    assert target == webhook_target(url) and re.fullmatch(
        rf"webhook:http://127\.0\.0\.1:{port}/\.\.\.#[0-9a-f]{{16}}", target
    )
    finding = Finding(
        detector="xid", severity="critical", action="reboot", summary="XID 79", start=100.0, node="n01", gpu=3
    )
    store.open_alert(finding, now=100.0, targets=notifiers.targets)
    outbox = Outbox(store, notifiers, max_attempts=2, backoff_min_seconds=0.01, backoff_max_seconds=0.01)
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):  # a retry, then giving up
            outbox._deliver(store.due_deliveries(now=1e12))
    assert outbox.retried == 1 and outbox.failed == 1
    assert TOKEN not in caplog.text and PASSWORD not in caplog.text
    assert f"delivery to {target} failed" in caplog.text
    assert f"giving up on 1 alert transition(s) to {target} after 2 attempts" in caplog.text
    ((stored_target, last_error),) = stored_deliveries(database)
    assert stored_target == target  # a reference: the database holds no token
    assert last_error is not None and TOKEN not in last_error and PASSWORD not in last_error
    assert last_error.startswith(f"http://127.0.0.1:{port}/...: ")


def test_outbox_sends_an_old_rows_whole_url_and_fails_a_reference_no_longer_configured(
    store: Store, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{receiver.port}/hook?token={TOKEN}"
    removed = webhook_target(f"http://127.0.0.1:{receiver.port}/old?token={TOKEN}")
    # Written by a collector before revision 0003 (the migration rewrites these; a shared database may not wait).
    legacy = f"webhook:{url}"
    finding = Finding(detector="xid", severity="critical", action="reboot", summary="XID 79", start=1.0, node="n01")
    store.open_alert(finding, now=1.0, targets=[legacy, removed])
    outbox = Outbox(store, Notifiers(log_alerts=False, webhook_urls=[url], timeout_seconds=2), max_attempts=5)
    with caplog.at_level(logging.DEBUG):
        for delivery in store.due_deliveries(now=1e12):
            outbox._deliver([delivery])
    assert receiver.authorization == [None]  # the old row's delivery arrived
    assert outbox.sent == 1 and outbox.failed == 1 and outbox.retried == 0  # no retries for what cannot work
    assert (
        f"giving up on 1 alert transition(s) to {removed} after the receiver refused it" in caplog.text
        and "not among the configured" in caplog.text
    )
    assert TOKEN not in caplog.text
    assert store.due_deliveries(now=1e12) == []
