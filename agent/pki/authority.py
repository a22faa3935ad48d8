"""The CA's directory: ``certs init``, ``certs issue``, ``certs revoke`` (:mod:`agent.pki`).

Nothing is ever overwritten, and a set of files appears whole or not at
all: every file is created with runtime/crashsafe.py under its final name
only once complete, and the files of a set made before a failure are
removed again.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.pki.certificates import (
    CLOCK_SKEW_ALLOWANCE,
    LEAF_VALIDITY_DAYS,
    build_ca,
    build_leaf,
    cert_pem,
    check_leaf_days,
    common_name,
    key_pem,
    server_sans,
    utc,
)
from protocol.errors import MalformedError
from protocol.limits import check_id
from runtime.crashsafe import create_file_exclusive, fsync_dir, unlink_durable, write_file_atomic
from runtime.errors import AlreadyExistsError, InvalidArgumentError, PkiError

#: The servers ``certs init`` makes certificates for; each is also its CN.
SERVER_NAMES: Final = ("processserver", "mastertarget")
#: Mode of private key files: only the owner reads them.
PRIVATE_KEY_MODE: Final = 0o600
#: Mode of certificate files: public, anyone may read them.
CERTIFICATE_MODE: Final = 0o644
#: Mode of a directory ``certs init`` creates: it holds the CA key.
PKI_DIR_MODE: Final = 0o700

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
    issued = utc(now)
    sans = server_sans(names)
    file_names = [CA_CERT_NAME, CA_KEY_NAME]
    for server in SERVER_NAMES:
        file_names += [f"{server}.pem", f"{server}.key"]
    _refuse_existing(folder, file_names, "a CA", "remove them first, or use another --dir")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build_ca(ca_key, issued)
    check_leaf_days(days, issued, ca_cert)
    outputs: list[tuple[str, bytes, int]] = [
        (CA_CERT_NAME, cert_pem(ca_cert), CERTIFICATE_MODE),
        (CA_KEY_NAME, key_pem(ca_key), PRIVATE_KEY_MODE),
    ]
    servers: list[CertificateFiles] = []
    for server in SERVER_NAMES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_leaf(
            ca_cert,
            ca_key,
            key,
            name=server,
            issued=issued,
            days=days,
            role="server",
            server_sans=sans,
        )
        outputs += [
            (f"{server}.pem", cert_pem(cert), CERTIFICATE_MODE),
            (f"{server}.key", key_pem(key), PRIVATE_KEY_MODE),
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
        common_name(ca_cert), folder / CA_CERT_NAME, folder / CA_KEY_NAME, ca_end
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
    issued = utc(now)
    cert_name, key_name = machine_file_names(machine, group=group)
    _refuse_existing(
        folder,
        [cert_name, key_name],
        f"a {'group ' if group else ''}certificate for machine {machine}",
        "to replace it, remove both files first",
    )
    ca_cert, ca_key = _load_ca(folder, issued)
    check_leaf_days(days, issued, ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_leaf(
        ca_cert,
        ca_key,
        key,
        name=machine,
        issued=issued,
        days=days,
        role="group-member" if group else "machine",
    )
    outputs = [
        (cert_name, cert_pem(cert), CERTIFICATE_MODE),
        (key_name, key_pem(key), PRIVATE_KEY_MODE),
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
    issued = utc(now)
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
