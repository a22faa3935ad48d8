"""Raw targets (files and block devices) and the range checks every back-end shares."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mastertarget.disks import create_disk, open_disk
from mastertarget.disks.base import TargetDisk
from mastertarget.disks.raw import RawDisk
from mastertarget.errors import DiskIOError, DiskRangeError
from tests.mastertarget.disks.tools import KIB, MIB, Model, assert_same, random_ops, run_workload

SIZE = 8 * MIB


@pytest.fixture(params=["raw", "vmdk-sparse", "vmdk-flat"])
def any_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TargetDisk]:
    fmt = request.param
    disk = create_disk(tmp_path / ("disk.img" if fmt == "raw" else "disk.vmdk"), fmt, SIZE)
    yield disk
    disk.close()


BAD_RANGES = [(-1, 1), (SIZE, 1), (SIZE - 1, 2), (0, SIZE + 1), (0, -1), (SIZE + 4096, 0)]


@pytest.mark.parametrize(("offset", "length"), BAD_RANGES)
def test_ranges_outside_the_disk_are_refused(
    any_disk: TargetDisk, offset: int, length: int
) -> None:
    expected = f"disk size {SIZE} bytes.*offset {offset} length {length}"
    with pytest.raises(DiskRangeError, match=expected):
        any_disk.read(offset, length)
    with pytest.raises(DiskRangeError, match=expected):
        any_disk.zero(offset, length)
    if length >= 0:
        with pytest.raises(DiskRangeError, match=expected):
            any_disk.write(offset, b"x" * length)
        with pytest.raises(DiskRangeError, match=expected):
            any_disk.read_into(offset, memoryview(bytearray(length)))
    # A refused range changes nothing and leaves the disk usable.
    any_disk.write(SIZE - 3, b"end")
    any_disk.flush()
    assert any_disk.read(SIZE - 4, 4) == b"\0end"
    assert any_disk.read(SIZE, 0) == b""


def test_zero_punches_a_hole_in_a_raw_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    disk = create_disk(path, "raw", SIZE)
    disk.write(0, random.Random(3).randbytes(SIZE))
    disk.flush()
    used = path.stat().st_blocks
    disk.zero(1000, SIZE - 2000)
    disk.flush()
    assert disk.read(0, SIZE).count(0) >= SIZE - 2000
    assert path.stat().st_blocks < used // 2
    assert path.stat().st_size == SIZE
    disk.close()


def test_a_failed_write_makes_a_raw_disk_refuse_further_changes(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    disk = create_disk(path, "raw", SIZE)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MIB, hard))  # SIGXFSZ is ignored: EFBIG
    try:
        with pytest.raises(DiskIOError) as failed:
            disk.write(2 * MIB, b"x" * 512)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.value.errno == errno.EFBIG
    assert f"write of 512 bytes at offset {2 * MIB} of {path}" in failed.value.message
    assert "EFBIG" in failed.value.message
    with pytest.raises(DiskIOError, match="unusable after an earlier failure"):
        disk.flush()
    assert disk.read(0, 4) == bytes(4)  # reading still works
    disk.close()


@contextlib.contextmanager
def _loop_device(backing: Path) -> Iterator[Path]:
    losetup = shutil.which("losetup")
    if os.geteuid() != 0 or losetup is None:
        pytest.skip("block-device tests need root and losetup")
    attach = subprocess.run(
        [losetup, "--find", "--show", str(backing)],
        capture_output=True,
        text=True,
        check=False,
    )
    if attach.returncode != 0:
        pytest.skip(f"no loop device available here: {attach.stderr.strip()}")
    device = Path(attach.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run([losetup, "--detach", str(device)], check=True)


def test_block_device_target(tmp_path: Path) -> None:
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"\xff" * SIZE)  # BLKZEROOUT must really write zeros
    rng = random.Random(9)
    model = Model(tmp_path / "model.raw", SIZE)
    model.write(0, b"\xff" * SIZE)
    with _loop_device(backing) as device:
        disk = open_disk(device, "raw")
        assert isinstance(disk, RawDisk)
        assert disk.is_block_device
        assert disk.size == SIZE
        # O_EXCL: a second exclusive opener (or a mount) is refused.
        with pytest.raises(DiskIOError, match="Device or resource busy"):
            open_disk(device, "raw")
        run_workload(disk, model, random_ops(rng, SIZE, [0, SIZE // 2, SIZE], 150), rng)
        disk.zero(3 * MIB + 7, 2 * MIB + 1000)  # unaligned edges around BLKZEROOUT
        model.zero(3 * MIB + 7, 2 * MIB + 1000)
        disk.flush()
        assert disk.read(3 * MIB, MIB) == model.read(3 * MIB, MIB)
        disk.close()
    assert_same(backing, "raw", model.path)


def test_buffers_as_the_applier_passes_them(tmp_path: Path) -> None:
    """Memoryviews and bytearrays are accepted as they come from the applier."""
    disk = create_disk(tmp_path / "disk.img", "raw", SIZE)
    data = bytearray(random.Random(4).randbytes(64 * KIB))
    disk.write(100, memoryview(data)[10:])
    disk.write(200_000, data)
    assert disk.read(100, 64 * KIB - 10) == bytes(data[10:])
    assert disk.read(200_000, 64 * KIB) == bytes(data)
    disk.close()
