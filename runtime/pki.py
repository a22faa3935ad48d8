"""The deployment's private certificate authority (DESIGN.md invariant 7).

``blockrepl certs init`` makes, in one directory: the CA (``ca.pem``,
``ca.key``) and the two server certificates (``processserver.pem/.key``,
``mastertarget.pem/.key``). ``blockrepl certs issue`` adds a client certificate
``machine-M.pem/.key`` for one machine M, whose subject CN is the machine id a
server authorises writes by (runtime/tls.py ``peer_identity``); with
``--group``, the certificate ``group-M.pem/.key`` M uses on the consistency
group port, where it is a server to its coordinator and a client to the
other members (docs/groups.md).

Choices, each for a reason:

* ECDSA P-256 with SHA-256: small and fast handshakes, supported by every TLS
  1.3 stack.
* The CA may sign leaves only (``pathLenConstraint = 0``); server certificates
  carry serverAuth only and machine certificates clientAuth only, so neither
  can act in the other role (OpenSSL checks the purpose in the handshake).
  A group certificate carries both, as agents of a group serve each other,
  but no DNS or IP name: it cannot pass as a process server or master target
  (their clients check the host name), and group peers check its CN instead.
* CA valid 10 years, leaves 825 days by default: the longest leaf lifetime
  that common TLS clients still accept.
* ``notBefore`` a few minutes in the past: a host whose clock lags a little
  must not refuse a certificate made a moment ago.
* Nothing is ever overwritten: a second CA would silently cut off every
  machine holding a certificate from the first.

Private keys are PEM PKCS#8, unencrypted (a daemon starts unattended), mode
0600; certificates mode 0644; all written with runtime/crashsafe.py.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import MalformedError
from protocol.limits import check_id
from runtime.crashsafe import create_file_exclusive, fsync_dir, unlink_durable, write_file_atomic
from runtime.errors import AlreadyExistsError, InvalidArgumentError, PkiError

#: CA lifetime: long, as replacing it means reissuing every certificate.
CA_VALIDITY_DAYS: Final = 3650
#: Default leaf lifetime (CA/Browser Forum's former limit, still accepted by
#: clients that cap lifetimes).
LEAF_VALIDITY_DAYS: Final = 825
#: How far ``notBefore`` lies in the past, for hosts whose clocks lag.
CLOCK_SKEW_ALLOWANCE: Final = dt.timedelta(minutes=5)
#: The servers ``certs init`` makes certificates for; each is also its CN.
SERVER_NAMES: Final = ("processserver", "mastertarget")
#: Names every server certificate holds, so that loopback connections verify.
DEFAULT_SERVER_SANS: Final = ("localhost", "127.0.0.1", "::1")
#: Mode of private key files: only the owner reads them.
PRIVATE_KEY_MODE: Final = 0o600
#: Mode of certificate files: public, anyone may read them.
CERTIFICATE_MODE: Final = 0o644
#: Mode of a directory ``certs init`` creates: it holds the CA key.
PKI_DIR_MODE: Final = 0o700
#: The URI SAN of a machine certificate, for tools that read SANs rather than the CN.
MACHINE_URI_PREFIX: Final = "urn:blockrepl:machine:"
#: The URI SAN of a group certificate (the consistency group port).
GROUP_MEMBER_URI_PREFIX: Final = "urn:blockrepl:group-member:"
#: A DNS name as certificates hold it (RFC 1123 labels, at most 253 characters).
DNS_NAME_PATTERN: Final = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)

CA_CERT_NAME: Final = "ca.pem"
CA_KEY_NAME: Final = "ca.key"
#: The CA's certificate revocation list, rewritten by each revocation.
CRL_NAME: Final = "crl.pem"


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate and private key that were written.

    Args:
        name: the subject CN.
        cert_file: the PEM certificate (mode 0644).
        key_file: the PEM PKCS#8 private key (mode 0600).
        not_after: when the certificate expires (UTC).
    """

    name: str
    cert_file: Path
    key_file: Path
    not_after: dt.datetime


@dataclass(frozen=True)
class DeploymentPki:
    """What ``certs init`` wrote.

    Args:
        ca: the CA certificate and key.
        servers: the server certificates, in :data:`SERVER_NAMES` order.
        server_sans: the names and addresses every server certificate is valid for.
    """

    ca: CertificateFiles
    servers: tuple[CertificateFiles, ...]
    server_sans: tuple[str, ...]


def machine_file_names(machine: str, *, group: bool = False) -> tuple[str, str]:
    """The certificate and key file names of a machine's client certificate,
    or (``group``) of its certificate for the consistency group port."""
    prefix = "group" if group else "machine"
    return f"{prefix}-{machine}.pem", f"{prefix}-{machine}.key"


def init_ca(
    directory: str | Path,
    names: Sequence[str] = (),
    *,
    days: int = LEAF_VALIDITY_DAYS,
    now: dt.datetime | None = None,
) -> DeploymentPki:
    """Make a new CA and the server certificates in ``directory`` (created if missing).

    Args:
        directory: where the files go.
        names: extra DNS names or IP addresses the servers are reached by
            (an IP address string becomes an IP SAN, anything else a DNS SAN).
        days: validity of the server certificates.
        now: the issue time; the current time by default.

    Raises:
        InvalidArgumentError: a name is neither a DNS name nor an IP address,
            or ``days`` is out of range.
        PkiError: a file of the set exists already (nothing is changed).
        DurabilityError: a file could not be written durably (files this call
            wrote are removed again).
    """
    folder = Path(directory)
    issued = _utc(now)
    sans = _server_sans(names)
    file_names = [CA_CERT_NAME, CA_KEY_NAME]
    for server in SERVER_NAMES:
        file_names += [f"{server}.pem", f"{server}.key"]
    _refuse_existing(folder, file_names, "a CA", "remove them first, or use another --dir")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _build_ca(ca_key, issued)
    _check_leaf_days(days, issued, ca_cert)
    outputs: list[tuple[str, bytes, int]] = [
        (CA_CERT_NAME, _cert_pem(ca_cert), CERTIFICATE_MODE),
        (CA_KEY_NAME, _key_pem(ca_key), PRIVATE_KEY_MODE),
    ]
    servers: list[CertificateFiles] = []
    for server in SERVER_NAMES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _build_leaf(
            ca_cert, ca_key, key, name=server, issued=issued, days=days, role="server",
            server_sans=sans,
        )  # fmt: skip
        outputs += [
            (f"{server}.pem", _cert_pem(cert), CERTIFICATE_MODE),
            (f"{server}.key", _key_pem(key), PRIVATE_KEY_MODE),
        ]
        servers.append(
            CertificateFiles(
                server, folder / f"{server}.pem", folder / f"{server}.key", cert.not_valid_after_utc
            )
        )
    _make_directory(folder)
    _write_all_or_nothing(folder, outputs)
    ca_end = ca_cert.not_valid_after_utc
    ca_files = CertificateFiles(
        _common_name(ca_cert), folder / CA_CERT_NAME, folder / CA_KEY_NAME, ca_end
    )
    return DeploymentPki(ca=ca_files, servers=tuple(servers), server_sans=tuple(sans))


def issue_machine(
    directory: str | Path,
    machine: str,
    *,
    days: int = LEAF_VALIDITY_DAYS,
    now: dt.datetime | None = None,
    group: bool = False,
) -> CertificateFiles:
    """Issue the client certificate of ``machine`` with the CA in ``directory``.

    Args:
        directory: the directory ``init_ca`` wrote.
        machine: the machine id (``[A-Za-z0-9._-]{1,64}``), the certificate's CN.
        days: validity; the certificate may not outlive the CA.
        now: the issue time; the current time by default.
        group: issue the machine's certificate for the consistency group
            port instead (``group-M.pem``: serverAuth and clientAuth, no
            host name).

    Raises:
        InvalidArgumentError: ``machine`` is not a valid machine id, or
            ``days`` is out of range.
        PkiError: the machine already has a certificate (nothing is changed),
            the CA files are missing, unreadable or do not match, or the CA
            has expired.
        DurabilityError: a file could not be written durably.
    """
    folder = Path(directory)
    try:
        check_id("machine", machine)
    except MalformedError as exc:
        raise InvalidArgumentError(exc.message) from exc
    issued = _utc(now)
    cert_name, key_name = machine_file_names(machine, group=group)
    _refuse_existing(
        folder,
        [cert_name, key_name],
        f"a {'group ' if group else ''}certificate for machine {machine}",
        "to replace it, remove both files first",
    )
    ca_cert, ca_key = _load_ca(folder, issued)
    _check_leaf_days(days, issued, ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_leaf(
        ca_cert, ca_key, key, name=machine, issued=issued, days=days,
        role="group-member" if group else "machine",
    )  # fmt: skip
    outputs = [
        (cert_name, _cert_pem(cert), CERTIFICATE_MODE),
        (key_name, _key_pem(key), PRIVATE_KEY_MODE),
    ]
    _write_all_or_nothing(folder, outputs)
    return CertificateFiles(
        machine, folder / cert_name, folder / key_name, cert.not_valid_after_utc
    )


@dataclass(frozen=True)
class Revocation:
    """What :func:`revoke` did.

    Attributes:
        crl_file: the rewritten CRL.
        serial: the serial number of the certificate revoked.
        revoked: how many certificates the CRL lists now.
        next_update: when the CRL stops being valid (the CA's own end).
    """

    crl_file: Path
    serial: int
    revoked: int
    next_update: dt.datetime


def revoke(
    directory: str | Path, cert_file: str | Path, *, now: dt.datetime | None = None
) -> Revocation:
    """Add the certificate in ``cert_file`` to the CRL of the CA in ``directory``.

    The CRL (``crl.pem``) is signed anew with every earlier entry kept, valid
    until the CA itself expires: a CRL past its next update would make every
    handshake fail. Servers and clients with ``crl_file`` set refuse the
    certificate from their next start (or reload).

    Raises:
        PkiError: the certificate was not issued by this CA, or a file cannot
            be read or parsed (nothing is changed).
        DurabilityError: the new CRL could not be written durably.
    """
    folder = Path(directory)
    issued = _utc(now)
    ca_cert, ca_key = _load_ca(folder, issued)
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read certificate {cert_file}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"cannot parse certificate {cert_file}: expected PEM, found {exc}") from exc
    if cert.issuer != ca_cert.subject:
        raise PkiError(
            f"certificate {cert_file} was issued by {cert.issuer.rfc4514_string()}, "
            f"expected the CA in {folder} ({ca_cert.subject.rfc4514_string()})"
        )
    entries = {entry.serial_number: entry for entry in _load_crl(folder, ca_cert)}
    if cert.serial_number not in entries:
        entries[cert.serial_number] = (
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(issued)
            .build()
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(issued - CLOCK_SKEW_ALLOWANCE)
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(int(issued.timestamp() * 1e6)), critical=False)
    )
    for entry in entries.values():
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    path = folder / CRL_NAME
    write_file_atomic(path, crl.public_bytes(serialization.Encoding.PEM), mode=CERTIFICATE_MODE)
    return Revocation(path, cert.serial_number, len(entries), ca_cert.not_valid_after_utc)


def _load_crl(folder: Path, ca_cert: x509.Certificate) -> list[x509.RevokedCertificate]:
    """The entries of the CA's current CRL, none if there is no CRL yet."""
    path = folder / CRL_NAME
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PkiError(f"cannot read CRL {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"cannot parse CRL {path}: expected PEM, found {exc}") from exc
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(
        public_key
    ):
        raise PkiError(f"CRL {path} is not signed by the CA in {folder}; move it aside first")
    return list(crl)


def _build_ca(key: ec.EllipticCurvePrivateKey, issued: dt.datetime) -> x509.Certificate:
    """The self-signed CA certificate: signs leaves only."""
    # A random suffix tells two deployments' CAs apart in every tool that
    # shows issuer names (and keeps OpenSSL from mixing them up by name).
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "blockrepl"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"blockrepl CA {os.urandom(4).hex()}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(issued + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _build_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    *,
    name: str,
    issued: dt.datetime,
    days: int,
    role: Literal["server", "machine", "group-member"],
    server_sans: Sequence[str] = (),
) -> x509.Certificate:
    """A leaf certificate: a server's (valid for ``server_sans``), a machine's,
    or a machine's for the group port."""
    usages: list[x509.ObjectIdentifier]
    alt_names: list[x509.GeneralName]
    if role == "server":
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        alt_names = [_general_name(san) for san in server_sans]
    elif role == "machine":
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        alt_names = [x509.UniformResourceIdentifier(MACHINE_URI_PREFIX + name)]
    else:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        alt_names = [x509.UniformResourceIdentifier(GROUP_MEMBER_URI_PREFIX + name)]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(issued + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    """A KeyUsage extension: a leaf signs handshakes, the CA signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _server_sans(extra: Sequence[str]) -> list[str]:
    """The server SANs: the loopback names and every valid extra name, without repeats."""
    sans: list[str] = []
    for name in (*DEFAULT_SERVER_SANS, *extra):
        _general_name(name)  # refuse a bad name before anything is made
        if name not in sans:
            sans.append(name)
    return sans


def _general_name(name: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS SAN for a host name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not DNS_NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            f"server name must be a DNS name (letters, digits, hyphens, dots) or an IP"
            f" address, found {name!r}"
        )
    return x509.DNSName(name)


def _check_leaf_days(days: int, issued: dt.datetime, ca_cert: x509.Certificate) -> None:
    """A leaf lives at least a day and not past its CA (a chain is only as valid as its CA)."""
    if days < 1:
        raise InvalidArgumentError(f"--days must be at least 1, found {days}")
    ca_end = ca_cert.not_valid_after_utc
    if issued + dt.timedelta(days=days) > ca_end:
        remaining = (ca_end - issued).days
        raise InvalidArgumentError(
            f"a certificate valid {days} days would outlive the CA, which expires on"
            f" {ca_end:%Y-%m-%d}: expected --days at most {remaining}"
        )


def _load_ca(
    folder: Path, issued: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key of ``folder`` and check that they belong together."""
    cert_path, key_path = folder / CA_CERT_NAME, folder / CA_KEY_NAME
    hint = f"expected the files of 'blockrepl certs init --dir {folder}'"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise PkiError(f"cannot read CA file {exc.filename}: {exc.strerror}; {hint}") from exc
    except (ValueError, TypeError) as exc:
        raise PkiError(f"cannot parse the CA in {folder}: {exc}; {hint}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PkiError(f"CA key {key_path} does not match CA certificate {cert_path}; {hint}")
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        raise PkiError(f"{cert_path} is not a CA certificate; {hint}")
    if cert.not_valid_after_utc <= issued:
        raise PkiError(
            f"the CA in {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}:"
            " make a new one (and reissue every certificate) in another directory"
        )
    return cert, key


def _refuse_existing(folder: Path, file_names: Sequence[str], what: str, advice: str) -> None:
    """Refuse before making anything if any file of the set exists."""
    present = [name for name in file_names if os.path.lexists(folder / name)]
    if present:
        raise PkiError(
            f"{folder} already holds {what} ({', '.join(present)}); refusing to overwrite"
            f" anything; {advice}",
            details={"existing": [str(folder / name) for name in present]},
        )


def _make_directory(folder: Path) -> None:
    """Create ``folder`` (mode 0700) and missing parents durably, if it does not exist."""
    absolute = folder.absolute()
    missing = [path for path in (absolute, *absolute.parents) if not path.exists()]
    try:
        absolute.mkdir(mode=PKI_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create directory {folder}: {exc.strerror or exc}") from exc
    # Each new directory entry is durable only once its parent is fsynced.
    for path in reversed(missing):
        fsync_dir(path.parent)


def _write_all_or_nothing(folder: Path, outputs: Sequence[tuple[str, bytes, int]]) -> None:
    """Create every file, or remove those made if one fails (a race or a full disk)."""
    written: list[Path] = []
    try:
        for name, data, mode in outputs:
            create_file_exclusive(folder / name, data, mode=mode)
            written.append(folder / name)
    except AlreadyExistsError as exc:
        _remove(written)
        raise PkiError(f"{exc.message} (created meanwhile); nothing was written") from exc
    except BaseException:
        _remove(written)
        raise


def _remove(paths: Sequence[Path]) -> None:
    """Undo a partial write."""
    for path in reversed(paths):
        unlink_durable(path, missing_ok=True)


def _cert_pem(cert: x509.Certificate) -> bytes:
    """A certificate as PEM, checked by parsing it back."""
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if x509.load_pem_x509_certificate(pem) != cert:
        raise PkiError(f"certificate {_common_name(cert)} did not survive PEM encoding")
    return pem


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PEM PKCS#8, checked by parsing it back."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if serialization.load_pem_private_key(pem, password=None).public_key() != key.public_key():
        raise PkiError("a private key did not survive PEM encoding")
    return pem


def _common_name(cert: x509.Certificate) -> str:
    """The subject CN of a certificate this module made."""
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _utc(now: dt.datetime | None) -> dt.datetime:
    """``now`` (or the current time) in UTC, whole seconds as certificates hold them."""
    moment = now.astimezone(dt.UTC) if now is not None else dt.datetime.now(dt.UTC)
    return moment.replace(microsecond=0)
