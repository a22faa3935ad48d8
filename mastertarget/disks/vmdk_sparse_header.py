"""The hosted sparse extent header ("KDMV") and the layout of a new sparse extent.

VMware "Virtual Disk Format 1.1", section "Hosted Sparse Extent Header";
qemu block/vmdk.c ``VMDK4Header``. One 512-byte sector, little-endian, packed:

    offset size field
         0    4 magicNumber        "KDMV"
         4    4 version            1, 2 (zeroed-grain GTEs) or 3 (persistent CBT)
         8    4 flags              bit 0 newline test valid, bit 1 redundant grain
                                   directory, bit 2 zeroed-grain GTEs, bit 16
                                   compressed grains, bit 17 markers
        12    8 capacity           virtual size, sectors
        20    8 grainSize          sectors per grain, a power of two >= 8
        28    8 descriptorOffset   sectors (0: no embedded descriptor)
        36    8 descriptorSize     sectors
        44    4 numGTEsPerGT       grain table entries per grain table (512)
        48    8 rgdOffset          redundant grain directory, sectors
        56    8 gdOffset           grain directory, sectors (~0: stream footer)
        64    8 overHead           sectors of metadata before the first grain
        72    1 uncleanShutdown
        73    4 newline test       "\\n \\r\\n": proves no text-mode transfer
        77    2 compressAlgorithm  0 none, 1 deflate
        79  433 pad

The grain directory (GD) holds one uint32 per grain table (GT): the table's
sector, 0 for none yet. A GT holds numGTEsPerGT uint32 grain entries (GTEs):
the grain's sector, 0 unallocated (reads as zeros), 1 zeroed when flag bit 2
is set. The redundant GD and GTs are a second copy kept in step.

Every field is checked, in the order magic -> version -> flags -> sizes ->
offsets inside the file, before any table is read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from mastertarget.disks.vmdk_descriptor import (
    CONVERT_HINT,
    MAX_DESCRIPTOR_BYTES,
    REFUSED_CREATE_TYPES,
)
from mastertarget.errors import DiskFormatError

SECTOR: Final = 512
HEADER: Final = struct.Struct("<4sIIQQQQIQQQB4sH433x")
MAGIC: Final = b"KDMV"
#: The magic of ESX 2 / vmfsSparse delta extents ("COWD"): a different format.
COWD_MAGIC: Final = b"COWD"
NEWLINE_TEST: Final = b"\n \r\n"

FLAG_NEWLINE_TEST: Final = 1 << 0
FLAG_REDUNDANT_GD: Final = 1 << 1
FLAG_ZEROED_GRAIN: Final = 1 << 2
FLAG_COMPRESSED: Final = 1 << 16
FLAG_MARKERS: Final = 1 << 17
KNOWN_FLAGS: Final = (
    FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD | FLAG_ZEROED_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS
)
#: gdOffset of a streamOptimized extent whose directory is in the footer.
GD_AT_END: Final = 0xFFFFFFFFFFFFFFFF
#: A GTE (with FLAG_ZEROED_GRAIN) for a grain that reads as zeros without data.
GTE_ZEROED: Final = 1

#: Grain size qemu and VMware write: 128 sectors, 64 KiB.
DEFAULT_GRAIN_SECTORS: Final = 128
#: Smallest grain the specification allows (8 sectors, 4 KiB).
MIN_GRAIN_SECTORS: Final = 8
#: Largest grain accepted: a partial write to a new grain may need one grain
#: of buffer, and the grain tables in memory cover grain x 512 bytes each.
#: 1 MiB is 16 x what any writer uses; qemu stops at 1 GiB, far too much to buffer.
MAX_GRAIN_SECTORS: Final = 2048
#: Grain table entries per table, as the specification fixes it; qemu refuses more.
GTES_PER_GT: Final = 512
#: Largest grain directory read into memory (two copies are held): 4 M tables
#: cover 128 TiB at the default grain, 64 x the 2 TiB a hosted sparse extent
#: can address with 32-bit sector offsets. A bigger one is a corrupt header.
MAX_GD_ENTRIES: Final = 1 << 22
#: Sector numbers in GDs and GTs are uint32: no grain or table can start at or
#: past sector 2**32 (2 TiB into the file).
MAX_SECTOR: Final = 1 << 32
#: Largest disk :func:`sparse_layout` creates: 2 TiB less 512 MiB. Grain
#: offsets are 32-bit sector numbers, so the whole file must stay under
#: 2 TiB; the 512 MiB leave room for the tables (256 MiB for both copies at
#: this size) when every grain is written.
MAX_CREATE_SECTORS: Final = (1 << 32) - (1 << 20)
#: Descriptor area qemu reserves in a new monolithicSparse file (20 sectors).
NEW_DESCRIPTOR_SECTORS: Final = 20
_STREAM = REFUSED_CREATE_TYPES["streamOptimized"]


@dataclass(frozen=True, slots=True)
class SparseHeader:
    """A checked sparse extent header. Offsets and sizes are in sectors."""

    version: int
    flags: int
    capacity: int
    grain_sectors: int
    descriptor_offset: int
    descriptor_sectors: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int

    @property
    def has_redundant_gd(self) -> bool:
        """Whether a redundant grain directory and tables must be kept in step."""
        return bool(self.flags & FLAG_REDUNDANT_GD)

    @property
    def has_zeroed_grains(self) -> bool:
        """Whether GTE value 1 means "reads as zeros"."""
        return bool(self.flags & FLAG_ZEROED_GRAIN)

    @property
    def gd_entries(self) -> int:
        """Grain tables needed to cover the capacity."""
        coverage = self.grain_sectors * self.gtes_per_gt
        return -(-self.capacity // coverage)

    @property
    def gt_sectors(self) -> int:
        """Sectors one grain table occupies."""
        return -(-self.gtes_per_gt * 4 // SECTOR)

    def encode(self) -> bytes:
        """The 512-byte header sector."""
        return HEADER.pack(
            MAGIC, self.version, self.flags, self.capacity, self.grain_sectors,
            self.descriptor_offset, self.descriptor_sectors, self.gtes_per_gt,
            self.rgd_offset, self.gd_offset, self.overhead, 0, NEWLINE_TEST, 0,
        )  # fmt: skip


def parse_header(sector: bytes, file_size: int, source: str) -> SparseHeader:
    """Check and decode a sparse extent header against the size of its file.

    Args:
        sector: the first 512 bytes of the file (fewer if the file is shorter).
        file_size: the file's size in bytes.
        source: the file, for error messages.

    Raises:
        DiskFormatError: any field is wrong, or the extent is of a kind that
            is not written in place (compressed, version 3).
    """
    if len(sector) < SECTOR:
        raise DiskFormatError(
            f"{source}: expected a sparse extent of at least {SECTOR} bytes, found {len(sector)}"
        )
    (magic, version, flags, capacity, grain, desc_offset, desc_sectors, gtes, rgd, gd,
     overhead, _unclean, newline, compression) = HEADER.unpack(sector)  # fmt: skip
    if magic != MAGIC:
        raise DiskFormatError(f"{source}: expected sparse extent magic {MAGIC!r}, found {magic!r}")
    if version not in (1, 2, 3):
        raise DiskFormatError(
            f"{source}: expected sparse extent version 1, 2 or 3, found {version}"
        )
    if flags & (FLAG_COMPRESSED | FLAG_MARKERS) or compression or gd == GD_AT_END:
        raise DiskFormatError(
            f"{source}: compressed grains (streamOptimized: flags {flags:#x}, compression "
            f"{compression}) are not written in place: {_STREAM}"
        )
    if version == 3:
        raise DiskFormatError(
            f"{source}: sparse extent version 3 carries persistent changed-block tracking "
            "(VMware KB 2064959) that writes here would make wrong; qemu opens it read-only "
            f"too. Convert it: {CONVERT_HINT}"
        )
    if flags & ~KNOWN_FLAGS:
        raise DiskFormatError(
            f"{source}: expected only flag bits {KNOWN_FLAGS:#x}, found {flags:#x}"
        )
    if flags & FLAG_NEWLINE_TEST and newline != NEWLINE_TEST:
        raise DiskFormatError(
            f"{source}: expected newline test bytes {NEWLINE_TEST!r}, found {newline!r}: "
            "the file was corrupted, e.g. by a text-mode transfer"
        )
    _check_sizes(source, capacity, grain, gtes)
    header = SparseHeader(
        version=version,
        flags=flags,
        capacity=capacity,
        grain_sectors=grain,
        descriptor_offset=desc_offset,
        descriptor_sectors=desc_sectors,
        gtes_per_gt=gtes,
        rgd_offset=rgd if flags & FLAG_REDUNDANT_GD else 0,
        gd_offset=gd,
        overhead=overhead,
    )
    _check_offsets(header, file_size, source)
    return header


def _check_sizes(source: str, capacity: int, grain: int, gtes: int) -> None:
    if not MIN_GRAIN_SECTORS <= grain <= MAX_GRAIN_SECTORS or grain & (grain - 1):
        raise DiskFormatError(
            f"{source}: expected a grain size that is a power of two from {MIN_GRAIN_SECTORS} "
            f"to {MAX_GRAIN_SECTORS} sectors, found {grain}"
        )
    if not 1 <= gtes <= GTES_PER_GT:
        raise DiskFormatError(
            f"{source}: expected 1 to {GTES_PER_GT} entries per grain table, found {gtes}"
        )
    if capacity <= 0:
        raise DiskFormatError(f"{source}: expected a positive capacity, found {capacity} sectors")
    entries = -(-capacity // (grain * gtes))
    if entries > MAX_GD_ENTRIES:
        raise DiskFormatError(
            f"{source}: expected at most {MAX_GD_ENTRIES} grain tables, found a capacity of "
            f"{capacity} sectors that needs {entries}"
        )


def _check_offsets(header: SparseHeader, file_size: int, source: str) -> None:
    """Every region the header names must lie inside the file and below overHead."""
    file_sectors = file_size // SECTOR
    if not 1 <= header.overhead <= file_sectors:
        raise DiskFormatError(
            f"{source}: expected overHead (first grain) between sector 1 and the end of the "
            f"file (sector {file_sectors}), found {header.overhead}"
        )
    desc_bytes = header.descriptor_sectors * SECTOR
    if header.descriptor_offset == 0:
        if header.descriptor_sectors:
            raise DiskFormatError(
                f"{source}: expected descriptorSize 0 without a descriptor, "
                f"found {header.descriptor_sectors}"
            )
    else:
        if desc_bytes > MAX_DESCRIPTOR_BYTES or header.descriptor_sectors == 0:
            raise DiskFormatError(
                f"{source}: expected a descriptor of 1 to {MAX_DESCRIPTOR_BYTES // SECTOR} "
                f"sectors, found {header.descriptor_sectors}"
            )
        _check_region(source, "descriptor", header.descriptor_offset, desc_bytes, header)
    gd_bytes = header.gd_entries * 4
    _check_region(source, "grain directory", header.gd_offset, gd_bytes, header)
    if header.has_redundant_gd:
        _check_region(source, "redundant grain directory", header.rgd_offset, gd_bytes, header)


def _check_region(source: str, what: str, offset: int, length: int, header: SparseHeader) -> None:
    end = offset * SECTOR + length
    if offset < 1 or end > header.overhead * SECTOR:
        raise DiskFormatError(
            f"{source}: expected the {what} between sector 1 and overHead (sector "
            f"{header.overhead}), found it at sector {offset} ending at byte {end}"
        )


@dataclass(frozen=True, slots=True)
class SparseLayout:
    """Where qemu puts the parts of a new monolithicSparse file (sectors)."""

    header: SparseHeader
    gd_sectors: int

    def directory(self, gd_offset: int) -> bytes:
        """A grain directory at ``gd_offset`` whose tables follow it back to back."""
        first = gd_offset + self.gd_sectors
        step = self.header.gt_sectors
        entries = [first + index * step for index in range(self.header.gd_entries)]
        return struct.pack(f"<{len(entries)}I", *entries)


def sparse_layout(capacity: int) -> SparseLayout:
    """The layout ``qemu-img create -f vmdk`` gives a sparse extent (qemu vmdk_init_extent).

    Header (sector 0), descriptor (sectors 1-20), redundant GD, its GTs, GD,
    its GTs, then grains from the next multiple of the grain size. Every GT is
    preallocated, so a write never has to allocate one.

    Args:
        capacity: the virtual size in sectors.
    """
    grain = DEFAULT_GRAIN_SECTORS
    gt_sectors = -(-GTES_PER_GT * 4 // SECTOR)
    gt_count = -(-capacity // (grain * GTES_PER_GT))
    gd_sectors = -(-gt_count * 4 // SECTOR)
    desc_offset, desc_sectors = 1, NEW_DESCRIPTOR_SECTORS
    rgd = desc_offset + desc_sectors
    gd = rgd + gd_sectors + gt_sectors * gt_count
    end = gd + gd_sectors + gt_sectors * gt_count
    header = SparseHeader(
        version=1,
        flags=FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD,
        capacity=capacity,
        grain_sectors=grain,
        descriptor_offset=desc_offset,
        descriptor_sectors=desc_sectors,
        gtes_per_gt=GTES_PER_GT,
        rgd_offset=rgd,
        gd_offset=gd,
        overhead=-(-end // grain) * grain,
    )
    return SparseLayout(header=header, gd_sectors=gd_sectors)
