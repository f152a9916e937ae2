"""The TLS context of an HTTPS server from PEM files: the collector's API and the agent's /metrics."""

from __future__ import annotations

import ssl


def server_ssl_context(cert_file: str, key_file: str, *, cert_key: str, key_key: str) -> ssl.SSLContext | None:
    """The context for `cert_file` and `key_file`, None without a certificate (plain HTTP).

    No client certificate is asked for: HTTP callers prove who they are with tokens or basic auth.
    `cert_key` and `key_key` are the settings the files came from, named in the OSError.
    """
    if not cert_file:
        return None
    # Purpose.CLIENT_AUTH is the server side's defaults: TLS 1.2 at least, the stdlib's cipher choice.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except OSError as exc:  # ssl.SSLError included
        raise OSError(f"cannot load {cert_key} {cert_file} and {key_key} {key_file}: {exc}") from None
    return context
