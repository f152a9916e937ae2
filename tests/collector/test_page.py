"""The fleet page's routes: / and /static/ (content types, caching, no way out of the folder, open
behind tokens while the API is not), the vendored uPlot as pinned, and the page's field names.

The page in a browser: tests/e2e/test_fleet_page.py.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.client
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig, DatabaseUrl
from fleetwatch.collector.page import CONTENT_TYPES, content_type, static_files
from fleetwatch.collector.storage.blocks import FIELD_NUMBERS

STATIC = Path(__file__).resolve().parents[2] / "collector" / "static"
VENDOR = STATIC / "vendor" / "uplot"
READ_TOKEN = "read-SENTINEL-page"

Reply = tuple[int, dict[str, str], bytes]


def _get(port: int, path: str, headers: dict[str, str]) -> Reply:
    # http.client sends the path exactly as written ("..", "%2e" and all), unlike urllib.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        # From a worker thread: the collector answers on this test's event loop.
        return await asyncio.to_thread(_get, self.port, path, headers or {})


def _config(tmp_path: Path, **settings: Any) -> CollectorConfig:
    return CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=DatabaseUrl(f"sqlite:///{tmp_path / 'c.db'}"),
        log_alerts=False,
        detect_interval_seconds=0.2,
        **settings,
    )


async def _client(config: CollectorConfig) -> AsyncIterator[Client]:
    collector = CollectorApp(config)
    await collector.start()
    try:
        yield Client(collector.http_port)
    finally:
        await collector.stop(grace_seconds=0.2)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    async for c in _client(_config(tmp_path)):
        yield c


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Client]:
    async for c in _client(_config(tmp_path, api_read_token=READ_TOKEN)):
        yield c


async def test_the_page_is_html_that_runs_only_its_own_scripts(client: Client) -> None:
    status, headers, body = await client.get("/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    page = body.decode()
    assert page.startswith("<!doctype html>") and 'id="grid"' in page
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    # No inline script or handler, which the policy would block anyway; no CDN.
    assert not re.search(r"<script(?![^>]*\bsrc=)", page)
    assert not re.search(r"\son[a-z]+=", page)
    assert "http://" not in page and "https://" not in page


async def test_everything_the_page_loads_is_served_with_its_type(client: Client) -> None:
    _, _, body = await client.get("/")
    wanted = re.findall(r'(?:href|src)="([^"]+)"', body.decode())
    _, _, script = await client.get("/static/fleet.js")
    # fleet.js imports uPlot relative to itself.
    wanted += ["static/" + path.removeprefix("./") for path in re.findall(r'from "(\./[^"]+)"', script.decode())]
    assert "static/vendor/uplot/uPlot.esm.js" in wanted and "static/fleet.css" in wanted
    expected = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in wanted:
        status, headers, body = await client.get("/" + path)
        assert status == 200, path
        assert headers["content-type"] == f"{expected[Path(path).suffix]}; charset=utf-8", path
        assert body, path


async def test_licence_and_provenance_are_served_as_text(client: Client) -> None:
    status, headers, body = await client.get("/static/vendor/uplot/LICENSE")
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8"
    assert b"MIT License" in body
    status, headers, _ = await client.get("/static/vendor/uplot/VENDORED.md")
    assert status == 200 and headers["content-type"].startswith("text/markdown")


@pytest.mark.parametrize(
    "path",
    [
        "/static/../page.py",
        "/static/%2e%2e/page.py",
        "/static/..%2fpage.py",
        "/static/vendor/uplot/../../../web.py",
        "/static/vendor/uplot/%2e%2e/%2e%2e/%2e%2e/web.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/vendor/uplot/revendor.sh",  # in the folder, but no type it is served as
        "/static/",
        "/static/vendor",
        "/static/nothing.js",
    ],
)
async def test_nothing_outside_the_page_files_is_served(client: Client, path: str) -> None:
    status, headers, body = await client.get(path)
    assert status == 404, (path, body[:200])
    assert headers["content-type"] == "application/json"
    assert b"import" not in body and b"root:" not in body


async def test_an_unchanged_file_is_a_304_and_big_ones_go_gzipped(client: Client) -> None:
    status, headers, _ = await client.get("/static/fleet.css")
    assert status == 200 and headers["cache-control"] == "no-cache"
    status, _, body = await client.get("/static/fleet.css", {"If-None-Match": headers["etag"]})
    assert status == 304 and body == b""
    status, headers, body = await client.get("/static/vendor/uplot/uPlot.esm.js", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == (VENDOR / "uPlot.esm.js").read_bytes()


async def test_the_page_is_open_while_its_data_needs_the_token(guarded: Client) -> None:
    """The page and its files hold no fleet data; its script sends the token to the API."""
    for path in ("/", "/static/fleet.js", "/static/vendor/uplot/uPlot.esm.js"):
        status, _, _ = await guarded.get(path)
        assert status == 200, path
    for path in ("/api/v1/status", "/api/v1/alerts", "/api/v1/series?node=n01"):
        status, _, _ = await guarded.get(path)
        assert status == 401, path
    status, _, body = await guarded.get("/api/v1/status", {"Authorization": f"Bearer {READ_TOKEN}"})
    assert status == 200 and "nodes" in json.loads(body)
    # An unknown /static path is a 404 to everyone: the files' names are public anyway.
    status, _, _ = await guarded.get("/static/nothing.js")
    assert status == 404


def test_the_page_sends_the_token_it_was_given() -> None:
    script = (STATIC / "fleet.js").read_text()
    assert "Authorization = `Bearer ${token}`" in script
    assert 'params.get("token")' in script  # from /#token=...


def test_only_files_of_known_types_are_served() -> None:
    assert content_type("fleet.js") == "text/javascript"
    assert content_type("LICENSE") == "text/plain"
    assert content_type("revendor.sh") is None and content_type(".hidden.js") is None
    assert content_type("Makefile") is None
    served = set(static_files())
    on_disk = {
        str(p.relative_to(STATIC))
        for p in STATIC.rglob("*")
        if p.is_file() and (p.name in CONTENT_TYPES or p.suffix in CONTENT_TYPES)
    }
    assert served == on_disk
    assert {"index.html", "fleet.js", "fleet.css", "vendor/uplot/uPlot.esm.js", "vendor/uplot/LICENSE"} <= served


def test_the_vendored_files_are_the_pinned_release_unmodified() -> None:
    provenance = (VENDOR / "VENDORED.md").read_text()
    digests = dict(re.findall(r"\| `([^`]+)` \| `[^`]+` \| `([0-9a-f]{64})` \|", provenance))
    assert set(digests) == {"uPlot.esm.js", "uPlot.min.css", "LICENSE"}
    for name, digest in digests.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    (version,) = set(re.findall(r"Version \| (\d+\.\d+\.\d+) \(pinned\)", provenance))
    script = (VENDOR / "revendor.sh").read_text()
    assert f"VERSION={version}\n" in script
    (tarball_digest,) = re.findall(r"Tarball sha256 \| `([0-9a-f]{64})`", provenance)
    assert f"TARBALL_SHA256={tarball_digest}\n" in script
    assert f"(v{version})" in (VENDOR / "uPlot.esm.js").read_text()[:400]
    assert "MIT License" in (VENDOR / "LICENSE").read_text()


def test_the_charts_ask_for_fields_the_store_has() -> None:
    script = (STATIC / "fleet.js").read_text()
    fields = re.findall(r'\{ field: "([a-z_]+)"', script)
    assert len(fields) == 5
    assert set(fields) <= set(FIELD_NUMBERS["gpu"])
