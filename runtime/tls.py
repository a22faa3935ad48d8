"""Mutual TLS 1.3 with the deployment's private CA (DESIGN.md invariant 7).

Every data connection (agent -> process server on 9443, process server ->
master target on 9444) is TLS 1.3 in both directions of trust: the server
proves its name to the client, the client proves which machine it is with a
certificate from ``blockrepl certs issue``. Only the deployment CA is trusted;
the system's CA store is never loaded, so no public certificate can pass.

OpenSSL also checks each certificate's extended key usage against its role: a
server certificate (serverAuth only) is refused as a client certificate and a
machine certificate (clientAuth only) is refused as a server certificate.
"""

from __future__ import annotations

import ssl
import stat
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol.errors import MalformedError
from protocol.limits import check_id
from runtime.config import TlsFiles
from runtime.errors import PeerIdentityError, TlsSetupError
from runtime.privatefile import FORBIDDEN_MODE_BITS

#: The only TLS version spoken: 1.3 has no renegotiation, no static-RSA or CBC
#: suites and encrypts the client certificate, and every peer is our own code.
TLS_VERSION: Final = ssl.TLSVersion.TLSv1_3

#: What ``SSLSocket.getpeercert()`` returns for a verified certificate.
PeerCert = Mapping[str, object]


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context that requires a client certificate from the deployment CA.

    Args:
        files: the CA, this server's certificate and its key.

    Raises:
        TlsSetupError: a file cannot be read or parsed, or the key does not
            match the certificate (the message names the file).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _restrict(context)
    context.verify_mode = ssl.CERT_REQUIRED
    _load_files(context, files)
    return context


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client context that presents this machine's certificate and checks the server's name.

    Connect with ``server_hostname`` set to the host name or IP address the
    server's certificate names (``blockrepl certs init --name``).

    Args:
        files: the CA, this client's (machine) certificate and its key.

    Raises:
        TlsSetupError: a file cannot be read or parsed, or the key does not
            match the certificate (the message names the file).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _restrict(context)
    # PROTOCOL_TLS_CLIENT sets both already; stated here because they are the point.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    _load_files(context, files)
    return context


def peer_identity(peer: ssl.SSLObject | ssl.SSLSocket | PeerCert | None) -> str:
    """The machine name that a verified client certificate names: its subject CN.

    Args:
        peer: the connection's ``ssl_object`` (asyncio's
            ``get_extra_info("ssl_object")``), an ``SSLSocket``, or the dict
            ``getpeercert()`` returned.

    Raises:
        PeerIdentityError: no verified certificate, not exactly one subject
            CN, or a CN that is not a valid machine id.
    """
    cert = peer.getpeercert() if isinstance(peer, ssl.SSLObject | ssl.SSLSocket) else peer
    if not cert:
        # getpeercert() gives None without a certificate and {} for one that
        # was not verified: neither names anyone.
        raise PeerIdentityError("expected a verified client certificate, found none")
    names = [value for attribute, value in _subject_attributes(cert) if attribute == "commonName"]
    if len(names) != 1 or not isinstance(names[0], str):
        raise PeerIdentityError(
            f"expected a client certificate with one subject CN naming a machine, "
            f"found {len(names)} CN(s)"
        )
    try:
        return check_id("machine", names[0])
    except MalformedError as exc:
        raise PeerIdentityError(f"client certificate subject CN: {exc.message}") from exc


#: The identity of each open connection, worked out at its first request:
#: TLS 1.3 never renegotiates, so a connection's client certificate is fixed.
_IDENTITIES: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()


def connection_identity(ssl_object: ssl.SSLObject | None) -> str:
    """:func:`peer_identity` of a server connection, parsed once per connection.

    Raises:
        PeerIdentityError: as :func:`peer_identity` (a refusal is not remembered).
    """
    if ssl_object is None:
        return peer_identity(None)
    identity = _IDENTITIES.get(ssl_object)
    if identity is None:
        identity = _IDENTITIES[ssl_object] = peer_identity(ssl_object)
    return identity


def _restrict(context: ssl.SSLContext) -> None:
    """TLS 1.3 only, strict X.509 checks."""
    context.minimum_version = TLS_VERSION
    context.maximum_version = TLS_VERSION
    # RFC 5280 conformance (for example key identifiers present): our own CA
    # makes conforming certificates, so anything else is not from it.
    context.verify_flags |= ssl.VERIFY_X509_STRICT


def _load_files(context: ssl.SSLContext, files: TlsFiles) -> None:
    """Load the CA (and nothing else to trust), its CRL, and this side's certificate and key."""
    for path in (files.ca_file, files.cert_file, files.key_file):
        _check_readable(path)
    _check_private(files.key_file)
    try:
        context.load_verify_locations(cafile=files.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"cannot load CA certificate {files.ca_file}: expected the deployment's ca.pem"
            f" (PEM), found {_reason(exc)}"
        ) from exc
    if files.crl_file is not None:
        _check_readable(files.crl_file)
        try:
            context.load_verify_locations(cafile=files.crl_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(
                f"cannot load CRL {files.crl_file}: expected the crl.pem of 'blockrepl certs"
                f" revoke' (PEM), found {_reason(exc)}"
            ) from exc
        # Every peer certificate is checked against it; a CRL past its next
        # update fails every handshake, so 'certs revoke' signs it for as
        # long as the CA is valid.
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    try:
        context.load_cert_chain(certfile=files.cert_file, keyfile=files.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise _diagnose_cert_chain(files, exc) from exc


def _check_private(path: Path) -> None:
    """Refuse a private key that others than its owner may read or change."""
    mode = path.stat().st_mode
    if mode & FORBIDDEN_MODE_BITS:
        raise TlsSetupError(
            f"private key {path} must be readable by its owner only (mode 0600 or 0400), "
            f"found mode {stat.S_IMODE(mode):04o}; run: chmod 600 {path}"
        )


def _check_readable(path: Path) -> None:
    """Name the file in the message when one is missing or unreadable."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TlsSetupError(f"cannot read TLS file {path}: {exc.strerror or exc}") from exc


def _diagnose_cert_chain(files: TlsFiles, exc: OSError) -> TlsSetupError:
    """Say which of the certificate and the key is wrong; OpenSSL's message does not."""
    try:
        certificate = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    except (OSError, ValueError):
        return TlsSetupError(
            f"cannot load certificate {files.cert_file}: expected a PEM certificate,"
            f" found {_reason(exc)}"
        )
    try:
        key = serialization.load_pem_private_key(files.key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        # TypeError: the key is encrypted; a daemon cannot ask for a passphrase.
        return TlsSetupError(
            f"cannot load private key {files.key_file}: expected an unencrypted PEM"
            f" private key, found {_reason(exc)}"
        )
    if key.public_key() != certificate.public_key():
        return TlsSetupError(
            f"private key {files.key_file} does not match certificate {files.cert_file}"
        )
    return TlsSetupError(
        f"cannot load certificate {files.cert_file} with key {files.key_file}: {_reason(exc)}"
    )


def _reason(exc: OSError) -> str:
    """The most useful part of an OSError or SSLError for a message."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if exc.filename is not None:
        return f"{exc.strerror} ({exc.filename})"
    return exc.strerror or str(exc)


def _subject_attributes(cert: PeerCert) -> list[tuple[object, object]]:
    """The (attribute, value) pairs of a getpeercert() subject: a tuple of RDNs of pairs."""
    subject = cert.get("subject")
    pairs: list[tuple[object, object]] = []
    for rdn in subject if isinstance(subject, tuple) else ():
        for pair in rdn if isinstance(rdn, tuple) else ():
            if isinstance(pair, tuple) and len(pair) == 2:
                pairs.append((pair[0], pair[1]))
    return pairs
