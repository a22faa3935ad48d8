"""Creating VMDK target disks: monolithicSparse and monolithicFlat, laid out as
``qemu-img create -f vmdk`` lays them out (a failback to a new VM).

Each file appears whole or not at all (:func:`~mastertarget.disks.diskfile.create_new_file`),
and what is encoded is parsed back before it is committed to disk.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final, Literal

from mastertarget.disks.diskfile import create_new_file, refuse_existing, sync_directory
from mastertarget.disks.raw import MAX_CREATE_BYTES, check_create_size
from mastertarget.disks.vmdk import VmdkDisk, open_vmdk
from mastertarget.disks.vmdk_descriptor import (
    check_extent_name,
    parse_descriptor,
    render_descriptor,
)
from mastertarget.disks.vmdk_sparse_header import (
    MAX_CREATE_SECTORS,
    SECTOR,
    parse_header,
    sparse_layout,
)
from mastertarget.errors import DiskError, DiskFormatError

Subformat = Literal["monolithicSparse", "monolithicFlat"]
#: Largest VMDK :func:`create_vmdk` makes: sparse extents address 2 TiB with
#: 32-bit sector numbers; flat ones share the raw limit.
MAX_CREATE_SPARSE_BYTES: Final = MAX_CREATE_SECTORS * SECTOR


def create_vmdk(
    path: str | os.PathLike[str], size: int, subformat: Subformat = "monolithicSparse"
) -> VmdkDisk:
    """Create a VMDK laid out as ``qemu-img create -f vmdk`` does, and open it.

    monolithicSparse: one file with header, descriptor, redundant and primary
    grain directories and all grain tables preallocated; no grains.
    monolithicFlat: descriptor ``NAME.vmdk`` and sparse data file
    ``NAME-flat.vmdk``. Adapter type lsilogic. Files have mode 0600, appear
    whole or not at all, and are fsynced with their directory.

    Args:
        path: the VMDK (the descriptor file, for monolithicFlat).
        size: the virtual size in bytes, a positive multiple of 512.
        subformat: ``monolithicSparse`` or ``monolithicFlat``.

    Raises:
        DiskSizeError: the size is not whole sectors or above the limit.
        DiskExistsError: a file to be created exists; nothing was touched.
        DiskFormatError: the file name cannot be written in a descriptor.
        DiskIOError: creating or syncing a file failed.
    """
    target = Path(path)
    check_extent_name(target.name)
    if subformat == "monolithicSparse":
        check_create_size(size, MAX_CREATE_SPARSE_BYTES)
        refuse_existing(target)
        _create_sparse(target, size)
    elif subformat == "monolithicFlat":
        check_create_size(size, MAX_CREATE_BYTES)
        flat = target.with_name(f"{target.stem}-flat{target.suffix}")
        refuse_existing(target, flat)
        _create_flat(target, flat, size)
    else:
        raise DiskFormatError(
            f"expected subformat 'monolithicSparse' or 'monolithicFlat', found {subformat!r}"
        )
    return open_vmdk(target)


def _create_sparse(target: Path, size: int) -> None:
    layout = sparse_layout(size // SECTOR)
    header = layout.header
    extent = f'RW {header.capacity} SPARSE "{target.name}"'
    descriptor = render_descriptor("monolithicSparse", [extent], size)
    if len(descriptor) > header.descriptor_sectors * SECTOR:
        raise DiskFormatError(
            f"{target}: the descriptor ({len(descriptor)} bytes) does not fit the "
            f"{header.descriptor_sectors * SECTOR} bytes reserved for it: use a shorter name"
        )
    encoded = header.encode()
    file_size = header.overhead * SECTOR
    # Parse back what was encoded before it is committed to disk.
    parse_header(encoded, file_size, str(target))
    parse_descriptor(descriptor, str(target))
    pieces = [
        (0, encoded),
        (header.descriptor_offset * SECTOR, descriptor),
        (header.rgd_offset * SECTOR, layout.directory(header.rgd_offset)),
        (header.gd_offset * SECTOR, layout.directory(header.gd_offset)),
    ]
    create_new_file(target, file_size, pieces)


def _create_flat(target: Path, flat: Path, size: int) -> None:
    check_extent_name(flat.name)
    extent = f'RW {size // SECTOR} FLAT "{flat.name}" 0'
    descriptor = render_descriptor("monolithicFlat", [extent], size)
    parse_descriptor(descriptor, str(target))
    # The data file first: a descriptor never names a file that is not there.
    create_new_file(flat, size, [])
    try:
        create_new_file(target, len(descriptor), [(0, descriptor)])
    except DiskError:
        with contextlib.suppress(OSError, DiskError):
            os.unlink(flat)
            sync_directory(flat.parent)
        raise
