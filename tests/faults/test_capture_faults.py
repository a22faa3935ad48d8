"""Live capture under faults, with real daemons on loopback and qemu-io writing
through nbdkit:

- kill -9 of the agent while writes stream: nbdkit goes with it, and the
  next start resyncs the dirty regions only — bounded by them, not the disk;
- a journal that fills while the master target is out of reach: writes go
  on, only marked dirty, then resynced — never lost;
- SIGTERM with writes in flight: they finish, the stop is clean, and the
  next start needs no resync;
- a process server on a newer generation: a new generation, the whole disk
  compared;
- a journal lost between two runs: a new generation, the dirty regions only;
- a journal behind the process server with nothing dirty: a new generation
  that marks no region still ends its resync window, by a pass over none;
- FUA and flush: answered only once the source holds the writes (a power
  cut right after would keep them).

Each ends with ``qemu-img compare`` of the source and the master target's disk.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.state import AgentState, StreamRecord
from protocol.limits import KiB, MiB
from tests.conftest import Deployment, require_binary, require_root
from tests.e2e.capture import (
    CaptureProcess,
    require_capture_peers,
)
from tests.e2e.conftest import BLOCKREPL, DISK, Site, build_site, make_source, start
from tests.faults.daemons import loop_volume_wrapper
from tests.faults.pausable_proxy import PausableProxy

SIZE = 64 * MiB
REGION = MiB  # the dirty map's region for a disk this small
#: The regions the writes of a test touch: 10 .. 19.
WRITTEN = range(10, 20)
WAIT_S = 60.0
#: The Python that has Debian's python3-libnbd (nbdsh's module).
DEBIAN_PYTHON = "/usr/bin/python3"


@pytest.fixture
async def proxy() -> AsyncIterator[PausableProxy]:
    """A proxy between the process server and the master target, to stop shipping."""
    proxy = PausableProxy(0)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def _site(
    deployment: Deployment, tmp_path: Path, proxy: PausableProxy, **capture: object
) -> tuple[Site, CaptureProcess]:
    """A site whose shipping goes through ``proxy``, and a settled capture of a full disk."""
    require_capture_peers()
    site = build_site(
        deployment, tmp_path, size=SIZE, sync={"region_bytes": 8 * MiB},
        mt_url_of={0: f"https://127.0.0.1:{proxy.port}"},
        agent_tables={"capture": capture} if capture else None,
    )  # fmt: skip
    proxy.target_port = site.mt_port
    source = tmp_path / "source.raw"
    make_source(source, SIZE, [(0, random.Random(23).randbytes(SIZE))])
    await asyncio.to_thread(start, site)
    capture_process = CaptureProcess(site, source)
    await asyncio.to_thread(capture_process.start)
    await asyncio.to_thread(capture_process.settle)
    await asyncio.to_thread(capture_process.wait_clean)
    return site, capture_process


def _writes(
    seed: int, count: int, sizes: tuple[int, ...] = (4 * KiB, 64 * KiB, 128 * KiB)
) -> list[str]:
    """qemu-io writes of ``sizes`` inside the regions of :data:`WRITTEN` only."""
    rng = random.Random(seed)
    commands = []
    for _ in range(count):
        length = rng.choice(sizes)
        offset = rng.randrange(WRITTEN.start * REGION, WRITTEN.stop * REGION - length, 4096)
        commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
    return commands


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def _until(what: str, check: object) -> None:
    assert callable(check)
    deadline = time.monotonic() + WAIT_S
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"not {what} after {WAIT_S} s"
        await asyncio.sleep(0.05)


async def test_kill_9_mid_stream_resyncs_only_the_dirty_regions(
    deployment: Deployment, tmp_path: Path, proxy: PausableProxy
) -> None:
    site, capture = await _site(deployment, tmp_path, proxy)
    proxy.pause()  # batches stay unshipped: the journal and the map hold them
    writer = capture.qemu_io_background(*_writes(1, 400))
    await asyncio.to_thread(
        capture.wait_status, "writing", lambda s: s["stats"]["journaled_requests"] >= 40
    )
    capture.kill()
    output, _ = await asyncio.to_thread(writer.communicate, timeout=60)
    assert output.count("wrote ") < 400, "the kill came after the last write"
    await _until("nbdkit went with the agent", lambda: _port_closed(capture.port))
    dirty = capture.dirty_regions()
    assert dirty, "no region was dirty"
    assert set(dirty) <= set(WRITTEN), dirty
    assert list((site.state_dir / "journal" / DISK).iterdir()), "nothing was left to resend"

    await asyncio.to_thread(capture.start)
    restarted = capture.status()
    assert restarted["pending_regions"] + restarted["resyncing_regions"] == len(dirty)
    assert restarted["window_open"] is True
    proxy.resume()
    settled = await asyncio.to_thread(capture.settle)
    stats = settled["stats"]
    # Only the dirty regions were compared, not the 64 MiB disk.
    assert stats["resync_regions"] == len(dirty)
    assert 0 < stats["resync_compared_bytes"] <= len(dirty) * REGION
    site.assert_identical(capture.source)
    assert site.mt_state()["resync_open"] is False


async def test_a_full_journal_turns_into_a_resync_not_a_loss(
    deployment: Deployment, tmp_path: Path, proxy: PausableProxy
) -> None:
    site, capture = await _site(deployment, tmp_path, proxy, journal_max_bytes=16 * MiB)
    before = capture.status()["stats"]
    assert before["overflows"] == 0
    proxy.pause()  # the master target is out of reach: nothing leaves the journal
    # 32 MiB of writes into a journal of 16 MiB: they all complete, none waits.
    writes = _writes(2, 256, sizes=(128 * KiB,))
    await asyncio.wait_for(asyncio.to_thread(capture.qemu_io, *writes), WAIT_S)
    full = capture.status()
    assert full["mode"] == "overflow"
    assert full["stats"]["overflows"] == 1
    assert full["stats"]["dirty_requests"] > 0
    assert full["window_open"] is True
    assert full["journal_bytes"] >= 16 * MiB
    assert set(capture.dirty_regions()) <= set(WRITTEN)
    proxy.resume()
    settled = (await asyncio.to_thread(capture.settle))["stats"]
    assert settled["resync_passes"] > before["resync_passes"]
    resynced = settled["resync_compared_bytes"] - before["resync_compared_bytes"]
    assert 0 < resynced <= len(WRITTEN) * REGION
    site.assert_identical(capture.source)
    assert site.mt_state()["resync_open"] is False


async def test_sigterm_finishes_writes_in_flight_and_the_next_start_needs_no_resync(
    deployment: Deployment, tmp_path: Path, proxy: PausableProxy
) -> None:
    site, capture = await _site(deployment, tmp_path, proxy)
    proxy.pause()
    writer = capture.qemu_io_background(*_writes(3, 400))
    await asyncio.to_thread(
        capture.wait_status, "writing", lambda s: s["stats"]["journaled_requests"] >= 40
    )
    status, report = await asyncio.to_thread(capture.stop)
    await asyncio.to_thread(writer.communicate, timeout=60)
    assert status == 0
    assert report["clean_stop"] is True
    assert report["stats"]["dirty_requests"] == 0
    assert report["end_seq"] > report["shipped_seq"]  # stopped with the journal still full
    assert (site.state_dir / "capture" / f"{DISK}.clean").exists()

    await asyncio.to_thread(capture.start)
    restarted = capture.status()
    assert (restarted["pending_regions"], restarted["resyncing_regions"]) == (0, 0)
    assert restarted["window_open"] is False
    assert not (site.state_dir / "capture" / f"{DISK}.clean").exists()
    proxy.resume()
    settled = await asyncio.to_thread(capture.settle)
    assert settled["stats"]["resync_passes"] == 0
    await asyncio.to_thread(capture.wait_clean)
    site.assert_identical(capture.source)


async def test_a_newer_generation_at_the_process_server_compares_the_whole_disk(
    deployment: Deployment, tmp_path: Path, proxy: PausableProxy
) -> None:
    site, capture = await _site(deployment, tmp_path, proxy)
    before = capture.status()
    # Another agent (a restored backup, a second machine) started generation 7.
    _post_generation(site, 7)
    await asyncio.to_thread(capture.qemu_io, *_writes(4, 20))
    settled = await asyncio.to_thread(
        capture.wait_status, "on a new generation", lambda s: s["generation"] == 8
    )
    settled = await asyncio.to_thread(capture.settle)
    assert settled["stats"]["generations_started"] == before["stats"]["generations_started"] + 1
    assert (
        settled["stats"]["resync_compared_bytes"] - before["stats"]["resync_compared_bytes"] == SIZE
    )
    site.assert_identical(capture.source)
    assert site.mt_state()["applied_generation"] == 8


async def test_a_journal_lost_between_runs_resyncs_the_dirty_regions(
    deployment: Deployment, tmp_path: Path, proxy: PausableProxy
) -> None:
    site, capture = await _site(deployment, tmp_path, proxy)
    proxy.pause()
    await asyncio.to_thread(capture.qemu_io, *_writes(5, 100))
    await _until("acknowledged by the process server", lambda: _ps_acked(site) > 0)
    capture.kill()
    dirty = capture.dirty_regions()
    assert dirty
    shutil.rmtree(site.state_dir / "journal" / DISK)

    await asyncio.to_thread(capture.start)
    proxy.resume()
    settled = await asyncio.to_thread(
        capture.wait_status, "on a new generation", lambda s: s["generation"] == 2
    )
    settled = await asyncio.to_thread(capture.settle)
    assert 0 < settled["stats"]["resync_compared_bytes"] <= len(dirty) * REGION
    site.assert_identical(capture.source)


async def test_a_new_generation_with_nothing_to_resync_still_ends_its_window(
    deployment: Deployment, tmp_path: Path, proxy: PausableProxy
) -> None:
    """The agent's database comes back from a backup taken before the last writes, after
    a kill: the process server holds seqs the journal never reaches. Every write is at
    the master target and no region is dirty, so the new generation has nothing to
    resync — yet its window opened, and only a pass's RESYNC_END closes it: a pass over
    no region. Until then every tag is inconsistent and no stop is clean."""
    site, capture = await _site(deployment, tmp_path, proxy)
    backup = capture.status()
    await asyncio.to_thread(capture.qemu_io, *_writes(6, 20))
    await asyncio.to_thread(capture.settle)
    await asyncio.to_thread(capture.wait_clean)
    capture.kill()
    await _until("nbdkit went with the agent", lambda: _port_closed(capture.port))
    assert capture.dirty_regions() == []
    state = AgentState(site.state_dir)
    try:
        state.put_stream(DISK, StreamRecord(backup["generation"], backup["shipped_seq"]))
    finally:
        state.close()

    await asyncio.to_thread(capture.start)
    renewed = await asyncio.to_thread(
        capture.wait_status, "on a new generation",
        lambda s: s["generation"] == backup["generation"] + 1,
    )  # fmt: skip
    assert (renewed["pending_regions"], renewed["resyncing_regions"]) == (0, 0)
    await asyncio.to_thread(capture.qemu_io, *_writes(7, 20))
    settled = await asyncio.to_thread(capture.settle)
    stats = settled["stats"]
    assert stats["generations_started"] == 1
    assert stats["resync_passes"] >= 1
    assert (stats["resync_regions"], stats["resync_compared_bytes"]) == (0, 0)
    assert site.mt_state()["resync_open"] is False
    tag = await asyncio.to_thread(_tag, site, "after-the-new-generation")
    assert [d["consistent"] for d in tag["disks"]] == [True]
    settled = await asyncio.to_thread(capture.settle)
    assert "after-the-new-generation" in [p["name"] for p in site.points()]
    site.assert_identical(capture.source)
    status, report = await asyncio.to_thread(capture.stop)
    assert (status, report["clean_stop"]) == (0, True)
    print(
        f"\ngeneration {renewed['generation']}: {stats['resync_passes']} passes over "
        f"{stats['resync_regions']} regions, {stats['resync_compared_bytes']} bytes compared, "
        f"{stats['resync_data_bytes'] + stats['resync_zero_bytes']} bytes sent to end the window"
    )


def _tag(site: Site, name: str) -> dict[str, Any]:
    """``blockrepl agent tag``: its JSON report."""
    result = subprocess.run(
        [str(BLOCKREPL), "agent", "tag", "--config", str(site.agent_config), "--json",
         "--name", name],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _post_generation(site: Site, generation: int) -> None:
    context: ssl.SSLContext = site.deployment.client_tls("vm01")
    request = urllib.request.Request(
        f"https://127.0.0.1:{site.ps_ports[0]}/v1/disks/{DISK}/generation",
        data=json.dumps({"generation": generation}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, context=context, timeout=10) as answer:
        assert answer.status == 200


def _ps_acked(site: Site) -> int:
    state = site.ps_state()
    return int(state["acked_seq"]) - int(state["shipped_seq"])


def test_fua_and_flush_make_writes_durable_on_the_source(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The source on an ext4 volume in an image, loop-mounted with timed commits
    off (tests/faults/daemons.py): the image holds a write only once the plugin
    synced the source. Writes are made by nbdsh, which never flushes unless told."""
    require_root("the source sits on a loop-mounted ext4 volume in a private mount namespace")
    require_capture_peers()
    require_binary("nbdsh")
    mkfs = require_binary("mkfs.ext4")
    size = 16 * MiB
    content = tmp_path / "content"
    content.mkdir()
    (content / "source.raw").write_bytes(random.Random(29).randbytes(size))
    image, mount = tmp_path / "volume.img", tmp_path / "mnt"
    mount.mkdir()
    subprocess.run([mkfs, "-q", "-F", "-d", str(content), str(image), "64M"], check=True)
    site = build_site(deployment, tmp_path / "site", size=size, sync={"region_bytes": 4 * MiB})
    capture = CaptureProcess(site, mount / "source.raw", wrapper=loop_volume_wrapper(image, mount))
    start(site)
    capture.start()
    capture.settle()

    def client(code: str) -> None:
        # nbdsh is `python3 -m nbd`, with Debian's python3-libnbd.
        command = [DEBIAN_PYTHON, "-m", "nbd", "-u", capture.url, "-c", code]
        subprocess.run(command, check=True, timeout=60)

    def on_the_device(byte: int) -> bool:
        return bytes([byte]) * 4096 in image.read_bytes()

    client("h.pwrite(b'\\x5a' * 4096, 1 << 20)")
    assert not on_the_device(0x5A), "a plain write reached the device: the test proves nothing"
    client("h.pwrite(b'\\xa5' * 4096, 2 << 20, nbd.CMD_FLAG_FUA)")
    assert on_the_device(0xA5), "a FUA write was answered before it was durable"
    client("h.pwrite(b'\\x3c' * 4096, 3 << 20)")
    assert not on_the_device(0x3C)
    client("h.flush()")
    assert on_the_device(0x3C), "a flush was answered before the writes were durable"
    capture.settle()
    assert capture.proc is not None
    inside = Path(f"/proc/{capture.proc.pid}/root") / mount.relative_to("/") / "source.raw"
    site.assert_identical(inside)
