"""A hosted sparse extent ("KDMV") read and written in place, crash-safely.

Reads follow grain directory -> grain table -> grain; a grain with no entry
reads as zeros. A write to an allocated grain goes to it in place. A write to
an unallocated grain takes a new grain at the end of the file (at a multiple
of the grain size, where qemu's ``vmdk_add_extent`` also puts them) and the
grain table entry is kept *pending* in memory; a table that does not exist yet
(directory entry 0) is allocated the same way.

Crash-safe order (the durability contract of :mod:`mastertarget.disks.base`):

1. ``write()`` puts grain data in the file; no table is touched.
2. ``flush()``: fdatasync -> the grain data is durable;
3. write every changed grain table and its redundant copy whole;
4. if new tables were allocated: fdatasync, then write their directory and
   redundant directory entries;
5. fsync.

No table entry ever reaches the file before the data it points at is durable,
and no directory entry before its table, so a crash or power loss at any
moment leaves every entry old or new, each new one pointing at durable data.
It may leave grains past the tables that nothing points at: leaked space,
never reused (new grains go past the end of the file), which
``qemu-img check`` does not report (it only checks that entries point inside
the file). docs/disks.md has the costs and the tests that prove the order.

Reads consult the pending tables, so they see writes not yet flushed.
"""

from __future__ import annotations

import bisect
import errno as errno_codes
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import Final

from mastertarget.disks.diskfile import DiskFile
from mastertarget.disks.vmdk_sparse_header import (
    GTE_ZEROED,
    MAX_SECTOR,
    SECTOR,
    SparseHeader,
    parse_header,
)
from mastertarget.errors import DiskFormatError, DiskIOError

#: Clean grain tables kept in memory: 16 MiB holds 8192 tables of 512
#: entries, which map 256 GiB at 64 KiB grains, so a replication stream's
#: working set is read from the file once. Evicted tables are read again.
TABLE_CACHE_BYTES: Final = 16 << 20
#: Tables with pending entries kept before write() flushes by itself: 4096
#: tables (8 MiB) map 128 GiB of new grains, far more than one HRL file
#: writes between two flushes, and bound the memory of a caller that never
#: flushes. Flushing early is allowed by the contract; it only costs fsyncs.
MAX_DIRTY_TABLES: Final = 4096

_BIG_ENDIAN: Final = sys.byteorder == "big"


class SparseExtent:
    """One sparse extent file. Offsets are bytes inside the extent.

    Not thread-safe. Does not poison itself after an error: the disk above it
    refuses further use (:class:`mastertarget.disks.vmdk.VmdkDisk`).
    """

    def __init__(
        self, disk_file: DiskFile, header: SparseHeader, gd: array[int], rgd: array[int] | None
    ) -> None:
        self._file = disk_file
        self._header = header
        self._gd = gd
        self._rgd = rgd
        self._grain_bytes = header.grain_sectors * SECTOR
        self._gtes = header.gtes_per_gt
        file_size = disk_file.size()
        #: Sector past the last one a stored grain table may point into.
        self._durable_end = -(-file_size // SECTOR)
        #: Where the next grain or table goes: past everything in the file,
        #: grain-aligned, so leaked grains of a crashed run are never reused.
        grain = header.grain_sectors
        self._next_sector = max(header.overhead, -(-self._durable_end // grain) * grain)
        self._clean: OrderedDict[int, array[int]] = OrderedDict()
        self._max_clean = max(1, TABLE_CACHE_BYTES // (self._gtes * 4))
        self._dirty: dict[int, array[int]] = {}
        self._new_tables: dict[int, int] = {}
        self._unflushed = False

    @classmethod
    def open(cls, disk_file: DiskFile) -> SparseExtent:
        """Check the header and the grain directories of an open sparse extent.

        Raises:
            DiskFormatError: the header or a directory is not valid (see
                :func:`~mastertarget.disks.vmdk_sparse_header.parse_header`).
            DiskIOError: reading failed.
        """
        file_size = disk_file.size()
        sector = bytearray(SECTOR)
        disk_file.read_into(0, memoryview(sector), eof_is_zeros=True)
        header = parse_header(bytes(sector[: min(SECTOR, file_size)]), file_size, disk_file.path)
        gd = _read_directory(disk_file, header, header.gd_offset, file_size, "grain directory")
        rgd = None
        if header.has_redundant_gd:
            rgd = _read_directory(
                disk_file, header, header.rgd_offset, file_size, "redundant grain directory"
            )
            _check_same_tables(disk_file.path, gd, rgd)
        return cls(disk_file, header, gd, rgd)

    @property
    def header(self) -> SparseHeader:
        """The checked header."""
        return self._header

    @property
    def size(self) -> int:
        """The extent's virtual size in bytes."""
        return self._header.capacity * SECTOR

    @property
    def path(self) -> str:
        """The extent file."""
        return self._file.path

    def read_descriptor(self) -> bytes:
        """The embedded descriptor area (NUL-padded), empty if there is none."""
        header = self._header
        return self._file.read(
            header.descriptor_offset * SECTOR, header.descriptor_sectors * SECTOR
        )

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the extent; unallocated and zeroed grains read as zeros."""
        buffer = bytearray(length)
        self._fill(offset, memoryview(buffer))
        return bytes(buffer)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with bytes of the extent, as :meth:`read` would."""
        buffer[:] = bytes(buffer.nbytes)  # holes are zeros; _fill writes only grains
        self._fill(offset, buffer)

    def _fill(self, offset: int, view: memoryview) -> None:
        """Copy the allocated grains of the range into ``view`` (holes left as they are)."""
        length = view.nbytes
        run_file = run_pos = run_len = 0
        for grain, within, position, count in self._pieces(offset, length):
            sector = self._lookup(grain)
            if sector <= GTE_ZEROED:
                continue
            file_offset = sector * SECTOR + within
            if run_len and run_file + run_len == file_offset and run_pos + run_len == position:
                run_len += count
                continue
            if run_len:
                self._file.read_into(run_file, view[run_pos : run_pos + run_len], eof_is_zeros=True)
            run_file, run_pos, run_len = file_offset, position, count
        if run_len:
            self._file.read_into(run_file, view[run_pos : run_pos + run_len], eof_is_zeros=True)

    def write(self, offset: int, data: memoryview) -> None:
        """Write in place or into new grains; new table entries stay pending until flush."""
        if len(self._dirty) >= MAX_DIRTY_TABLES:
            self.flush()  # before allocating: only grains written earlier get entries
        runs: list[tuple[int, list[memoryview]]] = []
        run_end = -1
        for grain, within, position, count in self._pieces(offset, data.nbytes):
            sector = self._lookup(grain)
            if sector <= GTE_ZEROED:
                # The rest of a new grain is never written: it lies past the
                # old end of the file, so it reads as zeros (a hole).
                sector = self._allocate_grain(grain)
            file_offset = sector * SECTOR + within
            part = data[position : position + count]
            if file_offset == run_end:
                runs[-1][1].append(part)
            else:
                runs.append((file_offset, [part]))
            run_end = file_offset + count
        self._unflushed = True
        for file_offset, parts in runs:
            self._file.write_vector(file_offset, parts)

    def zero(self, offset: int, length: int) -> None:
        """Zero the allocated grains of the range in place (punching holes where possible).

        Unallocated grains already read as zeros; allocated ones keep their
        grain (a table entry is never removed, so the order of step 1-5 holds).
        """
        runs: list[list[int]] = []
        for grain, within, _position, count in self._pieces(offset, length):
            sector = self._lookup(grain)
            if sector <= GTE_ZEROED:
                continue
            start = sector * SECTOR + within
            if runs and runs[-1][1] == start:
                runs[-1][1] = start + count
            else:
                runs.append([start, start + count])
        if runs:
            self._unflushed = True
        for start, end in runs:
            self._file.zero(start, end - start)

    def flush(self) -> None:
        """Make data durable, then the tables that point at it, then the directory."""
        if not self._unflushed:
            return
        if self._dirty:
            end = self._next_sector * SECTOR
            if self._file.size() < end:
                self._file.truncate(end)  # whole grains at the tail, as qemu leaves them
            self._file.fdatasync()
            self._write_tables()
            if self._new_tables:
                self._file.fdatasync()
                self._write_directories()
        self._file.fsync()
        self._durable_end = max(self._durable_end, self._next_sector)
        for index, table in self._dirty.items():
            self._remember(index, table)
        self._dirty.clear()
        self._new_tables.clear()
        self._unflushed = False

    def close(self) -> None:
        """Close the file; pending table entries are dropped (their grains leak)."""
        self._file.close()

    # --- tables ---------------------------------------------------------------

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(grain number, offset in grain, offset in the request, length) per grain touched."""
        grain_bytes = self._grain_bytes
        position, end = offset, offset + length
        while position < end:
            grain, within = divmod(position, grain_bytes)
            count = min(grain_bytes - within, end - position)
            yield grain, within, position - offset, count
            position += count

    def _lookup(self, grain: int) -> int:
        """The grain's table entry: its sector, 0 unallocated, 1 zeroed."""
        index, entry = divmod(grain, self._gtes)
        table = self._table(index)
        return 0 if table is None else table[entry]

    def _table(self, index: int) -> array[int] | None:
        table = self._dirty.get(index)
        if table is not None:
            return table
        table = self._clean.get(index)
        if table is not None:
            self._clean.move_to_end(index)
            return table
        sector = self._gd[index]
        if sector == 0:
            return None
        table = self._load_table(index, sector)
        self._remember(index, table)
        return table

    def _remember(self, index: int, table: array[int]) -> None:
        self._clean[index] = table
        self._clean.move_to_end(index)
        while len(self._clean) > self._max_clean:
            self._clean.popitem(last=False)

    def _load_table(self, index: int, sector: int) -> array[int]:
        raw = bytearray(self._gtes * 4)
        self._file.read_into(sector * SECTOR, memoryview(raw))
        table = array("I")
        table.frombytes(raw)
        if _BIG_ENDIAN:
            table.byteswap()
        self._check_table(index, table)
        return table

    def _check_table(self, index: int, table: array[int]) -> None:
        """Every entry is 0, 1 (if zeroed grains are on) or a grain inside the grain area."""
        ordered = sorted(table)
        first_grain = bisect.bisect_right(ordered, GTE_ZEROED)
        bad = None
        zeroed = first_grain > 0 and ordered[first_grain - 1] == GTE_ZEROED
        if zeroed and not self._header.has_zeroed_grains:
            bad = GTE_ZEROED
        if first_grain < len(ordered):
            if ordered[first_grain] < self._header.overhead:
                bad = ordered[first_grain]
            elif ordered[-1] >= self._durable_end:
                bad = ordered[-1]
        if bad is not None:
            raise DiskFormatError(
                f"{self._file.path}: expected grain table {index} to point at grains from "
                f"sector {self._header.overhead} (overHead) to the end of the file (sector "
                f"{self._durable_end}), found an entry {bad}: the file is truncated or corrupt"
            )

    def _allocate_grain(self, grain: int) -> int:
        index, entry = divmod(grain, self._gtes)
        table = self._table_for_update(index)
        sector = self._take_sectors(self._header.grain_sectors)
        table[entry] = sector
        return sector

    def _table_for_update(self, index: int) -> array[int]:
        table = self._dirty.get(index)
        if table is not None:
            return table
        table = self._table(index)
        if table is None:
            # No table yet: one grain-aligned region holds the table and its
            # redundant copy, so grains stay aligned after it.
            header = self._header
            copies = 2 if self._rgd is not None else 1
            grain = header.grain_sectors
            region = -(-header.gt_sectors * copies // grain) * grain
            self._new_tables[index] = self._take_sectors(region)
            table = array("I", bytes(self._gtes * 4))
        else:
            self._clean.pop(index, None)
        self._dirty[index] = table
        return table

    def _take_sectors(self, count: int) -> int:
        sector = self._next_sector
        if sector + count > MAX_SECTOR:
            raise DiskIOError(
                f"{self._file.path}: sparse extent full: a new grain would start at sector "
                f"{sector}, but table entries are 32-bit sector numbers (at most {MAX_SECTOR})",
                errno=errno_codes.EFBIG,
            )
        self._next_sector = sector + count
        return sector

    def _write_tables(self) -> None:
        """Write each changed table and its redundant copy whole, merging adjacent ones."""
        gt_sectors = self._header.gt_sectors
        blocks: list[tuple[int, bytes]] = []
        for index, table in self._dirty.items():
            data = _encode(table)
            new = self._new_tables.get(index)
            primary = self._gd[index] if new is None else new
            blocks.append((primary * SECTOR, data))
            if self._rgd is not None:
                redundant = self._rgd[index] if new is None else new + gt_sectors
                blocks.append((redundant * SECTOR, data))
        self._write_blocks(blocks)

    def _write_directories(self) -> None:
        """Point the directory (and the redundant one) at the new tables."""
        gt_sectors = self._header.gt_sectors
        for index, sector in self._new_tables.items():
            self._gd[index] = sector
            if self._rgd is not None:
                self._rgd[index] = sector + gt_sectors
        blocks: list[tuple[int, bytes]] = []
        for first, last in _index_runs(sorted(self._new_tables)):
            blocks.append(
                (self._header.gd_offset * SECTOR + first * 4, _encode(self._gd[first : last + 1]))
            )
            if self._rgd is not None:
                where = self._header.rgd_offset * SECTOR + first * 4
                blocks.append((where, _encode(self._rgd[first : last + 1])))
        self._write_blocks(blocks)

    def _write_blocks(self, blocks: list[tuple[int, bytes]]) -> None:
        """Write (offset, bytes) blocks, one pwritev per run of adjacent ones."""
        blocks.sort()
        start, parts, end = -1, list[memoryview](), -1
        for offset, data in blocks:
            if offset != end and parts:
                self._file.write_vector(start, parts)
                parts = []
            if not parts:
                start = offset
            parts.append(memoryview(data))
            end = offset + len(data)
        if parts:
            self._file.write_vector(start, parts)


def _encode(table: array[int]) -> bytes:
    if _BIG_ENDIAN:
        table = array("I", table)
        table.byteswap()
    return table.tobytes()


def _index_runs(indexes: list[int]) -> Iterator[tuple[int, int]]:
    """Runs of consecutive numbers in a sorted list, as (first, last)."""
    first = previous = indexes[0]
    for index in indexes[1:]:
        if index != previous + 1:
            yield first, previous
            first = index
        previous = index
    yield first, previous


def _read_directory(
    disk_file: DiskFile, header: SparseHeader, gd_offset: int, file_size: int, what: str
) -> array[int]:
    """Read a grain directory and check that its tables lie inside the file."""
    count = header.gd_entries
    raw = bytearray(count * 4)
    disk_file.read_into(gd_offset * SECTOR, memoryview(raw))
    directory = array("I")
    directory.frombytes(raw)
    if _BIG_ENDIAN:
        directory.byteswap()
    last_start = (file_size - header.gtes_per_gt * 4) // SECTOR
    highest = max(directory, default=0)
    if highest > last_start:
        raise DiskFormatError(
            f"{disk_file.path}: expected the {what} to point at grain tables inside the file "
            f"(up to sector {last_start}), found entry {directory.index(highest)} = {highest}: "
            "the file is truncated or corrupt"
        )
    return directory


def _check_same_tables(path: str, gd: array[int], rgd: array[int]) -> None:
    """The redundant directory must have a table exactly where the directory has one."""
    for index, (primary, redundant) in enumerate(zip(gd, rgd, strict=True)):
        if (primary == 0) != (redundant == 0):
            raise DiskFormatError(
                f"{path}: expected the grain directory and the redundant one to agree, found "
                f"entry {index} = {primary} and redundant entry {index} = {redundant}"
            )
