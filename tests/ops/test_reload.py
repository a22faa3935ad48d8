"""SIGHUP to the real daemons: what can change while they run changes, what
cannot is logged as waiting for a restart, and a bad config changes nothing."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from agent.pki import init_ca, issue_machine
from protocol.records import Write
from runtime.config import TlsFiles
from runtime.keyfile import write_new_keyring
from runtime.tls import client_context
from tests.conftest import Deployment
from tests.faults.daemons import Daemon
from tests.processserver.test_api import _body

from .running import (
    Ports,
    mt_config_text,
    own_pki,
    ps_config_text,
    scrape,
    start_daemon,
    value,
    wait_log,
    wait_metric,
    wait_ready,
    wait_until,
)

PS = "blockrepl_processserver"
MT = "blockrepl_mastertarget"


def hup(daemon: Daemon) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)


def machine_tls(pki: Path, machine: str) -> ssl.SSLContext:
    return client_context(
        TlsFiles(
            ca_file=pki / "ca.pem",
            cert_file=pki / f"machine-{machine}.pem",
            key_file=pki / f"machine-{machine}.key",
        )
    )


async def get_status(url: str, tls: ssl.SSLContext) -> int:
    connector = aiohttp.TCPConnector(ssl=tls, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as answer:
        return answer.status


async def test_processserver_reloads_marks_and_log_level_and_keeps_the_rest(
    deployment: Deployment, tmp_path: Path
) -> None:
    ports = Ports()
    config = tmp_path / "processserver.toml"
    config.write_text(ps_config_text(deployment, tmp_path, ports))
    ps = start_daemon("processserver.cli", config, tmp_path / "ps.log")
    await wait_ready(ps, ports)
    before = await scrape(ports.metrics_url)
    assert value(before, f"{PS}_cache_high_bytes") == 2**30
    assert value(before, f"{PS}_config_last_reload_success") == 1
    # A cached file that cannot be shipped (no master target listens): each
    # failed attempt is a DEBUG line, not shown at level info.
    base = f"https://127.0.0.1:{ports.data}/v1/disks/vm01-d0"
    connector = aiohttp.TCPConnector(ssl=machine_tls(deployment.pki, "vm01"))
    async with aiohttp.ClientSession(connector=connector) as session:
        body = _body("vm01-d0", 1, [Write(0, b"x" * 4096)])
        async with session.post(f"{base}/batches", data=body) as answer:
            assert answer.status == 200
    await wait_until(
        lambda: _retried(ports.metrics_url), "a failed transfer to the absent master target"
    )
    assert "DEBUG" not in ps.log.read_text()

    moved = Ports(metrics=ports.metrics)  # a new data port: only a restart can bind it
    config.write_text(
        ps_config_text(
            deployment, tmp_path, moved, level="debug", cache_high_bytes=3 * 2**29,
            cache_low_bytes=2**30, zstd_level=3,
        )
    )  # fmt: skip
    hup(ps)
    after = await wait_metric(ports.metrics_url, f"{PS}_config_reloads_total", 1, result="applied")
    assert value(after, f"{PS}_cache_high_bytes") == 3 * 2**29
    assert value(after, f"{PS}_cache_low_bytes") == 2**30
    assert value(after, f"{PS}_config_restart_pending") == 1
    log = await wait_log(ps.log, "port changed: takes effect at the next restart")
    assert "cache_high_bytes changed from 1073741824 to 1610612736: in effect now" in log
    assert "zstd_level changed from 1 to 3: in effect now" in log
    assert "logging.level changed from info to debug: in effect now" in log
    await wait_log(ps.log, "DEBUG blockrepl.processserver.ship: disk vm01-d0: shipping")
    url = f"{base}/state"
    assert await get_status(url, machine_tls(deployment.pki, "vm01")) == 200  # old port serves
    assert ps.stop() == 0


async def _retried(metrics_url: str) -> bool | None:
    retries = value(await scrape(metrics_url), f"{PS}_ship_retries_total", disk="vm01-d0")
    return True if retries else None


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("cache_high_bytes = ", "not valid TOML"),
        ("cache_hihg_bytes = 5", "unknown key cache_hihg_bytes"),
        ("zstd_level = 40", "zstd_level: expected 1..19, found 40"),
    ],
)
async def test_processserver_refuses_a_bad_config_and_keeps_running(
    deployment: Deployment, tmp_path: Path, bad: str, reason: str
) -> None:
    ports = Ports()
    config = tmp_path / "processserver.toml"
    good = ps_config_text(deployment, tmp_path, ports)
    config.write_text(good)
    ps = start_daemon("processserver.cli", config, tmp_path / "ps.log")
    await wait_ready(ps, ports)
    # A valid change and an invalid one together: neither may take effect.
    text = good.replace("cache_high_bytes = 1073741824", "cache_high_bytes = 1610612736")
    config.write_text(bad + "\n" + text)
    hup(ps)
    samples = await wait_metric(
        ports.metrics_url, f"{PS}_config_reloads_total", 1, result="refused"
    )
    assert value(samples, f"{PS}_config_last_reload_success") == 0
    assert value(samples, f"{PS}_cache_high_bytes") == 2**30  # the running value stays
    log = await wait_log(ps.log, "reload refused, the running configuration stays")
    assert reason in log
    url = f"https://127.0.0.1:{ports.data}/v1/disks/vm01-d0/state"
    assert await get_status(url, machine_tls(deployment.pki, "vm01")) == 200

    config.write_text(text)  # fixed: the next reload applies it
    hup(ps)
    samples = await wait_metric(
        ports.metrics_url, f"{PS}_config_reloads_total", 1, result="applied"
    )
    assert value(samples, f"{PS}_config_last_reload_success") == 1
    assert value(samples, f"{PS}_cache_high_bytes") == 1610612736
    assert ps.stop() == 0


async def _http_on(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str) -> bytes:
    """One keep-alive HTTP/1.1 GET on an open connection; the status line."""
    reader, writer = stream
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, rest = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(rest)
    await reader.readexactly(length)
    return status.strip()


async def test_processserver_takes_new_certificates_on_reload(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A CA rotation: the files are replaced under the same names and SIGHUP sent.

    New connections see the new server certificate and need a client of the
    new CA; a connection opened before keeps working; a key that does not
    match its certificate is refused and the certificates in use stay.
    """
    ports = Ports()
    pki = own_pki(deployment, tmp_path)
    config = tmp_path / "processserver.toml"
    config.write_text(ps_config_text(deployment, tmp_path, ports, pki=pki))
    ps = start_daemon("processserver.cli", config, tmp_path / "ps.log")
    await wait_ready(ps, ports)
    path = "/v1/disks/vm01-d0/state"
    url = f"https://127.0.0.1:{ports.data}{path}"
    before = await asyncio.open_connection(
        "127.0.0.1", ports.data, ssl=machine_tls(pki, "vm01"), server_hostname="127.0.0.1"
    )
    assert await _http_on(before, path) == b"HTTP/1.1 200 OK"
    expiry = f"{PS}_tls_certificate_expiry_timestamp_seconds"
    old_expiry = value(await scrape(ports.metrics_url), expiry, role="server")

    new_pki = tmp_path / "new-pki"
    init_ca(new_pki)
    issue_machine(new_pki, "vm01", days=30)
    issue_machine(new_pki, "ps01", days=30)
    for name in ("ca.pem", "processserver.pem", "processserver.key"):
        (pki / name).write_bytes((new_pki / name).read_bytes())
    for name in ("machine-ps01.pem", "machine-ps01.key"):
        (pki / name).write_bytes((new_pki / name).read_bytes())
    hup(ps)
    samples = await wait_metric(
        ports.metrics_url, f"{PS}_config_reloads_total", 1, result="applied"
    )
    new_cert = x509.load_pem_x509_certificate((new_pki / "processserver.pem").read_bytes())
    assert value(samples, expiry, role="server") == new_cert.not_valid_after_utc.timestamp()
    assert value(samples, expiry, role="server") != old_expiry
    client_cert = x509.load_pem_x509_certificate((new_pki / "machine-ps01.pem").read_bytes())
    assert value(samples, expiry, role="client") == client_cert.not_valid_after_utc.timestamp()
    await wait_log(ps.log, f"server certificate {pki / 'processserver.pem'} is new")

    assert await get_status(url, machine_tls(new_pki, "vm01")) == 200
    with pytest.raises(aiohttp.ClientError):  # the old CA's client, and the old server cert
        await get_status(url, machine_tls(deployment.pki, "vm01"))
    assert await _http_on(before, path) == b"HTTP/1.1 200 OK"  # opened before: still served
    before[1].close()

    (pki / "processserver.key").write_bytes((deployment.pki / "processserver.key").read_bytes())
    hup(ps)
    await wait_metric(ports.metrics_url, f"{PS}_config_reloads_total", 1, result="refused")
    log = await wait_log(ps.log, "reload refused")
    assert f"private key {pki / 'processserver.key'} does not match certificate" in log
    assert await get_status(url, machine_tls(new_pki, "vm01")) == 200  # still the new cert
    assert ps.stop() == 0


async def test_mastertarget_reloads_quota_rpo_window_and_clients(
    deployment: Deployment, tmp_path: Path
) -> None:
    ports = Ports()
    config = tmp_path / "mastertarget.toml"
    key_file = tmp_path / "data-keys.toml"
    shutil.copy2(deployment.key_file, key_file)
    config.write_text(mt_config_text(deployment, tmp_path, ports, key_file=key_file))
    mt = start_daemon("mastertarget.cli", config, tmp_path / "mt.log")
    await wait_ready(mt, ports)
    before = await scrape(ports.metrics_url)
    assert value(before, f"{MT}_rpo_threshold_seconds") == 900
    url = f"https://127.0.0.1:{ports.data}/v1/disks/vm01-d0/state"
    assert await get_status(url, machine_tls(deployment.pki, "intruder")) == 403

    config.write_text(
        mt_config_text(
            deployment, tmp_path, Ports(metrics=ports.metrics), level="debug",
            process_servers=("ps01", "intruder"), retention={"window_s": 7200},
            inbox_quota_bytes=2**30, rpo_threshold_s=300, size_bytes=2**21, key_file=key_file,
        )
    )  # fmt: skip
    write_new_keyring(tmp_path / "rotated.toml")  # a rotation: new content, same name
    key_file.write_bytes((tmp_path / "rotated.toml").read_bytes())
    hup(mt)
    after = await wait_metric(ports.metrics_url, f"{MT}_config_reloads_total", 1, result="applied")
    assert value(after, f"{MT}_rpo_threshold_seconds") == 300
    assert value(after, f"{MT}_inbox_quota_bytes") == 2**30
    assert value(after, f"{MT}_retention_window_target_seconds") == 7200
    assert value(after, f"{MT}_config_restart_pending") == 1
    assert await get_status(url, machine_tls(deployment.pki, "intruder")) == 200
    log = await wait_log(mt.log, "listen.port changed: takes effect at the next restart")
    assert "disks changed: takes effect at the next restart" in log
    assert f"the content of key_file {key_file} changed: takes effect at the next" in log
    assert "rpo_threshold_s changed from 900.0 to 300.0: in effect now" in log
    assert await get_status(url, machine_tls(deployment.pki, "ps01")) == 200  # old port serves

    config.write_text(config.read_text().replace("window_s = 7200", "window_s = -1"))
    hup(mt)
    samples = await wait_metric(
        ports.metrics_url, f"{MT}_config_reloads_total", 1, result="refused"
    )
    assert value(samples, f"{MT}_retention_window_target_seconds") == 7200
    log = await wait_log(mt.log, "reload refused")
    assert "retention.window_s: expected seconds > 0, found -1" in log
    assert mt.stop() == 0
