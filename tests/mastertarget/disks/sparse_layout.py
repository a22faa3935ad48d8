"""Reading a monolithicSparse file's tables straight from its bytes, for assertions.

Written from the VMware layout (header fields at fixed offsets, little-endian
uint32 directories and tables), independently of mastertarget.disks, so a
test can check what the back-end left in the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tables:
    """The directories and grain tables of one sparse file."""

    grain_sectors: int
    overhead: int
    gd: list[int]
    rgd: list[int]
    gts: list[list[int]]  # by directory index; [] where the entry is 0
    rgts: list[list[int]]


def read_tables(path: Path) -> Tables:
    data = path.read_bytes()
    capacity, grain = struct.unpack_from("<QQ", data, 12)
    gtes = struct.unpack_from("<I", data, 44)[0]
    rgd_offset, gd_offset, overhead = struct.unpack_from("<QQQ", data, 48)
    count = -(-capacity // (grain * gtes))

    def directory(sector: int) -> list[int]:
        return list(struct.unpack_from(f"<{count}I", data, sector * 512))

    def tables(entries: list[int]) -> list[list[int]]:
        return [
            list(struct.unpack_from(f"<{gtes}I", data, entry * 512)) if entry else []
            for entry in entries
        ]

    gd, rgd = directory(gd_offset), directory(rgd_offset)
    return Tables(grain, overhead, gd, rgd, tables(gd), tables(rgd))


def allocated_grains(tables: Tables) -> list[int]:
    """Sectors of every allocated grain (entries above 1)."""
    return [entry for table in tables.gts for entry in table if entry > 1]


def set_directory_entry(path: Path, index: int, value: int) -> None:
    """Overwrite entry ``index`` of both grain directories (to fake a missing table)."""
    with open(path, "r+b") as handle:
        header = handle.read(512)
        for sector in struct.unpack_from("<QQ", header, 48):
            handle.seek(sector * 512 + index * 4)
            handle.write(struct.pack("<I", value))
