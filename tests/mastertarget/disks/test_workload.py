"""Every back-end against a raw model under a random workload, judged by qemu-img.

For each kind of target (made by qemu-img and by create_disk), the same seeded
workload of unaligned writes and zeros is applied to the target and to a raw
model file; afterwards ``qemu-img compare`` must find them identical and
``qemu-img check`` must find nothing wrong. Disks are small and workloads
bounded so the whole module runs in seconds.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mastertarget.disks import create_disk, open_disk
from mastertarget.disks.base import TargetDisk
from mastertarget.disks.vmdk import VmdkDisk
from tests.mastertarget.disks.tools import (
    GIB,
    MIB,
    Model,
    assert_checks,
    assert_same,
    qemu_img,
    qemu_io,
    random_ops,
    run_workload,
)

#: 40 MiB and three sectors: two grain tables (32 MiB each at 64 KiB grains),
#: the second one partial, and a last grain that is partial too.
SIZE = 40 * MIB + 1536
#: Split kinds need more than one 2 GiB extent; their files stay sparse.
SPLIT_SIZE = 4 * GIB + 3 * MIB


@dataclass(frozen=True)
class Target:
    """A target disk file, how qemu reads it, and where its boundaries are."""

    name: str
    path: Path
    fmt: str
    size: int
    hot_spots: list[int]


def _qemu_vmdk(tmp_path: Path, size: int, subformat: str) -> Path:
    path = tmp_path / "disk.vmdk"
    result = qemu_img("create", "-f", "vmdk", "-o", f"subformat={subformat}", path, str(size))
    assert result.returncode == 0, result.stderr
    return path


def _ours(fmt: str) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / ("disk.raw" if fmt == "raw" else "disk.vmdk")
        create_disk(path, fmt, SIZE).close()  # type: ignore[arg-type]
        return path

    return make


def _without_tables(tmp_path: Path) -> Path:
    """A monolithicSparse file whose directories are empty: every table is allocated on demand."""
    path = _qemu_vmdk(tmp_path, SIZE, "monolithicSparse")
    with open(path, "r+b") as handle:
        header = handle.read(512)
        rgd, gd = struct.unpack_from("<QQ", header, 48)
        for directory in (rgd, gd):
            handle.seek(directory * 512)
            handle.write(bytes(8))  # two entries: both tables
    return path


ESXI_DESCRIPTOR = """# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="vmfs"

# Extent description
RW {sectors} VMFS "esx-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "2"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "8d2c9a2f5a7d1b7c0b0a7e5afffffffe"
ddb.thinProvisioned = "1"
ddb.uuid = "60 00 C2 9b 45 4f 5a 6b-a7 94 11 38 0b 24 0b 79"
ddb.virtualHWVersion = "13"
"""


def _esxi_vmfs(tmp_path: Path) -> Path:
    """A thin disk as ESXi writes it: createType vmfs, one VMFS extent."""
    (tmp_path / "esx-flat.vmdk").write_bytes(b"")
    os.truncate(tmp_path / "esx-flat.vmdk", SIZE)
    path = tmp_path / "esx.vmdk"
    path.write_text(ESXI_DESCRIPTOR.format(sectors=SIZE // 512))
    return path


#: Three flat extents, each at an offset inside its own file (qemu locks a
#: file, so it cannot open one that holds two extents).
OFFSET_EXTENTS = [("a.bin", 24576, 0), ("b.bin", 40960, 100), ("c.bin", 16387, 7)]


def _flat_extents_with_offsets(tmp_path: Path) -> Path:
    for name, sectors, offset in OFFSET_EXTENTS:
        # The bytes before an extent must stay untouched: fill them.
        (tmp_path / name).write_bytes(b"\x5f" * 512 * offset)
        os.truncate(tmp_path / name, (offset + sectors) * 512)
    lines = "\n".join(
        f'RW {sectors} FLAT "{name}" {offset}' for name, sectors, offset in OFFSET_EXTENTS
    )
    path = tmp_path / "split.vmdk"
    # The comment before the extents matters: after a blank line qemu reads
    # the next extent line twice.
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="twoGbMaxExtentFlat"\n\n# Extent description\n'
        f'{lines}\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n'
    )
    assert sum(sectors for _, sectors, _ in OFFSET_EXTENTS) * 512 == SIZE
    return path


SINGLE = [0, 32 * MIB, SIZE]
OFFSETS = [0, 12 * MIB, 32 * MIB, SIZE]
SPLIT = [0, 2 * GIB, 4 * GIB, SPLIT_SIZE]
TARGETS: dict[str, tuple[Callable[[Path], Path], str, int, list[int]]] = {
    "raw-created": (_ours("raw"), "raw", SIZE, SINGLE),
    "sparse-by-qemu": (lambda p: _qemu_vmdk(p, SIZE, "monolithicSparse"), "vmdk", SIZE, SINGLE),
    "sparse-created": (_ours("vmdk-sparse"), "vmdk", SIZE, SINGLE),
    "sparse-without-tables": (_without_tables, "vmdk", SIZE, SINGLE),
    "flat-by-qemu": (lambda p: _qemu_vmdk(p, SIZE, "monolithicFlat"), "vmdk", SIZE, SINGLE),
    "flat-created": (_ours("vmdk-flat"), "vmdk", SIZE, SINGLE),
    "split-sparse-by-qemu": (
        lambda p: _qemu_vmdk(p, SPLIT_SIZE, "twoGbMaxExtentSparse"),
        "vmdk",
        SPLIT_SIZE,
        SPLIT,
    ),
    "vmfs-esxi-style": (_esxi_vmfs, "vmdk", SIZE, SINGLE),
    "flat-extents-with-offsets": (_flat_extents_with_offsets, "vmdk", SIZE, OFFSETS),
    "split-flat-by-qemu": (
        lambda p: _qemu_vmdk(p, SPLIT_SIZE, "twoGbMaxExtentFlat"),
        "vmdk",
        SPLIT_SIZE,
        SPLIT,
    ),
}


@pytest.fixture(params=sorted(TARGETS))
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    make, fmt, size, hot_spots = TARGETS[request.param]
    return Target(request.param, make(tmp_path), fmt, size, hot_spots)


def _open(target: Target) -> TargetDisk:
    return open_disk(target.path, "raw" if target.fmt == "raw" else "vmdk")


def test_random_workload_matches_model(target: Target, tmp_path: Path) -> None:
    rng = random.Random(f"workload-{target.name}")
    model = Model(tmp_path / "model.raw", target.size)
    disk = _open(target)
    assert disk.size == target.size
    run_workload(disk, model, random_ops(rng, target.size, target.hot_spots, 250), rng)
    disk.close()

    assert_same(target.path, target.fmt, model.path)
    if target.fmt == "vmdk":
        assert "No errors" in assert_checks(target.path)

    # A second session reads what the first one left, and keeps writing.
    disk = _open(target)
    for spot in target.hot_spots:
        start = max(0, min(spot - 100_000, target.size - 200_000))
        assert disk.read(start, 200_000) == model.read(start, 200_000)
        # read_into fills a reused buffer with the same bytes, stale bytes overwritten.
        buffer = bytearray(b"\xee" * 200_000)
        disk.read_into(start, memoryview(buffer))
        assert buffer == model.read(start, 200_000)
    run_workload(disk, model, random_ops(rng, target.size, target.hot_spots, 60), rng)
    disk.close()
    model.close()
    assert_same(target.path, target.fmt, model.path)
    if target.name == "flat-extents-with-offsets":
        for name, _, offset in OFFSET_EXTENTS:
            head = (target.path.parent / name).read_bytes()[: offset * 512]
            assert head == b"\x5f" * offset * 512  # bytes before the extent untouched


#: qemu never allocates a grain table (block/vmdk.c), so it cannot write there.
QEMU_WRITABLE = sorted(set(TARGETS) - {"sparse-without-tables"})


@pytest.mark.parametrize("target", QEMU_WRITABLE, indirect=True)
def test_reads_what_qemu_io_wrote(target: Target) -> None:
    qemu_io(
        target.path,
        target.fmt,
        "write -P 0xab 1M 64k",
        "write -P 0xcd 1055232 1536",  # unaligned to grains, inside the first write's grain
        f"write -P 0x5a {target.size - 512} 512",
    )
    disk = _open(target)
    try:
        assert disk.read(1 * MIB, 6656) == b"\xab" * 6656
        assert disk.read(1055232, 1536) == b"\xcd" * 1536
        assert disk.read(1 * MIB + 8192, 57344) == b"\xab" * 57344
        assert disk.read(1 * MIB - 4096, 4096) == bytes(4096)
        assert disk.read(target.size - 1024, 1024) == bytes(512) + b"\x5a" * 512
    finally:
        disk.close()


def test_what_we_write_qemu_io_reads(target: Target) -> None:
    disk = _open(target)
    disk.write(3 * MIB + 100, b"\x77" * 70_000)  # crosses a grain boundary
    disk.write(target.size - 700, b"\x42" * 700)
    disk.flush()
    disk.close()
    qemu_io(
        target.path,
        target.fmt,
        f"read -P 0x77 {3 * MIB + 100} 70000",
        f"read -P 0 {3 * MIB} 100",
        f"read -P 0x42 {target.size - 700} 700",
    )


def test_descriptor_keys_and_disk_database_are_kept(tmp_path: Path) -> None:
    disk = open_disk(_esxi_vmfs(tmp_path), "vmdk")
    assert isinstance(disk, VmdkDisk)
    descriptor = disk.descriptor
    assert descriptor.create_type == "vmfs"
    assert descriptor.cid == 0xFFFFFFFE
    assert ("encoding", "UTF-8") in descriptor.fields
    assert dict(descriptor.ddb)["ddb.uuid"] == "60 00 C2 9b 45 4f 5a 6b-a7 94 11 38 0b 24 0b 79"
    assert [key for key, _ in descriptor.ddb][:2] == ["ddb.adapterType", "ddb.geometry.cylinders"]
    disk.close()


def test_a_descriptor_qemu_rewrote_with_a_shorter_cid_opens(tmp_path: Path) -> None:
    """qemu rewrites the CID in a NUL-filled buffer: the tail of a longer CID stays after it."""
    path = _esxi_vmfs(tmp_path)
    text = path.read_bytes().replace(b"CID=fffffffe", b"CID=7ab", 1)
    path.write_bytes(text + b"\0" + text[-5:] + bytes(10240 - len(text) - 6))
    disk = open_disk(path, "vmdk")
    assert isinstance(disk, VmdkDisk)
    assert disk.descriptor.cid == 0x7AB
    assert disk.size == SIZE
    disk.close()
