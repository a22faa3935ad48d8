"""Mutual TLS 1.3 over real sockets on 127.0.0.1, with certificates from agent/pki."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.pki import init_ca, issue_machine
from runtime.config import TlsFiles
from runtime.errors import PeerIdentityError, TlsSetupError
from runtime.tls import client_context, connection_identity, peer_identity, server_context

#: Upper bound of every network wait: loopback handshakes take milliseconds.
TIMEOUT_S = 10.0


def server_files(pki: Path, name: str = "processserver") -> TlsFiles:
    return TlsFiles(
        ca_file=pki / "ca.pem", cert_file=pki / f"{name}.pem", key_file=pki / f"{name}.key"
    )


def machine_files(pki: Path, machine: str = "vm01", *, ca_dir: Path | None = None) -> TlsFiles:
    return TlsFiles(
        ca_file=(ca_dir or pki) / "ca.pem",
        cert_file=pki / f"machine-{machine}.pem",
        key_file=pki / f"machine-{machine}.key",
    )


@dataclass
class EchoServer:
    """A TLS server that answers each connection with the peer's identity and TLS version."""

    port: int
    identities: list[str] = field(default_factory=list)
    peercert_identities: list[str] = field(default_factory=list)
    connection_identities: list[str] = field(default_factory=list)


async def exchange(context: ssl.SSLContext, port: int, server_hostname: str = "127.0.0.1") -> bytes:
    """Connect, read the server's one line, close; every wait bounded."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname),
        TIMEOUT_S,
    )
    try:
        return await asyncio.wait_for(reader.readline(), TIMEOUT_S)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT_S)


async def assert_refused(
    server: EchoServer, context: ssl.SSLContext, host: str = "127.0.0.1"
) -> None:
    """The connection fails (in the handshake, or by the server closing it unread)."""
    try:
        answer = await exchange(context, server.port, host)
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b""
    assert server.identities == []
    assert server.connection_identities == []


@pytest.fixture
async def echo_server(pki_dir: Path) -> AsyncIterator[EchoServer]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        identity = peer_identity(ssl_object)
        state.identities.append(identity)
        state.peercert_identities.append(peer_identity(writer.get_extra_info("peercert")))
        # Asked twice: the second answer is the one remembered for the connection.
        state.connection_identities += [connection_identity(ssl_object) for _ in range(2)]
        writer.write(f"{identity} {ssl_object.version()}\n".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        handle,
        "127.0.0.1",
        0,
        ssl=server_context(server_files(pki_dir)),
        ssl_handshake_timeout=TIMEOUT_S,
    )
    state = EchoServer(port=server.sockets[0].getsockname()[1])
    async with server:
        yield state
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT_S)


async def test_handshake_is_tls13_and_names_the_machine(
    echo_server: EchoServer, pki_dir: Path
) -> None:
    answer = await exchange(client_context(machine_files(pki_dir)), echo_server.port)
    assert answer == b"vm01 TLSv1.3\n"
    assert echo_server.identities == ["vm01"]
    assert echo_server.peercert_identities == ["vm01"]
    assert echo_server.connection_identities == ["vm01", "vm01"]


@pytest.mark.parametrize("host", ["localhost", "ps.example.net", "192.0.2.10"])
async def test_server_certificate_holds_every_configured_name(
    echo_server: EchoServer, pki_dir: Path, host: str
) -> None:
    # Connect to 127.0.0.1 but check the certificate against another of its names.
    answer = await exchange(client_context(machine_files(pki_dir)), echo_server.port, host)
    assert answer.startswith(b"vm01 ")


async def test_refused_without_client_certificate(echo_server: EchoServer, pki_dir: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki_dir / "ca.pem")
    await assert_refused(echo_server, context)


async def test_refused_client_certificate_from_another_ca(
    echo_server: EchoServer, pki_dir: Path, other_pki_dir: Path
) -> None:
    # Same machine name, same subject layout, but signed by another deployment's CA.
    files = machine_files(other_pki_dir, ca_dir=pki_dir)
    await assert_refused(echo_server, client_context(files))


async def test_refused_tls12_client(echo_server: EchoServer, pki_dir: Path) -> None:
    files = machine_files(pki_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(files.ca_file)
    context.load_cert_chain(files.cert_file, files.key_file)
    await assert_refused(echo_server, context)
    # The same client, allowed TLS 1.3, gets through: the version alone was refused.
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    assert await exchange(context, echo_server.port) == b"vm01 TLSv1.3\n"


async def test_refused_server_certificate_used_as_client_certificate(
    echo_server: EchoServer, pki_dir: Path
) -> None:
    # The master target's certificate carries serverAuth only.
    await assert_refused(echo_server, client_context(server_files(pki_dir, "mastertarget")))


async def test_client_refuses_wrong_server_name(echo_server: EchoServer, pki_dir: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        await exchange(client_context(machine_files(pki_dir)), echo_server.port, "other.example")
    assert echo_server.identities == []


async def test_client_refuses_machine_certificate_used_as_server_certificate(
    pki_dir: Path,
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    # A machine certificate (clientAuth only, no server names) posing as a server.
    files = TlsFiles(
        ca_file=pki_dir / "ca.pem",
        cert_file=pki_dir / "machine-vm01.pem",
        key_file=pki_dir / "machine-vm01.key",
    )
    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_context(files), ssl_handshake_timeout=TIMEOUT_S
    )
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await exchange(client_context(machine_files(pki_dir)), port)
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT_S)


def test_contexts_are_tls13_only_and_require_certificates(pki_dir: Path) -> None:
    for context in (server_context(server_files(pki_dir)), client_context(machine_files(pki_dir))):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        # The deployment CA only: no system store.
        assert [cert["subject"] for cert in context.get_ca_certs()] == [
            ((("organizationName", "blockrepl"),), (("commonName", ca_name(pki_dir)),))
        ]
    assert client_context(machine_files(pki_dir)).check_hostname


def ca_name(pki: Path) -> str:
    cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(name, str)
    assert name.startswith("blockrepl CA ")
    return name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ca_file": "absent.pem"}, r"cannot read TLS file .*absent\.pem: No such file"),
        ({"cert_file": "absent.pem"}, r"cannot read TLS file .*absent\.pem"),
        ({"key_file": "absent.key"}, r"cannot read TLS file .*absent\.key"),
        ({"ca_file": "garbage"}, r"cannot load CA certificate .*garbage: expected the deployment"),
        (
            {"cert_file": "garbage"},
            r"cannot load certificate .*garbage: expected a PEM certificate",
        ),
        ({"key_file": "garbage"}, r"cannot load private key .*garbage: expected an unencrypted"),
        ({"crl_file": "garbage"}, r"cannot load CRL .*garbage: expected the crl\.pem"),
        ({"crl_file": "absent.pem"}, r"cannot read TLS file .*absent\.pem"),
        (
            {"key_file": "mastertarget.key"},
            r"mastertarget\.key does not match certificate .*processserver\.pem",
        ),
    ],
)
def test_setup_errors_name_the_file(
    tmp_path: Path, pki_dir: Path, change: dict[str, str], message: str
) -> None:
    (tmp_path / "garbage").write_text("not a PEM file\n")
    (tmp_path / "garbage").chmod(0o600)  # a key others can read is refused before parsing
    fields: dict[str, Path | None] = {
        "ca_file": pki_dir / "ca.pem",
        "cert_file": pki_dir / "processserver.pem",
        "key_file": pki_dir / "processserver.key",
    }
    for key, name in change.items():
        fields[key] = (
            pki_dir if name.endswith(".key") and name != "absent.key" else tmp_path
        ) / name
    files = TlsFiles(**fields)  # type: ignore[arg-type]
    for make in (server_context, client_context):
        with pytest.raises(TlsSetupError, match=message) as caught:
            make(files)
        assert caught.value.exit_code == 78


@pytest.mark.parametrize(
    ("peercert", "message"),
    [
        (None, "found none"),
        ({}, "found none"),
        ({"subject": ()}, "found 0 CN"),
        ({"subject": ((("organizationName", "x"),),)}, "found 0 CN"),
        ({"subject": ((("commonName", "a"),), (("commonName", "b"),))}, "found 2 CN"),
        ({"subject": ((("commonName", "vm 01"),),)}, "machine id must match"),
        ({"subject": ((("commonName", ".."),),)}, "machine id must match"),
        ({"subject": ((("commonName", "x" * 65),),)}, "machine id must match"),
    ],
)
def test_peer_identity_refuses(peercert: dict[str, object] | None, message: str) -> None:
    with pytest.raises(PeerIdentityError, match=message) as caught:
        peer_identity(peercert)
    assert caught.value.http_status == 403


def test_peer_identity_of_a_peercert_dict() -> None:
    peercert = {"subject": ((("organizationName", "blockrepl"),), (("commonName", "db-01.prod"),))}
    assert peer_identity(peercert) == "db-01.prod"


def test_a_private_key_others_can_read_is_refused(tmp_path: Path, pki_dir: Path) -> None:
    key = tmp_path / "processserver.key"
    key.write_bytes((pki_dir / "processserver.key").read_bytes())
    key.chmod(0o604)
    files = TlsFiles(
        ca_file=pki_dir / "ca.pem", cert_file=pki_dir / "processserver.pem", key_file=key
    )
    with pytest.raises(TlsSetupError, match=r"readable by its owner only .*found mode 0604"):
        server_context(files)
    key.chmod(0o400)
    server_context(files)


async def test_group_certificates_meet_by_name_not_by_address(tmp_path: Path) -> None:
    """The agents of a consistency group serve each other with group
    certificates: known by CN, never by a host name they do not hold."""
    pki = tmp_path / "pki"
    init_ca(pki)
    for machine in ("vm01", "db01"):
        issue_machine(pki, machine, group=True)

    def files(machine: str) -> TlsFiles:
        return TlsFiles(
            ca_file=pki / "ca.pem", cert_file=pki / f"group-{machine}.pem",
            key_file=pki / f"group-{machine}.key",
        )  # fmt: skip

    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_identity(writer.get_extra_info("ssl_object")))
        writer.write(b"hello\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_context(files("db01")), ssl_handshake_timeout=TIMEOUT_S
    )
    port = server.sockets[0].getsockname()[1]
    async with server:
        by_name = client_context(files("vm01"), check_hostname=False)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=by_name), TIMEOUT_S
        )
        assert peer_identity(writer.get_extra_info("ssl_object")) == "db01"
        assert await asyncio.wait_for(reader.readline(), TIMEOUT_S) == b"hello\n"
        writer.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # no IP or DNS name in it
            await exchange(client_context(files("vm01")), port)
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT_S)
    assert seen == ["vm01"]
