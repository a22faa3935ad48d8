"""``blockrepl agent capture`` against a real process server and master target,
with real NBD clients (qemu-io, nbdcopy, qemu-img, and a kernel file system
through nbdfuse and a loop device) writing through nbdkit and the capture
plugin; every test ends with ``qemu-img compare`` of the source and the
master target's disk."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from protocol.limits import KiB, MiB
from tests.conftest import Deployment, require_binary, require_root
from tests.e2e.capture import (
    CaptureProcess,
    random_writes,
    require_capture_peers,
)
from tests.e2e.conftest import Site, build_site, make_source, start

SYNC = {"region_bytes": 8 * MiB}
#: Seconds nbdfuse may take to show the export as a file.
NBDFUSE_START_S = 30.0


def _site(deployment: Deployment, tmp_path: Path, size: int) -> Site:
    return build_site(deployment, tmp_path, size=size, sync=SYNC)


async def test_random_writes_while_the_initial_sync_runs_end_identical(
    deployment: Deployment, tmp_path: Path
) -> None:
    require_capture_peers()
    size = 128 * MiB
    site = _site(deployment, tmp_path, size)
    source = tmp_path / "source.raw"
    rng = random.Random(3)
    # Data everywhere: the initial sync sends the whole disk, which takes a while.
    make_source(source, size, [(0, rng.randbytes(size))])
    start(site)
    capture = CaptureProcess(site, source)
    capture.start()
    # A new disk's first generation starts just after the export listens;
    # writes before it are only marked dirty (the whole disk is compared anyway).
    capture.wait_status("streaming", lambda s: s["generation"] is not None)
    writer = capture.qemu_io_background(*random_writes(rng, size, 200, zeros_every=10))
    # Writes were answered while the initial sync (the window it opens) went on:
    # seen in the status, or, if the pass ended between two looks, in the pieces
    # the pass read again because a live write had changed them since it read them.
    seen = capture.wait_status("written to", lambda s: s["stats"]["journaled_requests"] >= 10)
    assert writer.wait(timeout=300) == 0, writer.communicate()
    settled = capture.settle()
    assert seen["window_open"] or settled["stats"]["resync_refreshed"] >= 1, (seen, settled)
    assert settled["stats"]["write_requests"] == 180
    assert settled["stats"]["zero_requests"] == 20
    assert settled["stats"]["dirty_requests"] == 0
    assert settled["stats"]["resync_passes"] >= 1
    site.assert_identical(source)
    assert site.mt_state()["resync_open"] is False
    status, report = capture.stop()
    assert status == 0
    assert report["clean_stop"] is True


async def test_zero_trim_and_extents_are_used_by_clients(
    deployment: Deployment, tmp_path: Path
) -> None:
    require_capture_peers()
    nbdinfo = require_binary("nbdinfo")
    size = 32 * MiB
    site = _site(deployment, tmp_path, size)
    source = tmp_path / "source.raw"
    make_source(source, size, [(0, random.Random(5).randbytes(16 * MiB))])
    start(site)
    capture = CaptureProcess(site, source)
    capture.start()
    before = capture.settle()["stats"]
    capture.qemu_io("write -z 1M 4M", "write -z -u 6M 2M", "discard 12M 1M", "write -P 7 20M 64k")
    after = capture.settle()["stats"]
    # The zero and trim callbacks ran (not writes of zeros), and travel as ZERO records.
    assert after["zero_requests"] - before["zero_requests"] == 2
    assert after["trim_requests"] - before["trim_requests"] == 1
    assert after["write_requests"] - before["write_requests"] == 1
    assert after["zero_bytes"] - before["zero_bytes"] == 7 * MiB
    assert after["data_bytes"] - before["data_bytes"] == 64 * KiB
    # The extents callback: the trimmed and the zeroed-with-unmap ranges are holes.
    mapped = subprocess.run(
        [nbdinfo, "--map", "--json", capture.url], capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    holes = [
        (extent["offset"], extent["length"])
        for extent in json.loads(mapped.stdout)
        if extent["type"] & 1
    ]
    assert any(o <= 6 * MiB and o + n >= 8 * MiB for o, n in holes), holes
    assert any(o <= 12 * MiB and o + n >= 13 * MiB for o, n in holes), holes
    assert not any(o < 16 * MiB and o + n > 16 * MiB - 1 for o, n in holes if o < 1 * MiB), holes
    site.assert_identical(source)


async def test_nbdcopy_and_qemu_img_convert_through_capture_end_identical(
    deployment: Deployment, tmp_path: Path
) -> None:
    require_capture_peers()
    nbdcopy = require_binary("nbdcopy")
    qemu_img = require_binary("qemu-img")
    size = 64 * MiB
    site = _site(deployment, tmp_path, size)
    source = tmp_path / "source.raw"
    rng = random.Random(9)
    make_source(source, size, [(0, rng.randbytes(size))])
    start(site)
    capture = CaptureProcess(site, source)
    capture.start()
    before = capture.settle()["stats"]
    # A sparse image: nbdcopy zeroes its holes rather than writing zeros.
    image = tmp_path / "image.raw"
    make_source(image, size, [(3 * MiB, rng.randbytes(5 * MiB)), (40 * MiB, rng.randbytes(MiB))])
    subprocess.run([nbdcopy, str(image), capture.url], check=True, timeout=120)
    copied = capture.settle()["stats"]
    assert copied["zero_requests"] > before["zero_requests"]
    assert copied["data_bytes"] - before["data_bytes"] <= 6 * MiB + 64 * KiB
    site.assert_identical(source)
    subprocess.run([require_binary("qemu-img"), "compare", str(image), str(source)], check=True)
    # qemu-img convert -n onto the export: another client, another image.
    other = tmp_path / "other.raw"
    make_source(other, size, [(0, rng.randbytes(2 * MiB)), (50 * MiB, rng.randbytes(3 * MiB))])
    subprocess.run(
        [qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(other), capture.url],
        check=True, timeout=120,
    )  # fmt: skip
    capture.settle()
    site.assert_identical(source)
    subprocess.run([qemu_img, "compare", str(other), str(source)], check=True)


async def test_a_capture_after_a_finished_sync_starts_clean(
    deployment: Deployment, tmp_path: Path
) -> None:
    require_capture_peers()
    size = 32 * MiB
    site = _site(deployment, tmp_path, size)
    source = tmp_path / "source.raw"
    rng = random.Random(13)
    make_source(source, size, [(0, rng.randbytes(size))])
    start(site)
    synced = site.sync(source)
    capture = CaptureProcess(site, source)
    capture.start()
    first = capture.status()
    # The sync left a clean dirty map: nothing to compare again.
    assert (first["pending_regions"], first["resyncing_regions"]) == (0, 0)
    assert first["window_open"] is False
    assert first["generation"] == synced["generation"]
    capture.qemu_io(*random_writes(rng, size, 30))
    settled = capture.settle()
    assert settled["stats"]["resync_passes"] == 0
    site.assert_identical(source)


async def test_an_ext4_volume_used_through_nbdfuse_and_a_loop_device_replicates(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A Linux data disk used through the export as docs/operations.md shows:
    nbdfuse makes the export a file, a loop device makes that a block device,
    and ext4 is made, mounted, written with fsyncs and unmounted on it. The
    master target's copy is the source, and a clean ext4 volume."""
    require_root("a loop device and a FUSE mount")
    require_capture_peers()
    nbdfuse, losetup = require_binary("nbdfuse"), require_binary("losetup")
    mkfs, e2fsck = require_binary("mkfs.ext4"), require_binary("e2fsck")
    size = 64 * MiB
    site = _site(deployment, tmp_path, size)
    source = tmp_path / "source.raw"
    make_source(source, size, [])
    start(site)
    capture = CaptureProcess(site, source)
    capture.start()
    capture.settle()
    exported, mount = tmp_path / "fuse", tmp_path / "mnt"
    exported.mkdir()
    mount.mkdir()
    fuse = subprocess.Popen([nbdfuse, str(exported / "disk"), capture.url])
    loop = ""
    try:
        deadline = time.monotonic() + NBDFUSE_START_S
        while not (exported / "disk").exists():
            assert fuse.poll() is None, "nbdfuse ended"
            assert time.monotonic() < deadline, "nbdfuse did not show the export"
            time.sleep(0.05)
        loop = subprocess.run(
            [losetup, "--find", "--show", str(exported / "disk")],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
        subprocess.run([mkfs, "-q", loop], check=True, timeout=120)
        subprocess.run(["mount", loop, str(mount)], check=True, timeout=60)
        rng = random.Random(17)
        for index in range(20):
            with (mount / f"f{index}").open("wb") as file:
                file.write(rng.randbytes(rng.randrange(1, 512 * KiB)))
                file.flush()
                os.fsync(file.fileno())  # as a database commits
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=60)
        if loop:
            subprocess.run([losetup, "--detach", loop], check=False, timeout=60)
        subprocess.run(["umount", str(exported)], check=False, timeout=60)  # nbdfuse exits
        fuse.wait(timeout=60)
    settled = capture.settle()
    assert settled["stats"]["write_requests"] >= 20
    site.assert_identical(source)
    checked = subprocess.run(
        [e2fsck, "-fn", str(site.target)], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
