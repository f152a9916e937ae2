"""The agent's side of mTLS: its client certificate and the collector's CA as the gRPC channel's credentials."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fleetwatch.addresses import is_loopback, parse_host_port
from fleetwatch.agent.collectors import CollectorTarget
from fleetwatch.agent.config import AgentConfig
from fleetwatch.configfile import ConfigError

TLS_KEYS = ("tls_ca_file", "tls_cert_file", "tls_key_file")


@dataclass(frozen=True)
class ChannelTls:
    """The PEM files of the agent's mTLS, read and checked, and the name to verify the collector by."""

    root_pem: bytes
    cert_chain_pem: bytes
    key_pem: bytes
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_pem, private_key=self.key_pem, certificate_chain=self.cert_chain_pem
        )

    def options(self, target: CollectorTarget | None = None) -> list[tuple[str, Any]]:
        """The name the collector's certificate is checked against, where it is not the dialed host's.

        Only that name changes; the agent still dials the target's address. Dialing an address a
        DNS name resolved to, the certificate must still carry the configured name, not the address.
        """
        name = self.server_name or (target.host if target is not None and target.resolved else "")
        return [("grpc.ssl_target_name_override", name)] if name else []


def _read(key: str, path: str, marker: bytes, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    # gRPC takes any bytes here and fails only at the handshake, with a log line that names no file.
    if marker not in data:
        raise ConfigError(f"{key}: {path} holds no PEM {what}")
    return data


def _check_pair(config: AgentConfig, key_pem: bytes) -> None:
    """The stdlib's TLS stack confirms the key belongs to the certificate and the CA file parses."""
    if b"ENCRYPTED" in key_pem:
        raise ConfigError(f"tls_key_file: {config.tls_key_file} is encrypted; the agent needs it unencrypted")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # A password callback, so that OpenSSL never prompts on a terminal for an unexpected passphrase.
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tls_key_file: {config.tls_key_file} and tls_cert_file: {config.tls_cert_file} "
            f"are not a certificate and its key ({exc})"
        ) from None
    try:
        context.load_verify_locations(cafile=config.tls_ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls_ca_file: {config.tls_ca_file}: not a usable CA certificate ({exc})") from None


def load_channel_tls(config: AgentConfig) -> ChannelTls | None:
    """The agent's mTLS material, or None when TLS is off; ConfigError names the key that is wrong."""
    given = {k: getattr(config, k) for k in TLS_KEYS}
    if not any(given.values()):
        if config.tls_server_name:
            raise ConfigError(f"tls_server_name: only means something with {', '.join(TLS_KEYS)} set")
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: must be set with {', '.join(k for k, v in given.items() if v)}: mTLS needs "
            "the CA, this node's certificate and its key (fleetwatchctl certs issue NODE)"
        )
    root = _read("tls_ca_file", config.tls_ca_file, b"-----BEGIN CERTIFICATE-----", "certificate")
    chain = _read("tls_cert_file", config.tls_cert_file, b"-----BEGIN CERTIFICATE-----", "certificate")
    key = _read("tls_key_file", config.tls_key_file, b"PRIVATE KEY-----", "private key")
    _check_pair(config, key)
    return ChannelTls(root, chain, key, config.tls_server_name)


def plaintext_warning(config: AgentConfig) -> str | None:
    """What to log when the agent streams without TLS to a collector on another machine."""
    if any(getattr(config, k) for k in TLS_KEYS):
        return None
    remote = []
    for entry in config.collector_address:
        try:
            host, _ = parse_host_port(entry)
        except ValueError:
            continue  # the channel reports the bad address itself
        if not is_loopback(host):
            remote.append(entry)
    if not remote:
        return None
    return (
        f"streaming to {', '.join(remote)} without TLS: anyone on the path can read or forge this "
        f"node's data; set {', '.join(TLS_KEYS)} (fleetwatchctl certs issue NODE)"
    )


def open_channel(
    config: AgentConfig, options: list[tuple[str, Any]], target: CollectorTarget | None = None
) -> grpc.aio.Channel:
    """A channel to `target` (default: the first collector_address), with mTLS when it is configured.

    The files are read for every connection, so a renewed certificate is used from the next
    reconnect on without a restart; one that cannot be read fails that connection attempt
    (ConnectionError, which the send loop logs and retries) rather than the agent.
    """
    try:
        tls = load_channel_tls(config)
    except ConfigError as exc:
        raise ConnectionError(str(exc)) from None
    if target is None:
        target = CollectorTarget.of(config.collector_address[0])
    if tls is None:
        return grpc.aio.insecure_channel(target.address, options=options)
    return grpc.aio.secure_channel(target.address, tls.credentials(), options=options + tls.options(target))
