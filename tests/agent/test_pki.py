"""The deployment CA, checked with the openssl binary and by parsing what was written."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.pki import (
    CA_VALIDITY_DAYS,
    CLOCK_SKEW_ALLOWANCE,
    LEAF_VALIDITY_DAYS,
    init_ca,
    issue_machine,
)
from runtime.errors import InvalidArgumentError, PkiError
from tests.conftest import require_binary

SERVER_PURPOSE = {
    "processserver": "sslserver",
    "mastertarget": "sslserver",
    "machine-vm01": "sslclient",
}


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run Debian's openssl binary (skipped if missing, failed under CI)."""
    return subprocess.run(
        [require_binary("openssl"), *args], capture_output=True, text=True, timeout=30, check=False
    )


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file's bytes, mode and mtime: what "changes nothing" must keep."""
    return {
        path.name: (path.read_bytes(), path.stat().st_mode, path.stat().st_mtime_ns)
        for path in sorted(directory.iterdir())
    }


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize("name", ["ca", "processserver", "mastertarget", "machine-vm01"])
def test_openssl_verifies_every_certificate(pki_dir: Path, name: str) -> None:
    ca = str(pki_dir / "ca.pem")
    result = openssl("verify", "-x509_strict", "-CAfile", ca, str(pki_dir / f"{name}.pem"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")


@pytest.mark.parametrize(("name", "purpose"), list(SERVER_PURPOSE.items()))
def test_openssl_checks_each_certificate_for_its_role_only(
    pki_dir: Path, name: str, purpose: str
) -> None:
    ca, cert = str(pki_dir / "ca.pem"), str(pki_dir / f"{name}.pem")
    assert openssl("verify", "-purpose", purpose, "-CAfile", ca, cert).returncode == 0
    other = "sslclient" if purpose == "sslserver" else "sslserver"
    refused = openssl("verify", "-purpose", other, "-CAfile", ca, cert)
    assert refused.returncode != 0
    assert "unsuitable certificate purpose" in refused.stdout + refused.stderr


def test_openssl_text_of_the_machine_certificate(pki_dir: Path) -> None:
    result = openssl("x509", "-noout", "-text", "-in", str(pki_dir / "machine-vm01.pem"))
    assert result.returncode == 0, result.stderr
    assert "Subject: CN = vm01" in result.stdout
    assert "URI:urn:blockrepl:machine:vm01" in result.stdout
    assert "TLS Web Client Authentication" in result.stdout
    assert "TLS Web Server Authentication" not in result.stdout
    assert "CA:FALSE" in result.stdout
    assert "ecdsa-with-SHA256" in result.stdout


def test_openssl_text_of_a_server_certificate(pki_dir: Path) -> None:
    result = openssl("x509", "-noout", "-text", "-in", str(pki_dir / "processserver.pem"))
    assert "Subject: CN = processserver" in result.stdout
    for san in (
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
        "DNS:ps.example.net",
        "IP Address:192.0.2.10",
    ):
        assert san in result.stdout


def test_ca_extensions_and_validity(pki_dir: Path) -> None:
    ca = load(pki_dir / "ca.pem")
    assert ca.subject == ca.issuer
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert lifetime == dt.timedelta(days=CA_VALIDITY_DAYS) + CLOCK_SKEW_ALLOWANCE


@pytest.mark.parametrize(
    ("name", "usage"),
    [
        ("processserver", ExtendedKeyUsageOID.SERVER_AUTH),
        ("mastertarget", ExtendedKeyUsageOID.SERVER_AUTH),
        ("machine-vm01", ExtendedKeyUsageOID.CLIENT_AUTH),
    ],
)
def test_leaf_extensions(pki_dir: Path, name: str, usage: x509.ObjectIdentifier) -> None:
    ca, leaf = load(pki_dir / "ca.pem"), load(pki_dir / f"{name}.pem")
    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.digital_signature
    assert not key_usage.key_cert_sign
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == dt.timedelta(days=LEAF_VALIDITY_DAYS) + CLOCK_SKEW_ALLOWANCE
    assert leaf.serial_number != ca.serial_number


def test_not_before_lies_in_the_past(tmp_path: Path) -> None:
    now = dt.datetime(2026, 11, 22, 2, 19, 32, tzinfo=dt.UTC)
    init_ca(tmp_path / "pki", now=now)
    files = issue_machine(tmp_path / "pki", "vm01", days=30, now=now)
    cert = load(files.cert_file)
    assert cert.not_valid_before_utc == now - dt.timedelta(minutes=5)
    assert cert.not_valid_after_utc == now + dt.timedelta(days=30) == files.not_after


def test_server_sans(pki_dir: Path) -> None:
    sans = (
        load(pki_dir / "mastertarget.pem")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "ps.example.net"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("192.0.2.10"),
    ]
    subject = load(pki_dir / "mastertarget.pem").subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mastertarget"


def test_file_modes(pki_dir: Path) -> None:
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in pki_dir.iterdir()}
    assert modes == {
        "ca.pem": 0o644,
        "ca.key": 0o600,
        "processserver.pem": 0o644,
        "processserver.key": 0o600,
        "mastertarget.pem": 0o644,
        "mastertarget.key": 0o600,
        "machine-vm01.pem": 0o644,
        "machine-vm01.key": 0o600,
    }
    assert stat.S_IMODE(pki_dir.stat().st_mode) == 0o700
    for key in pki_dir.glob("*.key"):
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted


def test_second_init_refuses_and_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    init_ca(directory)
    before = snapshot(directory)
    with pytest.raises(PkiError, match=r"already holds a CA \(ca\.pem, ca\.key, .*refusing"):
        init_ca(directory, ["other.example"])
    assert snapshot(directory) == before


def test_init_refuses_when_any_one_file_exists(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir()
    (directory / "mastertarget.key").write_bytes(b"someone's key")
    with pytest.raises(PkiError, match=r"\(mastertarget\.key\)"):
        init_ca(directory)
    assert sorted(os.listdir(directory)) == ["mastertarget.key"]
    assert (directory / "mastertarget.key").read_bytes() == b"someone's key"


def test_init_into_an_existing_directory_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("mine")
    init_ca(tmp_path)
    assert (tmp_path / "README").read_text() == "mine"
    assert (tmp_path / "ca.pem").exists()


def test_second_issue_refuses_and_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    init_ca(directory)
    issue_machine(directory, "vm01")
    before = snapshot(directory)
    with pytest.raises(PkiError, match=r"already holds a certificate for machine vm01"):
        issue_machine(directory, "vm01")
    assert snapshot(directory) == before


@pytest.mark.parametrize("machine", ["", "vm 01", "../etc", "..", "vm/01", "x" * 65, "vé"])
def test_issue_refuses_a_bad_machine_name(tmp_path: Path, machine: str) -> None:
    directory = tmp_path / "pki"
    init_ca(directory)
    before = snapshot(directory)
    with pytest.raises(InvalidArgumentError, match=r"machine id must match \[A-Za-z0-9\._-\]"):
        issue_machine(directory, machine)
    assert snapshot(directory) == before


@pytest.mark.parametrize("name", ["bad name", "-lead.example", "a..b", "x" * 64 + ".example", ""])
def test_init_refuses_a_bad_server_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"server name must be a DNS name .* or an IP address"
    ):
        init_ca(tmp_path / "pki", [name])
    assert not (tmp_path / "pki").exists()


def test_issue_without_a_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"cannot read CA file .*ca\.pem.*certs init --dir"):
        issue_machine(tmp_path, "vm01")
    assert os.listdir(tmp_path) == []


def test_issue_with_a_mismatched_ca_key(tmp_path: Path, other_pki_dir: Path) -> None:
    init_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    shutil.copy(other_pki_dir / "ca.key", tmp_path / "ca.key")
    with pytest.raises(PkiError, match="does not match CA certificate"):
        issue_machine(tmp_path, "vm01")


@pytest.mark.parametrize("days", [0, -1, CA_VALIDITY_DAYS + 1])
def test_days_out_of_range(tmp_path: Path, days: int) -> None:
    with pytest.raises(InvalidArgumentError, match="--days"):
        init_ca(tmp_path / "a", days=days)
    init_ca(tmp_path / "b")
    with pytest.raises(InvalidArgumentError, match="--days"):
        issue_machine(tmp_path / "b", "vm01", days=days)
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b" / "machine-vm01.pem").exists()


def test_issue_with_an_expired_ca(tmp_path: Path) -> None:
    long_ago = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    init_ca(tmp_path, now=long_ago)
    with pytest.raises(PkiError, match="expired on 2009-12-29"):
        issue_machine(tmp_path, "vm01")


def test_init_creates_missing_parent_directories(tmp_path: Path) -> None:
    init_ca(tmp_path / "a" / "b" / "pki")
    assert (tmp_path / "a" / "b" / "pki" / "ca.pem").is_file()


def test_init_losing_a_race_removes_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process creates mastertarget.key after the up-front check: the
    # exclusive create catches it, and the files already written are removed.
    (tmp_path / "mastertarget.key").write_bytes(b"theirs")
    monkeypatch.setattr(os.path, "lexists", lambda _path: False)
    with pytest.raises(PkiError, match=r"mastertarget\.key exists already.*nothing was written"):
        init_ca(tmp_path)
    assert os.listdir(tmp_path) == ["mastertarget.key"]
    assert (tmp_path / "mastertarget.key").read_bytes() == b"theirs"


def test_a_group_certificate_serves_and_connects_but_names_no_host(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_ca(pki)
    files = issue_machine(pki, "db01", group=True)
    assert (files.cert_file.name, files.key_file.name) == ("group-db01.pem", "group-db01.key")
    cert = load(files.cert_file)
    usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:blockrepl:group-member:db01"
    ]
    assert sans.get_values_for_type(x509.DNSName) == []
    assert sans.get_values_for_type(x509.IPAddress) == []
    for purpose in ("sslserver", "sslclient"):
        verified = openssl("verify", "-purpose", purpose, "-CAfile", str(pki / "ca.pem"),
                           str(files.cert_file))  # fmt: skip
        assert verified.returncode == 0, verified.stderr
    with pytest.raises(PkiError, match="a group certificate for machine db01"):
        issue_machine(pki, "db01", group=True)
    assert issue_machine(pki, "db01").cert_file.name == "machine-db01.pem"
