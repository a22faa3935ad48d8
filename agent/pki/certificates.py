"""The certificates of the deployment's CA, built and encoded (:mod:`agent.pki`).

ECDSA P-256 with SHA-256; the CA signs leaves only; each leaf carries the
extended key usage of its role and the names its peers check. Every PEM
file is parsed back before it is written.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime.errors import InvalidArgumentError, PkiError

#: CA lifetime: long, as replacing it means reissuing every certificate.
CA_VALIDITY_DAYS: Final = 3650
#: Default leaf lifetime (CA/Browser Forum's former limit, still accepted by
#: clients that cap lifetimes).
LEAF_VALIDITY_DAYS: Final = 825
#: How far ``notBefore`` lies in the past, for hosts whose clocks lag.
CLOCK_SKEW_ALLOWANCE: Final = dt.timedelta(minutes=5)
#: Names every server certificate holds, so that loopback connections verify.
DEFAULT_SERVER_SANS: Final = ("localhost", "127.0.0.1", "::1")
#: The URI SAN of a machine certificate, for tools that read SANs rather than the CN.
MACHINE_URI_PREFIX: Final = "urn:blockrepl:machine:"
#: The URI SAN of a group certificate (the consistency group port).
GROUP_MEMBER_URI_PREFIX: Final = "urn:blockrepl:group-member:"
#: A DNS name as certificates hold it (RFC 1123 labels, at most 253 characters).
DNS_NAME_PATTERN: Final = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def build_ca(key: ec.EllipticCurvePrivateKey, issued: dt.datetime) -> x509.Certificate:
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


def build_leaf(
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


def server_sans(extra: Sequence[str]) -> list[str]:
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


def check_leaf_days(days: int, issued: dt.datetime, ca_cert: x509.Certificate) -> None:
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


def cert_pem(cert: x509.Certificate) -> bytes:
    """A certificate as PEM, checked by parsing it back."""
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if x509.load_pem_x509_certificate(pem) != cert:
        raise PkiError(f"certificate {common_name(cert)} did not survive PEM encoding")
    return pem


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PEM PKCS#8, checked by parsing it back."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if serialization.load_pem_private_key(pem, password=None).public_key() != key.public_key():
        raise PkiError("a private key did not survive PEM encoding")
    return pem


def common_name(cert: x509.Certificate) -> str:
    """The subject CN of a certificate this module made."""
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def utc(now: dt.datetime | None) -> dt.datetime:
    """``now`` (or the current time) in UTC, whole seconds as certificates hold them."""
    moment = now.astimezone(dt.UTC) if now is not None else dt.datetime.now(dt.UTC)
    return moment.replace(microsecond=0)
