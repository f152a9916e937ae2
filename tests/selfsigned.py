"""A throwaway CA and a server certificate for 127.0.0.1, for the HTTPS tests, from fleetwatch.certs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleetwatch.certs import init_ca, issue_into


@dataclass(frozen=True)
class ServerCert:
    ca_file: Path  # what clients verify against
    cert_file: Path
    key_file: Path


def make_server_cert(directory: Path) -> ServerCert:
    """A CA (so that clients verify a chain, not a pinned leaf) and a leaf for 127.0.0.1 and localhost."""
    ca_file, _ = init_ca(directory)
    cert_file, key_file = issue_into(directory, "localhost", server=True, sans=["127.0.0.1"])
    return ServerCert(ca_file, cert_file, key_file)
