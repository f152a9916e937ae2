"""Who may call which route of the collector's HTTP side (bearer tokens, declared per route) and its TLS context."""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from collections.abc import Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_urldispatcher import AbstractRoute

REALM = "fleetwatch"


class Access(enum.Enum):
    """What a caller must present for a route."""

    OPEN = "open"  # nothing: health checks and scrapes unless configured otherwise
    READ = "read"  # the read token or the admin token, when a read token is configured
    ADMIN = "admin"  # the admin token: routes that change state


# Every route's declared access; a route missing here (unknown paths, 405s, one registered with
# plain router.add_get) is READ, so that forgetting to declare a route never opens it.
ROUTE_ACCESS = web.AppKey("route_access", dict[AbstractRoute, Access])
UNDECLARED_ACCESS = Access.READ


def add_route(app: web.Application, method: str, path: str, handler: Handler, access: Access) -> None:
    """Registers `handler` for `method` on `path` with its access level; GET also answers HEAD, as add_get does."""
    resource = app.router.add_resource(path)
    methods = [hdrs.METH_GET, hdrs.METH_HEAD] if method == hdrs.METH_GET else [method]
    declared = app.setdefault(ROUTE_ACCESS, {})
    for m in methods:
        declared[resource.add_route(m, handler)] = access


def _digest(token: str) -> bytes:
    # Compared as SHA-256 digests: equal lengths, so compare_digest's time says nothing about the token's length.
    return hashlib.sha256(token.encode()).digest()


def _json(payload: dict[str, str], status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(payload).encode(), status=status, content_type="application/json", headers=headers
    )


def _bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None when there is none."""
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _matches(presented: str, accepted: Iterable[bytes]) -> bool:
    digest = _digest(presented)
    # Every accepted token is compared, so the time taken does not tell which one came close.
    results = [hmac.compare_digest(digest, expected) for expected in accepted]
    return any(results)


def token_middleware(read_token: str, admin_token: str) -> Middleware:
    """Checks each request against its route's declared Access; empty tokens turn their check off.

    READ routes accept the read or the admin token and are open while no read token is set. ADMIN
    routes accept only the admin token; with no admin token but a read token they are refused to
    everyone (a collector that guards its reads must not leave its writes open), and with neither
    token set everything is open, as before tokens existed. No token is ever put in a response or a log.
    """
    read_accepts = [_digest(t) for t in (read_token, admin_token) if t]
    admin_accepts = [_digest(admin_token)] if admin_token else []
    any_token = bool(read_token or admin_token)
    challenge: dict[str, str] = {hdrs.WWW_AUTHENTICATE: f'Bearer realm="{REALM}"'}

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        access = request.app.get(ROUTE_ACCESS, {}).get(request.match_info.route, UNDECLARED_ACCESS)
        if access is Access.OPEN or not any_token or (access is Access.READ and not read_token):
            return await handler(request)
        accepted = read_accepts if access is Access.READ else admin_accepts
        if not accepted:
            return _json(
                {
                    "error": f"{request.method} {request.path} changes state and needs api_admin_token, "
                    "which this collector has not set"
                },
                403,
            )
        presented = _bearer(request)
        if presented is None:
            return _json(
                {"error": f"{request.path} needs an API token: send Authorization: Bearer <token>"}, 401, challenge
            )
        if not _matches(presented, accepted):
            needed = "the read or the admin token" if access is Access.READ else "the admin token"
            return _json(
                {"error": f"the API token is not valid for {request.method} {request.path}; it needs {needed}"}, 403
            )
        return await handler(request)

    return check_token
