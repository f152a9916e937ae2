"""The fleet page at / and the files it loads under /static/ (its script, styles and vendored uPlot).

Both are Access.OPEN: they are the same for every caller and hold no fleet data. The page's script
reads the fleet from the API (/api/v1/status, /alerts, /series, /jobs) like any other client, so
a collector with api_read_token keeps its data behind the token: the script sends it as
`Authorization: Bearer`, taken from the page address's fragment (`/#token=...`: a fragment never
reaches the server or its logs, and the script removes it from the address bar once read) and
kept in the browser's localStorage; a 401 or 403 makes the page ask for it.

The files come from package data (collector/static), read once into memory: only the files found
there, by their exact relative path, are served, so no request path can reach anything else.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING

from aiohttp import hdrs, web

from fleetwatch.collector.httpauth import Access, add_route

if TYPE_CHECKING:
    from fleetwatch.collector.app import CollectorApp

STATIC_PACKAGE = "fleetwatch.collector"
STATIC_FOLDER = "static"
INDEX = "index.html"
# What is served, by suffix (or whole name): anything else in the folder (a script, a dotfile) is not.
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".md": "text/markdown",
    "LICENSE": "text/plain",
}
# Scripts and styles only from this collector, API calls only to it, no framing: the page runs
# nothing inline and nothing from elsewhere (uPlot sets element styles through the DOM, which
# style-src does not restrict).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load (a cheap 304 by ETag), so an upgraded collector's page is never stale.
    hdrs.CACHE_CONTROL: "no-cache",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def content_type(name: str) -> str | None:
    """The Content-Type a file named `name` is served with, None when it is not served."""
    if name in CONTENT_TYPES:
        return CONTENT_TYPES[name]
    suffix = name[name.rfind(".") :] if "." in name else ""
    return CONTENT_TYPES.get(suffix) if suffix and not name.startswith(".") else None


@functools.cache
def static_files() -> Mapping[str, StaticFile]:
    """Every servable file of the static folder by its path relative to it ("vendor/uplot/LICENSE")."""
    files: dict[str, StaticFile] = {}

    def walk(folder: Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
                continue
            kind = content_type(entry.name)
            if kind is not None and entry.is_file():
                body = entry.read_bytes()
                files[prefix + entry.name] = StaticFile(body, kind, f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    walk(importlib.resources.files(STATIC_PACKAGE) / STATIC_FOLDER, "")
    return files


def _respond(request: web.Request, file: StaticFile, extra: Mapping[str, str] | None = None) -> web.StreamResponse:
    headers = {**COMMON_HEADERS, hdrs.ETAG: file.etag, **(extra or {})}
    if file.etag in (tag.strip() for tag in request.headers.get(hdrs.IF_NONE_MATCH, "").split(",")):
        return web.Response(status=304, headers=headers)
    text = file.content_type.startswith("text/") or file.content_type.endswith("+xml")
    response = web.Response(
        body=file.body, content_type=file.content_type, charset="utf-8" if text else None, headers=headers
    )
    if text and len(file.body) > 1024:
        response.enable_compression()  # uPlot is 145 kB as text, about 40 gzipped
    return response


async def index(request: web.Request) -> web.StreamResponse:
    """GET /: the fleet page."""
    return _respond(request, static_files()[INDEX], {"Content-Security-Policy": CONTENT_SECURITY_POLICY})


async def static(request: web.Request) -> web.StreamResponse:
    """GET /static/<path>: one of the page's files; any other path is a 404."""
    file = static_files().get(request.match_info["path"])
    if file is None:
        raise web.HTTPNotFound()
    return _respond(request, file)


def add_page_routes(web_app: web.Application, app: CollectorApp) -> None:
    """The page's routes on the collector's HTTP side (`app` for symmetry with the API; the page needs none of it)."""
    del app
    add_route(web_app, "GET", "/", index, Access.OPEN)
    add_route(web_app, "GET", "/static/{path:.+}", static, Access.OPEN)
