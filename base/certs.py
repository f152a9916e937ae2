"""A private CA for mTLS between agents and the collector: the CA, node (client) and collector (server) certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# `fleetwatchctl certs` and `fleetwatchctl demo --tls` both make their certificates here, so it sits
# in the base layer. `cryptography` comes with the collector extra and a bare install (the step
# reporter alone) has none, so it is imported inside the functions, never at module level. Keys are
# ECDSA P-256: small, fast to make, and accepted by every gRPC TLS stack.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CA_VALIDITY_DAYS = 3650
# The CA/Browser Forum's former ceiling for leaf certificates, which Apple platforms still enforce.
LEAF_VALIDITY_DAYS = 825
# Issued certificates start this far in the past, so a node whose clock runs behind accepts them.
CLOCK_SKEW_SECONDS = 300
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CA_COMMON_NAME = "fleetwatch CA"
KEY_FILE_MODE = 0o600
CERT_FILE_MODE = 0o644
# A node name becomes a DNS SAN and a file name (NAME.crt): host-name characters only, no path parts.
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


class CertError(Exception):
    """A certificate cannot be made or written; the message says which file or name and why."""


@dataclass(frozen=True)
class KeyPair:
    """One certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def check_name(name: str) -> str | None:
    """Why `name` cannot name a node or collector certificate, or None when it can."""
    if not _NAME.match(name) or ".." in name:
        return "must be a host name: letters, digits, '.', '-' and '_', starting and ending with a letter or digit"
    if name in (Path(CA_CERT_FILE).stem, Path(CA_KEY_FILE).stem):
        return f"is the CA's own file name ({CA_CERT_FILE}, {CA_KEY_FILE})"
    return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    # Unencrypted: the daemons read it unattended at start; the file's 0600 mode protects it.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(
    common_name: str = CA_COMMON_NAME,
    *,
    validity_days: int = CA_VALIDITY_DAYS,
    now: datetime.datetime | None = None,
) -> KeyPair:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = now or _now()
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_SECONDS))
        .not_valid_after(now + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _load_ca(ca: KeyPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        cert = x509.load_pem_x509_certificate(ca.cert_pem)
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"not a PEM certificate and unencrypted private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("the CA key is not an ECDSA key (this CA was not made by fleetwatch)")
    if cert.public_key() != key.public_key():
        raise CertError("the CA certificate and key do not belong together")
    return cert, key


def subject_alt_names(sans: list[str]) -> list[x509.GeneralName]:
    """Each entry as an IP address SAN when it parses as one, else as a DNS name SAN; duplicates dropped."""
    from cryptography import x509

    out: list[x509.GeneralName] = []
    for san in dict.fromkeys(sans):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            problem = check_name(san)
            if problem:
                raise CertError(f"subject alternative name {san!r} {problem}, or an IP address") from None
            out.append(x509.DNSName(san))
    return out


def issue(
    ca: KeyPair,
    name: str,
    *,
    server: bool = False,
    sans: list[str] | None = None,
    validity_days: int = LEAF_VALIDITY_DAYS,
    now: datetime.datetime | None = None,
) -> KeyPair:
    """A leaf certificate signed by `ca`.

    A client certificate (the default) is node `name`'s identity: DNS SAN `name`, CN `name`,
    extendedKeyUsage clientAuth and nothing else, so it cannot serve as a collector. A server
    certificate (`server=True`) is the collector's: serverAuth, with `name` and every entry of
    `sans` (DNS names and IP addresses) as SANs, so that agents can verify the address they dial.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    problem = check_name(name)
    if problem:
        raise CertError(f"name {name!r} {problem}")
    if sans and not server:
        raise CertError("only a server certificate takes extra subject alternative names; a node's names only itself")
    ca_cert, ca_key = _load_ca(ca)
    now = now or _now()
    # Never valid past the CA: a verifier would refuse the chain then anyway, with a vaguer error.
    not_after = min(now + datetime.timedelta(days=validity_days), ca_cert.not_valid_after_utc)
    key = _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_SECONDS))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(subject_alt_names([name, *(sans or [])])), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


# -- files ------------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode` from the first byte on, replacing it atomically.

    The temporary file is created with the final mode, so a private key is never readable by
    others, not even for the moment between writing and chmod.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have taken bits away from 0644
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CertError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_pair(directory: Path, stem: str, pair: KeyPair, *, force: bool = False) -> tuple[Path, Path]:
    """`stem.crt` (0644) and `stem.key` (0600) in `directory`; refuses to replace either unless `force`."""
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    if not force:
        existing = [str(p) for p in (cert_path, key_path) if p.exists()]
        if existing:
            raise CertError(f"{' and '.join(existing)} already exist; --force replaces them")
    # The key first: a certificate without its key is useless, a stray key alone is harmless.
    _write(key_path, pair.key_pem, KEY_FILE_MODE)
    _write(cert_path, pair.cert_pem, CERT_FILE_MODE)
    return cert_path, key_path


def init_ca(directory: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Create `directory` (0700) holding a new CA, ca.crt and ca.key; refuses to replace a CA unless `force`.

    Replacing a CA invalidates every certificate it issued, which is why it needs asking twice.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(f"cannot create {directory}: {exc.strerror or exc}") from None
    return write_pair(directory, Path(CA_CERT_FILE).stem, make_ca(), force=force)


def read_ca(directory: Path) -> KeyPair:
    """The CA in `directory` (ca.crt, ca.key), checked to belong together."""
    try:
        pair = KeyPair((directory / CA_CERT_FILE).read_bytes(), (directory / CA_KEY_FILE).read_bytes())
    except OSError as exc:
        raise CertError(
            f"no CA in {directory}: cannot read {exc.filename}: {exc.strerror or exc} (`fleetwatchctl certs init`)"
        ) from None
    try:
        _load_ca(pair)
    except CertError as exc:
        raise CertError(f"{directory / CA_CERT_FILE}: {exc}") from None
    return pair


def issue_into(
    directory: Path, name: str, *, server: bool = False, sans: list[str] | None = None, force: bool = False
) -> tuple[Path, Path]:
    """Issue `name`'s certificate with the CA in `directory` and write NAME.crt and NAME.key beside it."""
    ca = read_ca(directory)
    return write_pair(directory, name, issue(ca, name, server=server, sans=sans), force=force)
