"""The dirty map: which regions of a captured disk may differ from the master target.

A file of one byte per region (docs/protocol.md, "Dirty map")::

    file   = header[64] || cells[regions]
    header = magic "BRDM" || version:u8 || reserved:u8[3] || region_bytes:u64
             || disk_bytes:u64 || regions:u64 || reserved:u8[28] || crc32:u32

``crc32`` (zlib's) covers header bytes 0..59. A cell is 1 when its region is
*dirty*, 0 when the master target is known to hold every write to it.

The rule that makes it worth keeping, as DRBD's bitmap: a region is marked
dirty, durably (msync), *before* the source is written in it, and marked
clean only once the master target holds every write to it. So whatever
happens to the agent, its journal or the machine, the regions where the
source and the target may differ are a subset of the dirty ones, and a
resync of those alone brings the target level.

While nbdkit runs, the plugin is the only writer of the file
(:class:`RegionTracker`); the agent reads it before it starts nbdkit, and
creates it. A byte per region rather than a bit: a cell is written with one
store, never read-modified-written.

Standard library only (the plugin runs in nbdkit's embedded Python).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"BRDM"
VERSION: Final = 1
# header: magic:4s || version:u8 || reserved:3s || region_bytes:u64 || disk_bytes:u64
#         || regions:u64 || reserved:28s || crc32:u32
HEADER: Final = struct.Struct("<4sB3sQQQ28sI")
CRC_COVERS: Final = HEADER.size - 4
CLEAN: Final = 0
DIRTY: Final = 1

#: The smallest region: a resync reads at least this much of the source and
#: of the target per dirty region. 1 MiB keeps a scattered write's resync
#: cheap, and its cell is written once per write burst, not per write.
MIN_REGION_BYTES: Final = 2**20
#: Most regions of one map. The plugin keeps an entry per region it wrote to
#: and has not seen shipped: 256 Ki entries stay a few tens of MiB even if
#: every region is dirty. Larger disks get larger regions (4 MiB for 1 TiB).
MAX_REGIONS: Final = 2**18


class DirtyMapError(ValueError):
    """The dirty map file is not one, is damaged, or is of another disk."""


@dataclass(frozen=True, slots=True)
class Geometry:
    """How a disk is cut into regions."""

    region_bytes: int
    disk_bytes: int

    @property
    def regions(self) -> int:
        return -(-self.disk_bytes // self.region_bytes)

    @property
    def file_bytes(self) -> int:
        return HEADER.size + self.regions

    def regions_of(self, offset: int, length: int) -> range:
        """The regions that bytes ``offset .. offset + length`` touch (none if empty)."""
        if length <= 0:
            return range(0)
        return range(offset // self.region_bytes, (offset + length - 1) // self.region_bytes + 1)

    def span(self, region: int) -> tuple[int, int]:
        """``(offset, length)`` of a region (the last one may be short)."""
        offset = region * self.region_bytes
        return offset, min(self.region_bytes, self.disk_bytes - offset)


def region_bytes_for(disk_bytes: int) -> int:
    """The region size for a disk: :data:`MIN_REGION_BYTES`, doubled until at
    most :data:`MAX_REGIONS` regions cover it."""
    size = MIN_REGION_BYTES
    while -(-disk_bytes // size) > MAX_REGIONS:
        size *= 2
    return size


def encode_header(geometry: Geometry) -> bytes:
    body = HEADER.pack(
        MAGIC, VERSION, b"", geometry.region_bytes, geometry.disk_bytes, geometry.regions, b"", 0
    )[:CRC_COVERS]
    return body + struct.pack("<I", zlib.crc32(body))


def decode_header(data: bytes, *, what: str) -> Geometry:
    """Check a dirty map's header, in order: length, magic, version, checksum, fields.

    Raises:
        DirtyMapError: naming what was expected and what was found.
    """
    if len(data) < HEADER.size:
        raise DirtyMapError(f"{what}: expected a {HEADER.size}-byte header, found {len(data)}")
    magic, version, reserved, region, disk, regions, reserved2, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DirtyMapError(f"{what}: expected magic {MAGIC!r}, found {magic!r}")
    if version != VERSION:
        raise DirtyMapError(f"{what}: expected version {VERSION}, found {version}")
    actual = zlib.crc32(data[:CRC_COVERS])
    if crc != actual:
        raise DirtyMapError(f"{what}: header checksum must be {crc:08x}, found {actual:08x}")
    if reserved != bytes(3) or reserved2 != bytes(28):
        raise DirtyMapError(f"{what}: reserved header bytes must be zero")
    if region < MIN_REGION_BYTES or region & (region - 1) or disk <= 0:
        raise DirtyMapError(
            f"{what}: expected a power-of-two region size of at least {MIN_REGION_BYTES} and "
            f"a disk of at least one byte, found {region} and {disk}"
        )
    geometry = Geometry(region, disk)
    if regions != geometry.regions:
        raise DirtyMapError(
            f"{what}: {disk} bytes in regions of {region} make {geometry.regions} regions, "
            f"the header says {regions}"
        )
    return geometry


def dirty_regions(cells: bytes | bytearray | memoryview) -> list[int]:
    """The indexes of the dirty cells.

    Raises:
        DirtyMapError: a cell holds neither 0 nor 1.
    """
    data = bytes(cells)
    stray = data.translate(None, b"\x00\x01")
    if stray:
        raise DirtyMapError(f"a dirty map cell must be 0 or 1, found {stray[0]}")
    found: list[int] = []
    at = data.find(DIRTY)
    while at >= 0:
        found.append(at)
        at = data.find(DIRTY, at + 1)
    return found


def read_map(path: str) -> tuple[Geometry, list[int]]:
    """A dirty map file's geometry and dirty regions (the agent reads it before nbdkit runs).

    Raises:
        DirtyMapError: it is damaged or of the wrong length.
        OSError: it cannot be read (FileNotFoundError when there is none).
    """
    with open(path, "rb") as file:
        data = file.read()
    geometry = decode_header(data, what=f"dirty map {path}")
    if len(data) != geometry.file_bytes:
        raise DirtyMapError(
            f"dirty map {path}: expected {geometry.file_bytes} bytes, found {len(data)}"
        )
    return geometry, dirty_regions(memoryview(data)[HEADER.size :])


#: A writable run of one byte per region: a view of the mapped file, or a bytearray.
Cells = memoryview | bytearray


class RegionTracker:
    """The plugin's bookkeeping of the dirty map: when a cell may go back to clean.

    A region stays dirty while either

    - a request written to it is *live*: journaled (or on its way to the
      agent) and not yet at the master target — until SHIPPED covers the
      last such request;
    - or it is *pending*: it needs a resync (it was dirty when the plugin
      started, a write to it was not journaled, or the agent asked) — until
      RESYNCED covers it.

    Args:
        geometry: the disk's regions.
        cells: one byte per region.
        persist: makes cells ``first .. end - 1`` durable (msync of their pages).
    """

    def __init__(
        self, geometry: Geometry, cells: Cells, persist: Callable[[int, int], None]
    ) -> None:
        self.geometry = geometry
        self._cells = cells
        self._persist = persist
        self._lock = threading.Lock()
        #: region -> the last request written to it; insertion order is request order
        self._live: dict[int, int] = {}
        #: region -> the last request whose writes a resync must cover
        self._pending: dict[int, int] = {}
        for region in dirty_regions(cells):
            self._pending[region] = 0

    @property
    def pending(self) -> dict[int, int]:
        with self._lock:
            return dict(self._pending)

    @property
    def live(self) -> dict[int, int]:
        with self._lock:
            return dict(self._live)

    def begin(self, offset: int, length: int, rid: int) -> None:
        """Before request ``rid`` writes the source: its regions are dirty, durably."""
        with self._lock:
            newly: list[int] = []
            for region in self.geometry.regions_of(offset, length):
                if self._cells[region] != DIRTY:
                    self._cells[region] = DIRTY
                    newly.append(region)
                self._live.pop(region, None)
                self._live[region] = rid
            if newly:
                self._persist(newly[0], newly[-1] + 1)

    def left_dirty(self, offset: int, length: int, rid: int) -> None:
        """Request ``rid`` was not journaled, or failed: its regions need a resync."""
        with self._lock:
            for region in self.geometry.regions_of(offset, length):
                self._pending[region] = max(self._pending.get(region, 0), rid)

    def shipped(self, rid: int) -> int:
        """Every journaled request up to ``rid`` is at the master target.

        Returns:
            The number of cells made clean.
        """
        cleaned = 0
        with self._lock:
            while self._live:
                region, last = next(iter(self._live.items()))
                if last > rid:
                    break
                del self._live[region]
                if region not in self._pending:
                    self._cells[region] = CLEAN
                    cleaned += 1
        return cleaned

    def mark_pending(
        self, ranges: Iterable[tuple[int, int]], rid: int, *, live: bool = False
    ) -> list[tuple[int, int]]:
        """``ranges`` need a resync for every request up to ``rid``; durable on return.

        Args:
            live: the regions of journaled requests up to ``rid`` that are
                not yet shipped need one too (their journal is gone).

        Returns:
            Every range that needs a resync now, regions merged.
        """
        with self._lock:
            regions = [r for o, n in ranges for r in self.geometry.regions_of(o, n)]
            if live:
                regions += [region for region, last in self._live.items() if last <= rid]
            newly: list[int] = []
            for region in regions:
                self._pending[region] = max(self._pending.get(region, 0), rid)
                if self._cells[region] != DIRTY:
                    self._cells[region] = DIRTY
                    newly.append(region)
            if newly:
                self._persist(min(newly), max(newly) + 1)
            return merge_regions(self.geometry, self._pending)

    def resynced(self, ranges: Iterable[tuple[int, int]], rid: int) -> int:
        """``ranges`` were resynced after request ``rid``.

        Returns:
            The number of cells made clean.
        """
        cleaned = 0
        with self._lock:
            for offset, length in ranges:
                for region in self.geometry.regions_of(offset, length):
                    last = self._pending.get(region)
                    if last is None or last > rid:
                        continue
                    del self._pending[region]
                    if region not in self._live:
                        self._cells[region] = CLEAN
                        cleaned += 1
        return cleaned


class MappedDirtyMap:
    """A dirty map file, mapped into memory for the plugin.

    Raises:
        DirtyMapError: the file is damaged or not of ``disk_bytes``.
        OSError: it cannot be opened or mapped.
    """

    def __init__(self, path: str, disk_bytes: int) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.geometry, size = _check_file(self._fd, path, disk_bytes)
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)
        self.cells = self._view[HEADER.size :]

    def persist(self, first: int, end: int) -> None:
        """Make cells ``first .. end - 1`` durable (msync of the pages holding them)."""
        start = (HEADER.size + first) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = HEADER.size + end
        self._map.flush(start, stop - start)

    def flush(self) -> None:
        """Make every cell durable (cells made clean are written lazily)."""
        self._map.flush()

    def close(self) -> None:
        self.cells.release()
        self._view.release()
        self._map.close()
        os.close(self._fd)


def _check_file(fd: int, path: str, disk_bytes: int) -> tuple[Geometry, int]:
    geometry = decode_header(os.pread(fd, HEADER.size, 0), what=f"dirty map {path}")
    size = os.fstat(fd).st_size
    if size != geometry.file_bytes or geometry.disk_bytes != disk_bytes:
        raise DirtyMapError(
            f"dirty map {path}: expected {geometry.file_bytes} bytes for a disk of "
            f"{disk_bytes} bytes, found {size} bytes for a disk of {geometry.disk_bytes}"
        )
    return geometry, size


def merge_regions(geometry: Geometry, regions: Iterable[int]) -> list[tuple[int, int]]:
    """``regions`` as sorted ``(offset, length)`` ranges, neighbours merged."""
    ranges: list[tuple[int, int]] = []
    for region in sorted(regions):
        offset, length = geometry.span(region)
        if ranges and ranges[-1][0] + ranges[-1][1] == offset:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
        else:
            ranges.append((offset, length))
    return ranges
