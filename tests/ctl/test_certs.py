"""`fleetwatchctl certs init/issue`: the files, their permissions, names, key usages and validity."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetwatch.certs import CA_VALIDITY_DAYS, LEAF_VALIDITY_DAYS
from fleetwatch.ctl.main import main


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def days(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc) / datetime.timedelta(days=1)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    assert main(["certs", "init", "--dir", str(directory)]) == 0
    return directory


def test_init_writes_a_ca_with_a_private_key_only_its_owner_reads(ca_dir: Path) -> None:
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "ca.key") == 0o600
    assert mode(ca_dir / "ca.crt") == 0o644
    ca = load(ca_dir / "ca.crt")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert CA_VALIDITY_DAYS <= days(ca) <= CA_VALIDITY_DAYS + 1


def test_init_refuses_to_replace_a_ca_unless_forced(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    assert main(["certs", "init", "--dir", str(ca_dir)]) == 1
    assert "already exist; --force replaces them" in capsys.readouterr().err
    assert (ca_dir / "ca.key").read_bytes() == before
    assert main(["certs", "init", "--dir", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "ca.key").read_bytes() != before
    assert mode(ca_dir / "ca.key") == 0o600


def test_a_node_certificate_names_the_node_for_client_auth_only(ca_dir: Path) -> None:
    assert main(["certs", "issue", "n01", "--dir", str(ca_dir)]) == 0
    assert mode(ca_dir / "n01.key") == 0o600
    cert, ca = load(ca_dir / "n01.crt"), load(ca_dir / "ca.crt")
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n01"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.DNSName("n01")]
    usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert LEAF_VALIDITY_DAYS <= days(cert) <= LEAF_VALIDITY_DAYS + 1


def test_a_collector_certificate_names_its_hosts_and_addresses_for_server_auth(ca_dir: Path) -> None:
    args = ["certs", "issue", "collector", "--server", "--dir", str(ca_dir)]
    assert main([*args, "--san", "collector.example.internal", "--san", "10.0.0.5", "--san", "::1"]) == 0
    cert = load(ca_dir / "collector.crt")
    cert.verify_directly_issued_by(load(ca_dir / "ca.crt"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["collector", "collector.example.internal"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert mode(ca_dir / "collector.key") == 0o600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ca"], "is the CA's own file name"),
        (["../n01"], "must be a host name"),
        (["n01", "--san", "10.0.0.5"], "--san is for a collector certificate"),
        (["collector", "--server", "--san", "bad name"], "subject alternative name 'bad name'"),
    ],
)
def test_issue_refuses_names_that_are_no_host_or_file_name(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["certs", "issue", *args, "--dir", str(ca_dir)]) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]


def test_issue_needs_a_ca_and_keeps_an_existing_certificate_unless_forced(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", "issue", "n01", "--dir", str(tmp_path / "empty")]) == 1
    assert "no CA in" in capsys.readouterr().err
    assert main(["certs", "issue", "n01", "--dir", str(ca_dir)]) == 0
    first = (ca_dir / "n01.crt").read_bytes()
    assert main(["certs", "issue", "n01", "--dir", str(ca_dir)]) == 1
    assert (ca_dir / "n01.crt").read_bytes() == first
    assert main(["certs", "issue", "n01", "--dir", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "n01.crt").read_bytes() != first
