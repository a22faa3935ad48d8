"""VMDK target disks: monolithicSparse, monolithicFlat, twoGbMaxExtent*, vmfs.

A VMDK is a descriptor (:mod:`~mastertarget.disks.vmdk_descriptor`) and one
or more extents laid end to end: flat extents (plain data at an offset of a
file) and hosted sparse extents (:mod:`~mastertarget.disks.vmdk_sparse`).
:class:`VmdkDisk` maps the virtual disk onto them.

Written in place: monolithicSparse, twoGbMaxExtentSparse, monolithicFlat,
twoGbMaxExtentFlat and ESXi's ``vmfs`` (descriptor + ``-flat.vmdk``). Refused,
with the reason and the command that converts them: streamOptimized and any
compressed extent, snapshot deltas, sparse version 3 (changed-block tracking),
raw device maps. New ones are made by :mod:`~mastertarget.disks.vmdk_create`.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final, Protocol

from mastertarget.disks.base import Buffer, FailureLatch
from mastertarget.disks.diskfile import (
    DiskFile,
    check_range,
)
from mastertarget.disks.vmdk_descriptor import (
    FLAT_EXTENT_TYPES,
    MAX_DESCRIPTOR_BYTES,
    Descriptor,
    ExtentLine,
    check_extent_name,
    parse_descriptor,
)
from mastertarget.disks.vmdk_sparse import SparseExtent
from mastertarget.disks.vmdk_sparse_header import (
    COWD_MAGIC,
    MAGIC,
    SECTOR,
)
from mastertarget.errors import DiskError, DiskFormatError, DiskIOError

#: Bytes a descriptor may hold: tab, line breaks, printable ASCII, and UTF-8
#: (or Latin-1) beyond ASCII. Any other control byte means binary data.
_TEXT_BYTES: Final = bytes([9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0x100)])


class Extent(Protocol):
    """One extent; offsets are bytes inside it."""

    @property
    def size(self) -> int: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def read_into(self, offset: int, buffer: memoryview) -> None: ...
    def write(self, offset: int, data: memoryview) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class FlatExtent:
    """A flat extent: the extent's bytes at ``start`` of a file or device."""

    def __init__(self, disk_file: DiskFile, start: int, size: int) -> None:
        self._file = disk_file
        self._start = start
        self._size = size
        self._unflushed = False

    @property
    def size(self) -> int:
        """The extent's size in bytes."""
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the extent."""
        return self._file.read(self._start + offset, length)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with bytes of the extent."""
        self._file.read_into(self._start + offset, buffer)

    def write(self, offset: int, data: memoryview) -> None:
        """pwrite at the extent's place in the file."""
        self._unflushed = True
        self._file.write_vector(self._start + offset, [data])

    def zero(self, offset: int, length: int) -> None:
        """Punch a hole (file) or BLKZEROOUT (device), else write zeros."""
        self._unflushed = True
        self._file.zero(self._start + offset, length)

    def flush(self) -> None:
        """fsync the file if this extent changed since the last flush."""
        if self._unflushed:
            self._file.fsync()
            self._unflushed = False

    def close(self) -> None:
        """Close the file (idempotent: extents of one file share it)."""
        self._file.close()


class VmdkDisk:
    """A VMDK open as a target disk.

    Not thread-safe. After a write, zero or flush fails, the object refuses
    every further change (:class:`~mastertarget.disks.base.FailureLatch`): reopen it,
    which drops pending sparse allocations (their grains leak), and replay
    from the last durable point.
    """

    def __init__(self, path: str, descriptor: Descriptor, extents: list[Extent]) -> None:
        self._path = path
        self.descriptor = descriptor
        self._extents = extents
        self._starts: list[int] = []
        total = 0
        for extent in extents:
            self._starts.append(total)
            total += extent.size
        self._size = total
        self._latch = FailureLatch(path)

    @property
    def size(self) -> int:
        """The virtual size in bytes."""
        return self._size

    @property
    def path(self) -> str:
        """The descriptor file (for monolithicSparse, the one file)."""
        return self._path

    @property
    def create_type(self) -> str:
        """The descriptor's createType."""
        return self.descriptor.create_type

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; unallocated grains read as zeros.

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: a read failed.
            DiskFormatError: a grain table on the way is corrupt.
        """
        check_range(self._path, self._size, offset, length)
        pieces = [extent.read(rel, count) for extent, rel, _, count in self._pieces(offset, length)]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from ``offset``, as :meth:`read` would.

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: a read failed.
            DiskFormatError: a grain table on the way is corrupt.
        """
        check_range(self._path, self._size, offset, buffer.nbytes)
        for extent, rel, position, count in self._pieces(offset, buffer.nbytes):
            extent.read_into(rel, buffer[position : position + count])

    def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``; new sparse grains become durable on flush.

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the write failed, or an earlier change did.
        """
        view = memoryview(data).cast("B")
        check_range(self._path, self._size, offset, view.nbytes)
        with self._latch.guard():
            for extent, rel, position, count in self._pieces(offset, view.nbytes):
                extent.write(rel, view[position : position + count])

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros (allocated grains are zeroed in place).

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the zeroing failed, or an earlier change did.
        """
        check_range(self._path, self._size, offset, length)
        with self._latch.guard():
            for extent, rel, _, count in self._pieces(offset, length):
                extent.zero(rel, count)

    def flush(self) -> None:
        """Make every earlier write durable, sparse grain tables included.

        Costs nothing if nothing changed; one fsync per changed flat extent;
        for a sparse extent one fsync without new grains, fdatasync + table
        writes + fsync with new grains, and one more fdatasync when a grain
        table had to be allocated.

        Raises:
            DiskIOError: a sync or table write failed: the changes since the
                last flush are lost, and the disk refuses further use.
        """
        with self._latch.guard():
            for extent in self._extents:
                extent.flush()

    def close(self) -> None:
        """Close every extent file; does not flush (pending sparse grains leak)."""
        errors: list[DiskIOError] = []
        for extent in self._extents:
            try:
                extent.close()
            except DiskIOError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[Extent, int, int, int]]:
        """(extent, offset in it, offset in the request, length) per extent touched."""
        if len(self._extents) == 1:
            if length:
                yield self._extents[0], offset, 0, length
            return
        position, end = offset, offset + length
        index = bisect.bisect_right(self._starts, offset) - 1
        while position < end:
            extent, start = self._extents[index], self._starts[index]
            count = min(start + extent.size, end) - position
            yield extent, position - start, position - offset, count
            position += count
            index += 1


def open_vmdk(path: str | os.PathLike[str]) -> VmdkDisk:
    """Open a VMDK: a monolithicSparse file, or a descriptor file and its extents.

    Raises:
        DiskFormatError: the file is not a VMDK, or a kind not written in
            place, or its parts do not fit together (sizes, offsets, names).
        DiskIOError: a file could not be opened or read.
    """
    name = os.fspath(path)
    first = DiskFile.open(name)
    with _closed_on_error([first]):
        size = first.size()
        magic = first.read(0, 4) if size >= 4 else b""
        if magic == MAGIC:
            return _open_monolithic_sparse(first)
        if magic == COWD_MAGIC:
            raise DiskFormatError(
                f"{name}: a COWD (vmfsSparse / ESX 2) delta extent is not written in place: "
                "consolidate the snapshot, or convert with qemu-img convert -O vmdk"
            )
        if size > MAX_DESCRIPTOR_BYTES:
            raise DiskFormatError(
                f"{name}: expected a sparse extent ({MAGIC!r}) or a text descriptor of at most "
                f"{MAX_DESCRIPTOR_BYTES} bytes, found {size} bytes of something else "
                "(a -flat.vmdk file holds data only: open its descriptor)"
            )
        text = first.read(0, size)
        # The descriptor ends at the first NUL: qemu rewrites it in a buffer
        # of 20 sectors, so NULs and the tail of a longer old CID may follow.
        text = text.partition(b"\0")[0]
        if not text or text.translate(None, _TEXT_BYTES):
            raise DiskFormatError(
                f"{name}: expected a sparse extent (magic {MAGIC!r}) or a text descriptor, "
                f"found binary data starting with {text[:4]!r}"
            )
    first.close()
    descriptor = parse_descriptor(text, name)
    if descriptor.create_type == "monolithicSparse":
        raise DiskFormatError(
            f"{name}: a monolithicSparse disk is one file starting with {MAGIC!r}, found a "
            "separate descriptor file claiming that createType"
        )
    return VmdkDisk(name, descriptor, _open_extents(Path(name), descriptor))


def _open_monolithic_sparse(disk_file: DiskFile) -> VmdkDisk:
    """The sparse file is its own descriptor and its only extent."""
    name = disk_file.path
    with _closed_on_error([disk_file]):
        extent = SparseExtent.open(disk_file)
        if extent.header.descriptor_offset == 0:
            raise DiskFormatError(
                f"{name}: a sparse extent without an embedded descriptor is one part of a "
                "split (twoGbMaxExtentSparse) disk: open its descriptor file instead"
            )
        descriptor = parse_descriptor(extent.read_descriptor(), f"{name} (embedded descriptor)")
        if descriptor.create_type != "monolithicSparse":
            raise DiskFormatError(
                f"{name}: expected createType 'monolithicSparse' in the embedded descriptor, "
                f"found {descriptor.create_type!r}"
            )
        _check_extent_size(name, descriptor.extents[0], extent.header.capacity)
    return VmdkDisk(name, descriptor, [extent])


def _open_extents(descriptor_path: Path, descriptor: Descriptor) -> list[Extent]:
    """Open every extent the descriptor lists, checking each against its line."""
    folder = descriptor_path.parent
    own = os.stat(descriptor_path)
    files: dict[tuple[int, int], DiskFile] = {}
    extents: list[Extent] = []
    # Byte ranges each file already gives to an extent: two extents may share
    # a file (flat extents at different offsets) but never bytes.
    claimed: dict[str, list[tuple[int, int]]] = {}
    with _closed_on_error(files.values()):
        for line in descriptor.extents:
            check_extent_name(line.filename)
            extent_path = folder / line.filename
            disk_file = _extent_file(extent_path, own, files)
            if line.kind in FLAT_EXTENT_TYPES:
                start = line.offset_sectors * SECTOR
                end = start + line.sectors * SECTOR
                if disk_file.size() < end:
                    raise DiskFormatError(
                        f"{extent_path}: expected at least {end} bytes for extent "
                        f"'RW {line.sectors} {line.kind}' at sector {line.offset_sectors}, "
                        f"found {disk_file.size()}"
                    )
                _claim(claimed, disk_file.path, start, end)
                extents.append(FlatExtent(disk_file, start, line.sectors * SECTOR))
            else:
                _claim(claimed, disk_file.path, 0, 1 << 63)  # the whole file is its own
                sparse = SparseExtent.open(disk_file)
                _check_extent_size(str(extent_path), line, sparse.header.capacity)
                extents.append(sparse)
    return extents


def _claim(claimed: dict[str, list[tuple[int, int]]], path: str, start: int, end: int) -> None:
    """Record that bytes [start, end) of ``path`` belong to one extent; refuse an overlap."""
    ranges = claimed.setdefault(path, [])
    for other_start, other_end in ranges:
        if start < other_end and other_start < end:
            raise DiskFormatError(
                f"{path}: expected extents that share a file to use separate bytes of it, "
                f"found bytes {start}-{end} and {other_start}-{other_end} used twice"
            )
    ranges.append((start, end))


@contextlib.contextmanager
def _closed_on_error(files: Iterable[DiskFile]) -> Iterator[None]:
    """Close ``files`` (as they are when it happens) if the block raises."""
    try:
        yield
    except BaseException:
        for disk_file in list(files):
            with contextlib.suppress(DiskError):
                disk_file.close()
        raise


def _extent_file(
    path: Path, descriptor: os.stat_result, files: dict[tuple[int, int], DiskFile]
) -> DiskFile:
    """Open an extent file once however many extents it holds; never the descriptor."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise DiskFormatError(
            f"{path}: expected the extent file that the descriptor names, found none "
            f"({exc.strerror})"
        ) from exc
    key = (info.st_dev, info.st_ino)
    if key == (descriptor.st_dev, descriptor.st_ino):
        raise DiskFormatError(f"{path}: an extent may not be the descriptor file itself")
    if key not in files:
        files[key] = DiskFile.open(path)
    return files[key]


def _check_extent_size(source: str, line: ExtentLine, capacity: int) -> None:
    if line.sectors != capacity:
        raise DiskFormatError(
            f"{source}: the descriptor says the extent has {line.sectors} sectors, its sparse "
            f"header says capacity {capacity} sectors: the extents do not add up"
        )
