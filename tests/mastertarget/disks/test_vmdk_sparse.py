"""monolithicSparse specifics: growth by grains, both table copies, crash safety, limits.

Crash safety is tested two ways. A crash of the process (the file closed with
writes not flushed) must leave a file that opens, passes ``qemu-img check``
and reads the old content. A power loss at any sync point of ``flush()`` is
simulated by copying the file at every fdatasync/fsync, before and after it:
the copy taken after a sync is what survives if every later write is lost,
the one taken before is what survives if all of them reached the disk. Every
copy must pass ``qemu-img check`` and hold, grain by grain, either the old or
the new content: never a table entry pointing at data that was not durable.
"""

from __future__ import annotations

import random
import resource
from collections.abc import Sequence
from pathlib import Path

import pytest

from mastertarget.disks import create_disk, open_disk, vmdk_sparse
from mastertarget.disks.diskfile import DiskFile
from mastertarget.disks.vmdk import VmdkDisk
from mastertarget.disks.vmdk_descriptor import parse_descriptor
from mastertarget.disks.vmdk_sparse import SparseExtent
from mastertarget.errors import DiskIOError
from tests.mastertarget.disks.sparse_layout import (
    allocated_grains,
    read_tables,
    set_directory_entry,
)
from tests.mastertarget.disks.tools import (
    KIB,
    MIB,
    Model,
    allocated_bytes,
    assert_checks,
    assert_same,
    qemu_img,
    random_ops,
    run_workload,
)

GRAIN = 64 * KIB
SIZE = 64 * MIB


@pytest.fixture
def sparse(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    create_disk(path, "vmdk-sparse", SIZE).close()
    return path


def test_file_grows_only_by_the_grains_written(sparse: Path) -> None:
    empty = sparse.stat().st_size
    assert empty == 64 * KIB  # header, descriptor, both directories and tables
    disk = open_disk(sparse, "vmdk")
    disk.write(0, b"a")  # grain 0
    disk.write(10 * GRAIN + 5, b"b" * 100)  # grain 10
    disk.write(20 * GRAIN - 10, b"c" * 20)  # grains 19 and 20
    disk.write(SIZE - 1, b"d")  # the last grain
    disk.flush()
    assert sparse.stat().st_size == empty + 5 * GRAIN
    assert allocated_bytes(sparse) == 5 * GRAIN

    # Writing again into the same grains, zeroing them or zeroing
    # unallocated ones allocates nothing.
    disk.write(1, b"a" * 1000)
    disk.write(20 * GRAIN, b"e" * GRAIN)
    disk.zero(10 * GRAIN, 2 * GRAIN)
    disk.zero(30 * GRAIN, 100 * GRAIN)
    disk.flush()
    disk.close()
    assert sparse.stat().st_size == empty + 5 * GRAIN
    grains = allocated_grains(read_tables(sparse))
    assert len(grains) == 5
    assert all(sector % 128 == 0 for sector in grains)  # grain-aligned, as qemu allocates


def test_both_table_copies_are_kept_in_step(tmp_path: Path, sparse: Path) -> None:
    set_directory_entry(sparse, 1, 0)  # the second table must be allocated on demand
    rng = random.Random(7)
    model = Model(tmp_path / "model.raw", SIZE)
    disk = open_disk(sparse, "vmdk")
    run_workload(disk, model, random_ops(rng, SIZE, [0, 32 * MIB, SIZE], 150), rng)
    disk.close()
    tables = read_tables(sparse)
    assert tables.gd[1] != 0
    assert tables.rgd[1] == tables.gd[1] + 4  # the copy right after the new table
    assert tables.gts == tables.rgts
    assert len(allocated_grains(tables)) > 10
    assert_same(sparse, "vmdk", model.path)
    assert_checks(sparse)


def test_reads_see_writes_not_yet_flushed(sparse: Path) -> None:
    disk = open_disk(sparse, "vmdk")
    disk.write(3 * GRAIN - 3, b"pending!")
    assert disk.read(3 * GRAIN - 8, 16) == bytes(5) + b"pending!" + bytes(3)
    disk.zero(3 * GRAIN, 2)
    assert disk.read(3 * GRAIN - 3, 8) == b"pen\0\0ng!"
    disk.close()


def test_zero_punches_holes_in_allocated_grains(sparse: Path) -> None:
    disk = open_disk(sparse, "vmdk")
    disk.write(0, random.Random(1).randbytes(4 * MIB))
    disk.flush()
    used = sparse.stat().st_blocks
    disk.zero(GRAIN // 2, 4 * MIB - GRAIN)
    disk.flush()
    assert disk.read(0, 4 * MIB).count(0) >= 4 * MIB - GRAIN
    disk.close()
    assert sparse.stat().st_blocks < used - (3 * MIB) // 512
    qemu_read = qemu_img("compare", "-f", "vmdk", sparse, sparse)  # still readable by qemu
    assert qemu_read.returncode == 0


def test_small_table_cache_and_early_flushes(
    tmp_path: Path, sparse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One cached table and a flush whenever a second table gets pending entries."""
    monkeypatch.setattr(vmdk_sparse, "TABLE_CACHE_BYTES", 2048)
    monkeypatch.setattr(vmdk_sparse, "MAX_DIRTY_TABLES", 1)
    rng = random.Random(11)
    model = Model(tmp_path / "model.raw", SIZE)
    disk = open_disk(sparse, "vmdk")
    run_workload(disk, model, random_ops(rng, SIZE, [0, 32 * MIB, SIZE], 120), rng)
    disk.close()
    assert_same(sparse, "vmdk", model.path)
    assert_checks(sparse)


def test_crash_before_flush_leaks_grains_and_keeps_old_content(
    tmp_path: Path, sparse: Path
) -> None:
    model = Model(tmp_path / "model.raw", SIZE)
    disk = open_disk(sparse, "vmdk")
    old = random.Random(2).randbytes(300 * KIB)
    disk.write(100, old)
    model.write(100, old)
    disk.flush()
    size_flushed = sparse.stat().st_size
    # New grains, then the process dies: no flush.
    disk.write(8 * MIB + 7, b"\x99" * 200 * KIB)
    disk.write(40 * MIB, b"\x98" * GRAIN)
    disk.close()

    assert sparse.stat().st_size > size_flushed  # the grain data reached the file ...
    report = assert_checks(sparse)  # ... and qemu finds nothing wrong: leaks are not reported
    assert "No errors were found" in report
    assert_same(sparse, "vmdk", model.path)  # ... and nothing points at it

    disk = open_disk(sparse, "vmdk")
    assert disk.read(8 * MIB, 300 * KIB) == bytes(300 * KIB)
    later = b"\x55" * 100 * KIB
    disk.write(8 * MIB, later)
    model.write(8 * MIB, later)
    disk.flush()
    disk.close()
    # New grains went past the leaked ones, never over them.
    assert (
        min(g for g in allocated_grains(read_tables(sparse)) if g * 512 >= size_flushed)
        >= (size_flushed + 4 * GRAIN) // 512
    )
    assert_same(sparse, "vmdk", model.path)
    assert_checks(sparse)


class PowerLossFile(DiskFile):
    """A real DiskFile that also builds the images a power loss could leave.

    It keeps the content made durable by the last sync and the writes,
    truncates and zeros issued since. At every sync it saves the images a
    power loss just before that sync could leave: none of those changes, each
    one alone, and all of them (docs/design.md crash-safe checklist item 8).
    """

    durable: bytearray
    pending: list[tuple[str, int, bytes | int]]
    images: list[tuple[str, Path]]

    def write_vector(self, offset: int, parts: Sequence[memoryview]) -> None:
        self.pending.append(("write", offset, b"".join(parts)))
        super().write_vector(offset, parts)

    def zero(self, offset: int, length: int) -> None:
        self.pending.append(("zero", offset, length))
        super().zero(offset, length)

    def truncate(self, size: int) -> None:
        self.pending.append(("truncate", size, 0))
        super().truncate(size)

    def fdatasync(self) -> None:
        self._crash_images("fdatasync")
        super().fdatasync()

    def fsync(self) -> None:
        self._crash_images("fsync")
        super().fsync()

    def _crash_images(self, sync: str) -> None:
        ops = self.pending
        subsets = [("none", []), ("all", ops)]
        subsets += [(f"only-{op[0]}-{op[1]}", [op]) for op in ops]
        for name, subset in subsets:
            image = Path(f"{self.path}.{len(self.images):03d}")
            image.write_bytes(_apply(self.durable, subset))
            self.images.append((f"{sync} {len(self.images)} {name}", image))
        self.durable = _apply(self.durable, ops)
        self.pending = []


def _apply(content: bytearray, ops: list[tuple[str, int, bytes | int]]) -> bytearray:
    result = bytearray(content)
    for kind, offset, value in ops:
        if kind == "truncate":
            del result[offset:]
            result.extend(bytes(offset - len(result)))
            continue
        data = value if isinstance(value, bytes) else bytes(value)
        end = offset + len(data)
        if kind == "zero":
            end = min(end, len(result))  # a hole punched past the end changes nothing
            data = bytes(max(0, end - offset))
        result.extend(bytes(max(0, end - len(result))))
        result[offset:end] = data
    return result


def _open_power_loss(path: Path) -> tuple[VmdkDisk, PowerLossFile]:
    disk_file = PowerLossFile.open(path)
    disk_file.durable = bytearray(path.read_bytes())
    disk_file.pending = []
    disk_file.images = []
    extent = SparseExtent.open(disk_file)
    descriptor = parse_descriptor(extent.read_descriptor(), str(path))
    return VmdkDisk(str(path), descriptor, [extent]), disk_file


def _as_raw(image: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / f"{image.name}.raw"
    result = qemu_img("convert", "-f", "vmdk", "-O", "raw", image, raw)
    assert result.returncode == 0, result.stderr
    return raw.read_bytes()


def test_power_loss_at_every_sync_point_of_flush(tmp_path: Path) -> None:
    size = 36 * MIB  # two grain tables, the second one partial
    sparse = tmp_path / "disk.vmdk"
    create_disk(sparse, "vmdk-sparse", size).close()
    set_directory_entry(sparse, 1, 0)  # the flush must also allocate a table
    rng = random.Random(5)
    disk = open_disk(sparse, "vmdk")
    before = bytearray(size)
    for offset in (0, 5 * MIB + 3, 31 * MIB):
        data = rng.randbytes(150 * KIB)
        disk.write(offset, data)
        before[offset : offset + len(data)] = data
    disk.flush()
    disk.close()

    disk, disk_file = _open_power_loss(sparse)
    after = bytearray(before)
    changes = [(10, 70 * KIB), (5 * MIB, 4 * KIB), (20 * MIB + 1, 200 * KIB)]
    changes += [(33 * MIB + 17, 300 * KIB), (size - 100, 100)]  # in the table made on demand
    for offset, length in changes:
        data = rng.randbytes(length)
        disk.write(offset, data)
        after[offset : offset + length] = data
    disk.zero(31 * MIB, GRAIN)
    after[31 * MIB : 31 * MIB + GRAIN] = bytes(GRAIN)
    disk.flush()
    disk.close()

    syncs = [label.split()[0] for label, _ in disk_file.images if label.endswith(" none")]
    # grain data; grain tables (the new one too); directory entries of the new table
    assert syncs == ["fdatasync", "fdatasync", "fsync"]
    for label, image in disk_file.images:
        assert "No errors" in assert_checks(image), label
        content = _as_raw(image, tmp_path)
        if content in (before, after):
            continue
        for start in range(0, size, GRAIN):
            grain = content[start : start + GRAIN]
            assert grain in (before[start : start + GRAIN], after[start : start + GRAIN]), (
                label,
                start,
            )
    assert _as_raw(disk_file.images[-1][1], tmp_path) == after  # the final fsync: all new
    assert Path(disk_file.path).read_bytes() == disk_file.durable
    # Right after the data sync, before any table is written, no new grain is visible.
    nothing_lost = [image for label, image in disk_file.images if label.endswith(" none")]
    assert _as_raw(nothing_lost[1], tmp_path)[20 * MIB : 21 * MIB] == bytes(MIB)
    assert len(disk_file.images) > 12


def test_a_failed_write_makes_the_disk_refuse_further_changes(sparse: Path) -> None:
    disk = open_disk(sparse, "vmdk")
    disk.write(0, b"durable")
    disk.flush()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG.
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * KIB, hard))
    try:
        with pytest.raises(DiskIOError) as failed:
            disk.write(MIB, b"\x01" * MIB)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.value.errno == 27  # EFBIG
    assert str(sparse) in failed.value.message
    with pytest.raises(DiskIOError, match="unusable after an earlier failure"):
        disk.flush()
    with pytest.raises(DiskIOError, match="unusable"):
        disk.write(0, b"x")
    disk.close()

    disk = open_disk(sparse, "vmdk")
    assert disk.read(0, 8) == b"durable\0"
    assert disk.read(MIB, MIB) == bytes(MIB)
    disk.close()
    assert_checks(sparse)
