"""Mutual TLS 1.3 with the deployment's private CA (docs/design.md invariant 7).

Every data connection (agent -> process server on 9443, process server ->
master target on 9444) is TLS 1.3 in both directions of trust: the server
proves its name to the client, the client proves which machine it is with a
certificate from ``blockrepl certs issue``. Only the deployment CA is trusted;
the system's CA store is never loaded, so no public certificate can pass.

OpenSSL also checks each certificate's extended key usage against its role: a
server certificate (serverAuth only) is refused as a client certificate and a
machine certificate (clientAuth only) is refused as a server certificate.

A listening server swaps its certificates on a reload with
:class:`ReloadableServerContext`: each new connection takes the newest
context, connections already open keep the one they began with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
import stat
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

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


class ReloadableServerContext:
    """A server context whose CA, certificate and key can be replaced while it listens.

    The listener keeps :attr:`context` for good; its SNI callback, which
    OpenSSL calls for every handshake (with ``None`` as the name when the
    client sent none), hands the connection the newest context. OpenSSL then
    takes the certificate, the key and the trusted CA from that context, so
    after :meth:`prepare` and the commit it returns, new connections present
    the new certificate and accept only clients of the new CA.

    Args:
        files: the CA, this server's certificate and its key.

    Raises:
        TlsSetupError: as :func:`server_context`.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.context = server_context(files)
        self.context.sni_callback = self._choose
        self._current = self.context
        self.files = files
        self.certificate = certificate_info(files.cert_file)

    def _choose(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        if self._current is not context:
            connection.context = self._current

    def prepare(self, files: TlsFiles) -> ServerTlsChange:
        """Load ``files`` into a new context; its commit makes new connections use it.

        Raises:
            TlsSetupError: a file cannot be read or parsed, or the key does
                not match the certificate; the running context stays.
        """
        context = server_context(files)
        certificate = certificate_info(files.cert_file)

        def commit() -> None:
            self._current = context
            self.files = files
            self.certificate = certificate

        note = renewal_note("server", files.cert_file, self.certificate, certificate)
        return ServerTlsChange(commit, certificate, note)


@dataclass(frozen=True)
class ServerTlsChange:
    """New server TLS files, loaded and checked: :attr:`commit` puts them in use."""

    commit: Callable[[], None]
    certificate: CertificateInfo
    #: a line for the log when the certificate differs from the one in use
    note: str | None


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator needs to know of a loaded certificate."""

    subject: str
    not_after: dt.datetime
    sha256: str

    @property
    def not_after_s(self) -> float:
        """``notAfter`` as seconds since the epoch (the expiry metrics' value)."""
        return self.not_after.timestamp()


def certificate_info(path: Path) -> CertificateInfo:
    """Subject, expiry and fingerprint of the first certificate in a PEM file.

    Raises:
        TlsSetupError: the file cannot be read or holds no PEM certificate.
    """
    from cryptography import x509  # noqa: PLC0415 - see _diagnose_cert_chain
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsSetupError(
            f"cannot read certificate {path}: expected a PEM certificate, found "
            f"{exc.strerror if isinstance(exc, OSError) else exc}"
        ) from exc
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    return CertificateInfo(
        certificate.subject.rfc4514_string(), certificate.not_valid_after_utc, digest
    )


def renewal_note(
    role: str, path: Path, running: CertificateInfo | None, loaded: CertificateInfo
) -> str | None:
    """A log line when a reloaded certificate differs from the one in use, else None."""
    if running is not None and running.sha256 == loaded.sha256:
        return None
    return (
        f"{role} certificate {path} is new ({loaded.subject}, valid until "
        f"{loaded.not_after:%Y-%m-%dT%H:%M:%SZ}): new connections use it"
    )


def client_context(files: TlsFiles, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that presents this machine's certificate and checks the server's name.

    Connect with ``server_hostname`` set to the host name or IP address the
    server's certificate names (``blockrepl certs init --name``).

    Args:
        files: the CA, this client's (machine) certificate and its key.
        check_hostname: False for a peer known by its certificate's CN, not
            its address (the agents of a consistency group): the chain is
            still verified against the CA, and the caller must check
            :func:`peer_identity` of the connection before trusting it.

    Raises:
        TlsSetupError: a file cannot be read or parsed, or the key does not
            match the certificate (the message names the file).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _restrict(context)
    # PROTOCOL_TLS_CLIENT sets both already; stated here because they are the point.
    context.check_hostname = check_hostname
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
    _load_trusted(
        context, files.ca_file, f"CA certificate {files.ca_file}", "the deployment's ca.pem"
    )
    if files.crl_file is not None:
        _check_readable(files.crl_file)
        _load_trusted(
            context,
            files.crl_file,
            f"CRL {files.crl_file}",
            "the crl.pem of 'blockrepl certs revoke'",
        )
        # Every peer certificate is checked against it; a CRL past its next
        # update fails every handshake, so 'certs revoke' signs it for as
        # long as the CA is valid.
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    try:
        context.load_cert_chain(certfile=files.cert_file, keyfile=files.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise _diagnose_cert_chain(files, exc) from exc


def _load_trusted(context: ssl.SSLContext, path: Path, what: str, expected: str) -> None:
    """Load a CA certificate or CRL into the context's trust store, naming the file."""
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"cannot load {what}: expected {expected} (PEM), found {_reason(exc)}"
        ) from exc


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
    # Imported here and in certificate_info only: a client that just connects
    # (``blockrepl agent sync``) does not pay the ~0.1 s cryptography takes.
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

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
