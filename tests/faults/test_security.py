"""Hostile and broken clients against the real daemons on loopback.

Certificates that must not pass (revoked, expired, not yet valid), header and
path tricks, slow clients, private keys others can read, and a scan of every
volume the pipeline writes for data the source wrote in the clear.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from agent.pki import issue_machine, revoke
from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.limits import MiB
from protocol.records import Write
from protocol.sequencing import StreamPosition
from runtime.config import TlsFiles
from runtime.tls import client_context
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.mastertarget.conftest import write_config
from tests.processserver.test_api import Agent, _body, write_ps_config

#: Seconds the slow-client tests configure for both timeouts.
SHORT_TIMEOUT_S = 1.0
#: Longest a test waits for the server to give up on a slow client: the
#: timeout plus generous scheduling slack on a loaded 2-core machine.
GIVE_UP_WITHIN_S = 15.0


def _with_tls_line(config: Path, line: str) -> Path:
    """Add ``line`` to the server's own ``[tls]`` table of a process server config."""
    text = config.read_text()
    anchor = 'processserver.key"\n'
    assert anchor in text
    config.write_text(text.replace(anchor, anchor + line + "\n", 1))
    return config


def _client(pki: Path, machine: str, ca: Path) -> ssl.SSLContext:
    return client_context(
        TlsFiles(
            ca_file=ca,
            cert_file=pki / f"machine-{machine}.pem",
            key_file=pki / f"machine-{machine}.key",
        )
    )


async def _refused(port: int, context: ssl.SSLContext) -> None:
    """The connection fails in the TLS handshake: no HTTP answer, not even a 403."""
    url = f"https://127.0.0.1:{port}/v1/disks/vm01-d0/state"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)):
            async with session.get(url) as response:
                pytest.fail(f"expected a refused handshake, found HTTP {response.status}")


async def test_revoked_expired_and_future_certificates_are_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    shutil.copytree(deployment.pki, pki)
    now = dt.datetime.now(dt.UTC)
    issue_machine(pki, "expired01", now=now - dt.timedelta(days=3), days=1)
    issue_machine(pki, "future01", now=now + dt.timedelta(days=2), days=30)
    done = revoke(pki, pki / "machine-vm01.pem")
    assert done.revoked == 1
    assert revoke(pki, pki / "machine-vm01.pem").revoked == 1  # revoking twice lists it once
    config = _with_tls_line(write_ps_config(deployment, tmp_path), f'crl_file = "{done.crl_file}"')
    ps = await ProcessServer.start(ps_config.load(config), data_port=0, metrics_port=0)
    try:
        for machine in ("vm01", "expired01", "future01"):
            await _refused(ps.port, _client(pki, machine, pki / "ca.pem"))
        # db01 is not revoked: the same CRL lets it through.
        url = f"https://127.0.0.1:{ps.port}/v1/disks/db01-d0/state"
        connector = aiohttp.TCPConnector(ssl=_client(pki, "db01", pki / "ca.pem"))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(url) as response,
        ):
            assert response.status == 200
    finally:
        await ps.close()


def test_revoke_refuses_a_certificate_of_another_ca(deployment: Deployment, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    shutil.copytree(deployment.pki, pki)
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "certs", "revoke", "--dir", str(pki),
         "--cert", str(deployment.other_pki / "machine-ps01.pem")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "expected the CA in" in result.stderr
    assert not (pki / "crl.pem").exists()


async def test_oversized_headers_and_path_like_disk_ids_are_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    ps = await ProcessServer.start(
        ps_config.load(write_ps_config(deployment, tmp_path)), data_port=0, metrics_port=0
    )
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            base = f"https://127.0.0.1:{ps.port}"
            async with session.get(
                f"{base}/v1/disks/vm01-d0/state", headers={"X-Padding": "a" * 70_000}
            ) as response:
                assert response.status in (400, 431)
            for path in (
                "/v1/disks/..%2F..%2Fetc%2Fpasswd/state",
                "/v1/disks/%2e%2e/batches",
                "/v1/disks/vm01-d0%2F..%2Fdb01-d0/state",
                "/v1/disks/%00/state",
            ):
                method = session.post if path.endswith("batches") else session.get
                async with method(base + path, data=b"x") as response:
                    assert response.status in (403, 404), (path, response.status)
            agent = Agent(session, ps.port)
            status, _ = await agent.post("vm01-d0", _body("vm01-d0", 1, [Write(0, b"ok")]))
            assert status == 200  # and the server keeps serving
        outside = [p for p in tmp_path.rglob("*") if "passwd" in p.name or p.name == ".."]
        assert outside == []
    finally:
        await ps.close()


async def test_slow_clients_are_cut_off_and_the_disk_is_freed(
    deployment: Deployment, tmp_path: Path
) -> None:
    config = write_ps_config(deployment, tmp_path)
    with config.open("a") as extra:
        extra.write(
            f"[connections]\nidle_timeout_s = {SHORT_TIMEOUT_S}\n"
            f"body_timeout_s = {SHORT_TIMEOUT_S}\n"
        )
    ps = await ProcessServer.start(ps_config.load(config), data_port=0, metrics_port=0)
    context = deployment.client_tls("vm01")
    try:
        # Headers one byte at a time, never finished: the connection is closed.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", ps.port, ssl=context, server_hostname="localhost"
        )
        started = time.monotonic()
        closed = False
        for byte in b"GET /v1/disks/vm01-d0/state HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
                break
            if time.monotonic() - started > GIVE_UP_WITHIN_S:
                break
        writer.close()
        assert closed, "a client trickling its headers was never cut off"

        # A body that stops halfway: 408 body-timeout, and the disk's lock is freed.
        body = _body("vm01-d0", 1, [Write(0, os.urandom(MiB))])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", ps.port, ssl=context, server_hostname="localhost"
        )
        head = (
            f"POST /v1/disks/vm01-d0/batches HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        writer.write(head + body[: len(body) // 2])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), GIVE_UP_WITHIN_S)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"body-timeout" in answer
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector) as session:
            status, answer_json = await Agent(session, ps.port).post("vm01-d0", body)
            assert (status, answer_json["acked_seq"]) == (200, 1)
    finally:
        await ps.close()


@pytest.mark.parametrize("daemon", ["processserver", "mastertarget"])
def test_a_private_key_others_can_read_is_refused_at_start(
    deployment: Deployment, tmp_path: Path, daemon: str
) -> None:
    pki = tmp_path / "pki"
    shutil.copytree(deployment.pki, pki)
    loose = pki / f"{daemon}.key"
    loose.chmod(0o640)
    if daemon == "processserver":
        config = write_ps_config(deployment, tmp_path)
    else:
        disk = {"id": "d0", "target": tmp_path / "d0.raw", "create": True, "size_bytes": MiB}
        config = write_config(deployment, tmp_path, [disk])
    config.write_text(config.read_text().replace(str(deployment.pki / f"{daemon}.key"), str(loose)))
    result = subprocess.run(
        [sys.executable, "-m", f"{daemon}.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 78, result.stderr  # EX_CONFIG: do not restart in a loop
    assert f"private key {loose} must be readable by its owner only" in result.stderr
    assert "found mode 0640" in result.stderr


async def test_no_volume_holds_what_the_source_wrote_in_the_clear(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The cache, the inbox and the retention journal hold only ciphertext."""
    marker = b"blockrepl-plaintext-marker:" + os.urandom(16).hex().encode()
    size = 4 * MiB
    mt_port = free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    mt_file = write_config(
        deployment, mt_root,
        [{"id": "vm01-d0", "target": mt_root / "vm01-d0.raw", "create": True, "size_bytes": size}],
    )  # fmt: skip
    with mt_file.open("a") as extra:
        extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n')
    ps_root.mkdir()
    ps_file = write_ps_config(deployment, ps_root)
    ps_file.write_text(
        ps_file.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
    )
    # The master target starts later: the marker waits in the process server's cache.
    ps = await ProcessServer.start(ps_config.load(ps_file), data_port=0, metrics_port=0)
    mt: MasterTarget | None = None
    try:
        connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        async with aiohttp.ClientSession(connector=connector) as session:
            agent = Agent(session, ps.port)
            # The marker in every 4 KiB among random bytes: compression keeps it whole.
            secret = b"".join(marker + os.urandom(4096 - len(marker)) for _ in range(256))
            # seq 1 writes the marker; seq 2 overwrites it, so the journal
            # keeps the marker as seq 2's before-image.
            for seq, data in ((1, secret), (2, os.urandom(len(secret)))):
                status, answer = await agent.post(
                    "vm01-d0", _body("vm01-d0", seq, [Write(0, data)])
                )
                assert status == 200, answer
        source = tmp_path / "source"
        source.mkdir()
        (source / "disk.img").write_bytes(secret)
        assert _holding(source, marker) == [source / "disk.img"]  # the scan finds plaintext
        assert _holding(ps_root, marker) == []
        mt = await MasterTarget.start(mt_config.load(mt_file), metrics_port=0)
        await asyncio.wait_for(mt.replicas["vm01-d0"].wait_applied(StreamPosition(1, 2)), 30)
        journal = list((mt_root / "retention").rglob("*"))
        assert any(p.is_file() and p.stat().st_size > MiB // 2 for p in journal)
        assert _holding(ps_root, marker) == []
        assert _holding(mt_root, marker, skip=mt_root / "vm01-d0.raw") == []
    finally:
        await ps.close()
        if mt is not None:
            await mt.close()


def _holding(root: Path, marker: bytes, *, skip: Path | None = None) -> list[Path]:
    """Every file under ``root`` (but ``skip``) whose bytes contain ``marker``."""
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and path != skip and marker in path.read_bytes()
    ]
