"""fleetwatchctl against a collector that wants an API token and serves HTTPS: flags, variables, clear errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.ctl.main import main
from tests.selfsigned import ServerCert, make_server_cert

READ_TOKEN = "ctl-read-SENTINEL-51e7"
ADMIN_TOKEN = "ctl-admin-SENTINEL-0a9b"


@dataclass(frozen=True)
class Running:
    url: str
    token_file: Path
    wrong_token_file: Path


class CollectorThread:
    """A CollectorApp on its own event loop in a thread, since fleetwatchctl's main() blocks."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="collector", daemon=True)
        self.app: CollectorApp | None = None

    async def _start(self) -> CollectorApp:
        app = CollectorApp(self.config)
        await app.start()
        return app

    def __enter__(self) -> CollectorApp:
        self.thread.start()
        self.app = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self.app

    def __exit__(self, *exc: object) -> None:
        if self.app is not None:
            asyncio.run_coroutine_threadsafe(self.app.stop(grace_seconds=0.2), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def _config(directory: Path, cert: ServerCert | None) -> CollectorConfig:
    tls = (
        {
            "tls_cert_file": str(cert.cert_file),
            "tls_key_file": str(cert.key_file),
            "tls_client_ca_file": str(cert.ca_file),
        }
        if cert is not None
        else {}
    )
    return CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=f"sqlite:///{directory / 'c.db'}",
        log_alerts=False,
        api_read_token=READ_TOKEN,
        api_admin_token=ADMIN_TOKEN,
        **tls,
    )


def _token_files(directory: Path) -> tuple[Path, Path]:
    good, wrong = directory / "token", directory / "wrong-token"
    good.write_text(READ_TOKEN + "\n")
    wrong.write_text("not-the-token\n")
    return good, wrong


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp("plain")
    with CollectorThread(_config(directory, None)) as app:
        yield Running(f"http://127.0.0.1:{app.http_port}", *_token_files(directory))


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory, server_cert: ServerCert) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp("https")
    with CollectorThread(_config(directory, server_cert)) as app:
        yield Running(f"https://127.0.0.1:{app.http_port}", *_token_files(directory))


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The parser reads these variables for its defaults; a developer's own must not leak into a test.
    for name in ("FLEETWATCH_TOKEN_FILE", "FLEETWATCH_CA_FILE", "FLEETWATCH_COLLECTOR_URL"):
        monkeypatch.delenv(name, raising=False)


def test_status_with_token_file(plain: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--collector", plain.url, "--token-file", str(plain.token_file), "status"]) == 0
    assert "no nodes have reported yet" in capsys.readouterr().out


def test_status_with_the_token_file_variable(
    plain: Running, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEETWATCH_TOKEN_FILE", str(plain.token_file))
    monkeypatch.setenv("FLEETWATCH_COLLECTOR_URL", plain.url)
    assert main(["status", "--json"]) == 0
    assert '"nodes": []' in capsys.readouterr().out


def test_alerts_with_token_file(plain: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--collector", plain.url, "--token-file", str(plain.token_file), "alerts", "--status", "all"]) == 0
    assert "no alerts" in capsys.readouterr().out


def test_status_without_a_token_says_which_flag_gives_one(plain: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--collector", plain.url, "status"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 401: the collector needs an API token: --token-file FILE (or FLEETWATCH_TOKEN_FILE)" in err


def test_a_wrong_token_is_refused_without_being_shown(plain: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--collector", plain.url, "--token-file", str(plain.wrong_token_file), "status"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 403: the collector refused the API token" in err and "check --token-file" in err
    assert "not-the-token" not in err and READ_TOKEN not in err


@pytest.mark.parametrize(("content", "message"), [(None, "cannot read --token-file"), ("\n", "is empty")])
def test_an_unusable_token_file_is_named(
    plain: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    assert main(["--collector", plain.url, "--token-file", str(path), "status"]) == 1
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_https_with_ca_file(https: Running, server_cert: ServerCert, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--collector", https.url, "--token-file", str(https.token_file), "--ca-file", str(server_cert.ca_file)]
    assert main([*argv, "status"]) == 0
    assert "no nodes have reported yet" in capsys.readouterr().out


def test_https_with_the_ca_file_variable(
    https: Running, server_cert: ServerCert, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEETWATCH_CA_FILE", str(server_cert.ca_file))
    monkeypatch.setenv("FLEETWATCH_TOKEN_FILE", str(https.token_file))
    assert main(["--collector", https.url, "status"]) == 0
    assert "no nodes have reported yet" in capsys.readouterr().out


def test_https_without_the_ca_says_to_pass_it(https: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--collector", https.url, "--token-file", str(https.token_file), "status"]) == 1
    err = capsys.readouterr().err
    assert f"cannot verify the collector's certificate at {https.url}" in err
    assert "--ca-file FILE (or FLEETWATCH_CA_FILE)" in err


def test_https_with_the_wrong_ca_says_to_pass_it(
    https: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_server_cert(tmp_path)  # a CA of its own: not the one that signed the collector's
    argv = ["--collector", https.url, "--token-file", str(https.token_file), "--ca-file", str(other.ca_file)]
    assert main([*argv, "status"]) == 1
    assert "cannot verify the collector's certificate" in capsys.readouterr().err


def test_a_ca_file_that_is_not_a_certificate_is_named(
    https: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not PEM\n")
    assert main(["--collector", https.url, "--ca-file", str(garbage), "status"]) == 1
    assert f"cannot load --ca-file {garbage}" in capsys.readouterr().err


def test_plain_http_to_an_https_collector_suggests_https(https: Running, capsys: pytest.CaptureFixture[str]) -> None:
    plain_url = https.url.replace("https://", "http://")
    assert main(["--collector", plain_url, "--token-file", str(https.token_file), "status"]) == 1
    assert "if it serves HTTPS, use an https:// --collector URL" in capsys.readouterr().err


def test_https_to_a_plain_collector_asks_whether_it_serves_https(
    plain: Running, server_cert: ServerCert, capsys: pytest.CaptureFixture[str]
) -> None:
    tls_url = plain.url.replace("http://", "https://")
    assert main(["--collector", tls_url, "--ca-file", str(server_cert.ca_file), "status"]) == 1
    err = capsys.readouterr().err
    assert f"TLS with the collector at {tls_url} failed" in err and "does it serve HTTPS?" in err
