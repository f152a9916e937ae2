"""The collector's HTTP side behind tokens and TLS: who gets 401, 403 or an answer, and HTTPS with a test CA."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.httpauth import Access, add_route, token_middleware
from fleetwatch.configfile import ConfigError, describe, load_config
from fleetwatch.https import server_ssl_context
from tests.selfsigned import ServerCert, make_server_cert

READ_TOKEN = "read-SENTINEL-4b1d"
ADMIN_TOKEN = "admin-SENTINEL-c0de"

Reply = tuple[int, dict[str, str], bytes]


def _get(url: str, headers: dict[str, str], context: ssl.SSLContext | None) -> Reply:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Client:
    def __init__(self, base_url: str, context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url
        self.context = context

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        # From a worker thread: the collector answers on this test's event loop.
        return await asyncio.to_thread(_get, self.base_url + path, headers or {}, self.context)


def config_for(tmp_path: Path, **settings: Any) -> CollectorConfig:
    return CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        log_alerts=False,
        detect_interval_seconds=0.2,
        **settings,
    )


@asynccontextmanager
async def running(config: CollectorConfig) -> AsyncIterator[CollectorApp]:
    collector = CollectorApp(config)
    await collector.start()
    try:
        yield collector
    finally:
        await collector.stop(grace_seconds=0.2)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    async with running(config_for(tmp_path, api_read_token=READ_TOKEN, api_admin_token=ADMIN_TOKEN)) as app:
        yield Client(f"http://127.0.0.1:{app.http_port}")


async def test_api_without_a_token_is_401_with_a_bearer_challenge(client: Client) -> None:
    status, headers, body = await client.get("/api/v1/status")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="fleetwatch"'
    assert headers["Content-Type"] == "application/json"
    assert "Authorization: Bearer" in json.loads(body)["error"]


@pytest.mark.parametrize(
    "headers",
    [bearer("not-the-token"), bearer(READ_TOKEN + "x"), bearer(READ_TOKEN[:-1])],
    ids=["other", "longer", "shorter"],
)
async def test_api_with_a_wrong_token_is_403_and_never_echoes_a_token(client: Client, headers: dict) -> None:
    status, _, body = await client.get("/api/v1/status", headers)
    assert status == 403
    assert READ_TOKEN not in body.decode() and ADMIN_TOKEN not in body.decode()


@pytest.mark.parametrize("headers", [{"Authorization": f"Basic {READ_TOKEN}"}, {"Authorization": "Bearer "}])
async def test_other_schemes_and_empty_bearers_count_as_no_token(client: Client, headers: dict) -> None:
    status, _, _ = await client.get("/api/v1/status", headers)
    assert status == 401


@pytest.mark.parametrize("token", [READ_TOKEN, ADMIN_TOKEN])
@pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/alerts?status=all"])
async def test_read_and_admin_tokens_read_the_api(client: Client, token: str, path: str) -> None:
    status, _, _ = await client.get(path, bearer(token))
    assert status == 200


async def test_the_scheme_is_case_insensitive(client: Client) -> None:
    status, _, _ = await client.get("/api/v1/status", {"Authorization": f"bearer {READ_TOKEN}"})
    assert status == 200


async def test_unknown_paths_need_the_token_before_they_are_404(client: Client) -> None:
    # Without the token a caller does not even learn which paths exist.
    assert (await client.get("/api/v2/status"))[0] == 401
    assert (await client.get("/api/v2/status", bearer(READ_TOKEN)))[0] == 404


# /readyz answers 503 while the collector is not ready: either way, not a refusal.
ANSWERED = (200, 503)


async def test_metrics_and_health_checks_stay_open_by_default(client: Client) -> None:
    assert (await client.get("/healthz"))[0] == 200
    assert (await client.get("/readyz"))[0] in ANSWERED
    assert (await client.get("/metrics"))[0] == 200


async def test_metrics_and_health_checks_behind_the_read_token_when_asked(tmp_path: Path) -> None:
    config = config_for(tmp_path, api_read_token=READ_TOKEN, health_require_token=True, metrics_require_token=True)
    async with running(config) as app:
        client = Client(f"http://127.0.0.1:{app.http_port}")
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path))[0] == 401
            assert (await client.get(path, bearer("wrong")))[0] == 403
            assert (await client.get(path, bearer(READ_TOKEN)))[0] in ANSWERED


async def test_each_setting_closes_only_its_own_routes(tmp_path: Path) -> None:
    config = config_for(tmp_path, api_read_token=READ_TOKEN, metrics_require_token=True)
    async with running(config) as app:
        client = Client(f"http://127.0.0.1:{app.http_port}")
        assert (await client.get("/metrics"))[0] == 401
        assert (await client.get("/healthz"))[0] == 200


async def test_without_tokens_everything_stays_open(tmp_path: Path) -> None:
    async with running(config_for(tmp_path)) as app:
        client = Client(f"http://127.0.0.1:{app.http_port}")
        assert (await client.get("/api/v1/status"))[0] == 200
        # A token sent to a collector that wants none is ignored, not refused.
        assert (await client.get("/api/v1/status", bearer("anything")))[0] == 200


async def test_only_an_admin_token_leaves_reads_open(tmp_path: Path) -> None:
    async with running(config_for(tmp_path, api_admin_token=ADMIN_TOKEN)) as app:
        client = Client(f"http://127.0.0.1:{app.http_port}")
        assert (await client.get("/api/v1/status"))[0] == 200


async def test_start_logs_whether_tokens_are_on_but_never_the_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(config_for(tmp_path, api_read_token=READ_TOKEN, api_admin_token=ADMIN_TOKEN)):
        pass
    assert "read token on, admin token on" in caplog.text
    assert READ_TOKEN not in caplog.text and ADMIN_TOKEN not in caplog.text


# ---- the route-based mechanism, on a small app of its own (the collector has no admin route yet) ----


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@asynccontextmanager
async def tiny_app(read_token: str, admin_token: str) -> AsyncIterator[TestClient]:
    app = web.Application(middlewares=[token_middleware(read_token, admin_token)])
    add_route(app, "GET", "/open", _ok, Access.OPEN)
    add_route(app, "GET", "/read", _ok, Access.READ)
    add_route(app, "POST", "/admin", _ok, Access.ADMIN)
    app.router.add_get("/undeclared", _ok)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def _status(client: TestClient, method: str, path: str, token: str | None = None) -> int:
    headers = bearer(token) if token is not None else {}
    async with client.request(method, path, headers=headers) as response:
        return response.status


async def test_admin_routes_take_only_the_admin_token() -> None:
    async with tiny_app(READ_TOKEN, ADMIN_TOKEN) as client:
        assert await _status(client, "POST", "/admin") == 401
        assert await _status(client, "POST", "/admin", READ_TOKEN) == 403
        assert await _status(client, "POST", "/admin", ADMIN_TOKEN) == 200
        assert await _status(client, "GET", "/read", ADMIN_TOKEN) == 200
        assert await _status(client, "GET", "/open") == 200
        # HEAD goes with its GET route.
        assert await _status(client, "HEAD", "/read") == 401
        assert await _status(client, "HEAD", "/open") == 200


async def test_a_route_registered_without_an_access_level_needs_the_read_token() -> None:
    async with tiny_app(READ_TOKEN, ADMIN_TOKEN) as client:
        assert await _status(client, "GET", "/undeclared") == 401
        assert await _status(client, "GET", "/undeclared", READ_TOKEN) == 200
        # A method the route does not have is checked (as READ) before it is a 405.
        assert await _status(client, "POST", "/read") == 401
        assert await _status(client, "POST", "/read", READ_TOKEN) == 405


async def test_with_a_read_token_and_no_admin_token_admin_routes_are_refused_to_everyone() -> None:
    async with tiny_app(READ_TOKEN, "") as client:
        assert await _status(client, "POST", "/admin") == 403
        assert await _status(client, "POST", "/admin", READ_TOKEN) == 403
        assert await _status(client, "GET", "/read", READ_TOKEN) == 200


async def test_with_no_token_at_all_admin_routes_are_open_as_before() -> None:
    async with tiny_app("", "") as client:
        assert await _status(client, "POST", "/admin") == 200


# ---- configuration ----------------------------------------------------------------------------


def test_tokens_come_from_their_files_and_are_never_described(tmp_path: Path) -> None:
    (tmp_path / "read").write_text(READ_TOKEN + "\n")
    (tmp_path / "admin").write_text(ADMIN_TOKEN)
    env = {
        "FLEETWATCH_API_READ_TOKEN_FILE": str(tmp_path / "read"),
        "FLEETWATCH_API_ADMIN_TOKEN_FILE": str(tmp_path / "admin"),
    }
    config = load_config(CollectorConfig, path=None, env=env)
    assert config.api_read_token.reveal() == READ_TOKEN and config.api_admin_token.reveal() == ADMIN_TOKEN
    shown = str(describe(config))
    assert READ_TOKEN not in shown and ADMIN_TOKEN not in shown


def test_an_empty_token_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "read").write_text("\n")
    with pytest.raises(ConfigError, match=r"api_read_token_file .* is empty"):
        load_config(CollectorConfig, path=None, env={"FLEETWATCH_API_READ_TOKEN_FILE": str(tmp_path / "read")})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FLEETWATCH_API_READ_TOKEN": READ_TOKEN, "FLEETWATCH_API_ADMIN_TOKEN": READ_TOKEN},
            "api_read_token and api_admin_token are the same token",
        ),
        ({"FLEETWATCH_METRICS_REQUIRE_TOKEN": "true"}, "metrics_require_token: needs api_read_token"),
        (
            {"FLEETWATCH_HEALTH_REQUIRE_TOKEN": "true", "FLEETWATCH_API_ADMIN_TOKEN": ADMIN_TOKEN},
            "health_require_token: needs api_read_token",
        ),
    ],
)
def test_settings_that_only_make_sense_together(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config(CollectorConfig, path=None, env=env)
    assert READ_TOKEN not in str(error.value)


# ---- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("tls"))


def _verifying(ca_file: Path | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def tls_settings(cert: ServerCert) -> dict[str, str]:
    # The client CA is the gRPC side's (agents' certificates); HTTP asks for no client certificate.
    return {
        "tls_cert_file": str(cert.cert_file),
        "tls_key_file": str(cert.key_file),
        "tls_client_ca_file": str(cert.ca_file),
    }


async def test_https_with_the_ca_works_and_plain_http_does_not(tmp_path: Path, server_cert: ServerCert) -> None:
    async with running(config_for(tmp_path, api_read_token=READ_TOKEN, **tls_settings(server_cert))) as app:
        https = Client(f"https://127.0.0.1:{app.http_port}", _verifying(server_cert.ca_file))
        status, _, body = await https.get("/api/v1/status", bearer(READ_TOKEN))
        assert status == 200 and json.loads(body)["nodes"] == []
        assert (await https.get("/api/v1/status"))[0] == 401
        assert (await https.get("/healthz"))[0] == 200

        plain = Client(f"http://127.0.0.1:{app.http_port}")
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
            await plain.get("/healthz")

        # The system's CAs do not know the test CA: the certificate is refused, not the token.
        unverified = Client(f"https://127.0.0.1:{app.http_port}", _verifying(None))
        with pytest.raises(urllib.error.URLError) as error:
            await unverified.get("/healthz")
        assert isinstance(error.value.reason, ssl.SSLCertVerificationError)


def test_no_certificate_means_plain_http() -> None:
    assert server_ssl_context("", "", cert_key="tls_cert_file", key_key="tls_key_file") is None


def test_an_unloadable_certificate_is_named(tmp_path: Path, server_cert: ServerCert) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not PEM")
    with pytest.raises(OSError, match=f"cannot load tls_cert_file {garbage} and tls_key_file"):
        server_ssl_context(str(garbage), str(server_cert.key_file), cert_key="tls_cert_file", key_key="tls_key_file")
