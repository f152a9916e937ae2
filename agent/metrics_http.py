"""The HTTP server under the agent's /metrics: threaded wsgiref, optional TLS, optional HTTP basic auth.

prometheus_client's start_http_server takes a certificate but has no basic auth, and it wraps the
listening socket, so each TLS handshake runs in its one accepting thread, where a client that
never finishes one stops every other scrape. This server runs prometheus_client's WSGI app (its
content negotiation and gzip) the same way, with the handshake in the connection's own thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import socket
import ssl
import sys
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

# A scraper that stalls, or a scanner that connects and says nothing, frees its thread after this.
CONNECTION_TIMEOUT_SECONDS = 30.0
BASIC_REALM = "fleetwatch agent"


def _digest(data: bytes) -> bytes:
    # Compared as SHA-256 digests: equal lengths, so compare_digest's time says nothing about the password's length.
    return hashlib.sha256(data).digest()


def _basic_credentials(header: str) -> bytes | None:
    """The decoded `user:password` of an `Authorization: Basic ...` header, None when there is none."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def basic_auth(app: WSGIApplication, user: str, password: str) -> WSGIApplication:
    """`app` behind HTTP basic auth: 401 with a challenge unless the request carries user and password."""
    # RFC 7617: credentials are user ":" password, UTF-8 when the challenge says charset="UTF-8".
    expected = _digest(f"{user}:{password}".encode())
    challenge = ("WWW-Authenticate", f'Basic realm="{BASIC_REALM}", charset="UTF-8"')

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        presented = _basic_credentials(environ.get("HTTP_AUTHORIZATION", ""))
        if presented is not None and hmac.compare_digest(_digest(presented), expected):
            return app(environ, start_response)
        # Missing and wrong credentials alike are 401: basic auth has no "known but not allowed".
        start_response("401 Unauthorized", [challenge, ("Content-Type", "text/plain; charset=utf-8")])
        return [b"401 Unauthorized: /metrics needs HTTP basic auth (metrics_basic_auth_user)\n"]

    return guarded


def listen_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family and address to bind for `host` (a name, an IPv4 or an IPv6 literal)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, str(sockaddr[0])


class _QuietHandler(WSGIRequestHandler):
    # StreamRequestHandler.setup() puts it on the connection.
    timeout = CONNECTION_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape: the journal would fill with them."""


class ThreadingWsgiServer(ThreadingMixIn, WSGIServer):
    """One thread per connection; with an SSL context, TLS is negotiated in that thread."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.address_family = family  # read by TCPServer.__init__ when it makes the socket
        self.ssl_context = ssl_context
        super().__init__(address, _QuietHandler)

    def get_request(self) -> tuple[Any, Any]:
        connection, address = super().get_request()
        if self.ssl_context is not None:
            connection = self.ssl_context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(CONNECTION_TIMEOUT_SECONDS)
            request.do_handshake()
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            # A failed handshake (a plain-HTTP scraper, a scanner), a timeout, a peer that hung up.
            log.debug("/metrics connection from %s: %s", client_address[0], exc)
        else:
            log.exception("/metrics request from %s failed", client_address[0])


def serve(
    app: WSGIApplication, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> tuple[ThreadingWsgiServer, threading.Thread]:
    """Binds host:port and serves `app` from a daemon thread; OSError when the address cannot be used."""
    family, address = listen_family(host, port)
    server = ThreadingWsgiServer((address, port), family, ssl_context)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
