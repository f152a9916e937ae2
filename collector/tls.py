"""The collector's transport security: mTLS credentials for gRPC, no plaintext off loopback, and who a stream is."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from fleetwatch.addresses import is_loopback, parse_host_port
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.configfile import ConfigError

log = logging.getLogger(__name__)

# A certificate this close to its end gets a warning at every start, early enough to renew it.
EXPIRY_WARNING_DAYS = 30
TLS_KEYS = "tls_cert_file, tls_key_file and tls_client_ca_file"


@dataclass(frozen=True)
class ServerTls:
    """The PEM files of the collector's mTLS, read and checked at start."""

    cert_chain_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes

    def credentials(self) -> grpc.ServerCredentials:
        # require_client_auth: a client without a certificate from the CA fails the handshake,
        # before any RPC; which node a certificate may speak for is TelemetryService's check.
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_chain_pem)], root_certificates=self.client_ca_pem, require_client_auth=True
        )


@dataclass(frozen=True)
class PeerIdentity:
    """The names an agent's client certificate holds: its DNS SANs, or its CN when it has none."""

    names: tuple[str, ...]

    def allows(self, node: str) -> bool:
        return node in self.names

    def __str__(self) -> str:
        return ", ".join(repr(n) for n in self.names) if self.names else "no name"


def _read(key: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ConfigError(f"{key}: {path} is empty")
    return data


def _check_pem(cert_chain_pem: bytes, key_pem: bytes, client_ca_pem: bytes, config: CollectorConfig) -> None:
    """Parse the three files, so that a wrong file is named now and not as a failed handshake later."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def certificates(key: str, path: str, pem: bytes) -> list[x509.Certificate]:
        try:
            found = x509.load_pem_x509_certificates(pem)
        except ValueError:
            found = []
        if not found:
            raise ConfigError(f"{key}: {path} holds no PEM certificate")
        return found

    chain = certificates("tls_cert_file", config.tls_cert_file, cert_chain_pem)
    certificates("tls_client_ca_file", config.tls_client_ca_file, client_ca_pem)
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: the key is encrypted; the daemon has nobody to ask for the passphrase.
        raise ConfigError(
            f"tls_key_file: {config.tls_key_file} is not an unencrypted PEM private key ({exc})"
        ) from None
    if private_key.public_key() != chain[0].public_key():
        raise ConfigError(
            f"tls_key_file: {config.tls_key_file} is not the key of the certificate in "
            f"tls_cert_file ({config.tls_cert_file})"
        )
    not_after = chain[0].not_valid_after_utc
    left = not_after - datetime.datetime.now(datetime.UTC)
    if left <= datetime.timedelta(0):
        log.warning("tls_cert_file %s expired at %s: agents will refuse it", config.tls_cert_file, not_after)
    elif left <= datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        log.warning("tls_cert_file %s expires at %s: issue a new one", config.tls_cert_file, not_after)


def load_server_tls(config: CollectorConfig) -> ServerTls | None:
    """The collector's mTLS files, or None when TLS is off; ConfigError names the key that is wrong."""
    keys = {k: getattr(config, k) for k in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")}
    if not any(keys.values()):
        return None
    missing = [k for k, v in keys.items() if not v]
    if missing:
        given = ", ".join(k for k, v in keys.items() if v)
        raise ConfigError(
            f"{', '.join(missing)}: must be set with {given}: mTLS needs the collector's certificate, its key, "
            "and the CA that issued the agents' certificates (fleetwatchctl certs)"
        )
    tls = ServerTls(
        _read("tls_cert_file", config.tls_cert_file),
        _read("tls_key_file", config.tls_key_file),
        _read("tls_client_ca_file", config.tls_client_ca_file),
    )
    _check_pem(tls.cert_chain_pem, tls.key_pem, tls.client_ca_pem, config)
    return tls


def check_listen_security(config: CollectorConfig, *, tls: bool) -> list[str]:
    """Refuse plaintext off loopback unless `insecure`; returns the warnings to log when it is allowed.

    Without TLS anyone who reaches the gRPC port can send a Hello for any node (and so resolve its
    alerts), and the HTTP API answers in the clear; on loopback only local processes can.
    """
    if tls:
        return []
    exposed = []
    for key in ("grpc_listen", "http_listen"):
        address = getattr(config, key)
        host, _ = parse_host_port(address)
        if not is_loopback(host):
            exposed.append(f"{key} {address}")
    if not exposed:
        return []
    if not config.insecure:
        raise ConfigError(
            f"{' and '.join(exposed)}: not a loopback address and TLS is off; set {TLS_KEYS} "
            "(fleetwatchctl certs init/issue), listen on 127.0.0.1, or set insecure = true to accept "
            "plaintext from anyone who can reach the port"
        )
    return [
        f"insecure = true: {' and '.join(exposed)} without TLS; anyone who reaches the gRPC port can send "
        f"data as any node (set {TLS_KEYS} for mTLS)"
    ]


def _strings(values: Sequence[bytes | str]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def identity_from_auth_context(auth: Mapping[str, Sequence[bytes | str]]) -> PeerIdentity | None:
    """The peer's names from a gRPC auth context; None when the transport is not TLS with a client certificate.

    gRPC puts the certificate's DNS SANs under `peer_dns` (its `x509_subject_alternative_name`
    mixes in IP, URI and email SANs); the CN counts only when there are no DNS SANs, as in
    RFC 6125 host name checks.
    """
    if b"ssl" not in auth.get("transport_security_type", []) or not auth.get("x509_pem_cert"):
        return None
    names = _strings(auth.get("peer_dns", [])) or _strings(auth.get("x509_common_name", []))
    return PeerIdentity(tuple(names))


def peer_identity(context: grpc.aio.ServicerContext) -> PeerIdentity | None:
    """Who the client certificate of this call's connection names (see identity_from_auth_context)."""
    return identity_from_auth_context(context.auth_context())
