"""Target-disk back-ends of the master target, and how to pick one.

:func:`open_disk` opens a target by its configured format; :func:`create_disk`
makes a new one. Every back-end implements
:class:`~mastertarget.disks.base.TargetDisk` and its durability contract.

=============  ==========================================================
format         back-end
=============  ==========================================================
``raw``        :class:`~mastertarget.disks.raw.RawDisk`: image file or
               block device
``vmdk``       :class:`~mastertarget.disks.vmdk.VmdkDisk`: monolithicSparse
               (detected by its magic), or a descriptor file for
               monolithicFlat, twoGbMaxExtentFlat/Sparse, vmfs
=============  ==========================================================

Limits, each with its reason, live beside the code they bound:
:data:`~mastertarget.disks.vmdk_sparse_header.MAX_GRAIN_SECTORS`,
:data:`~mastertarget.disks.vmdk_sparse_header.MAX_GD_ENTRIES`,
:data:`~mastertarget.disks.vmdk_descriptor.MAX_DESCRIPTOR_BYTES`,
:data:`~mastertarget.disks.vmdk_sparse.TABLE_CACHE_BYTES`,
:data:`~mastertarget.disks.vmdk_sparse.MAX_DIRTY_TABLES`,
:data:`~mastertarget.disks.diskfile.ZERO_CHUNK_BYTES`,
:data:`~mastertarget.disks.raw.MAX_CREATE_BYTES`,
:data:`~mastertarget.disks.vmdk_create.MAX_CREATE_SPARSE_BYTES`.
"""

from __future__ import annotations

import os
from typing import Literal

from mastertarget.disks.base import TargetDisk
from mastertarget.disks.raw import RawDisk, create_raw
from mastertarget.disks.vmdk import VmdkDisk, open_vmdk
from mastertarget.disks.vmdk_create import create_vmdk
from mastertarget.errors import DiskFormatError

OpenFormat = Literal["raw", "vmdk"]
CreateFormat = Literal["raw", "vmdk-sparse", "vmdk-flat"]

__all__ = [
    "CreateFormat",
    "OpenFormat",
    "RawDisk",
    "TargetDisk",
    "VmdkDisk",
    "create_disk",
    "open_disk",
]


def open_disk(path: str | os.PathLike[str], format: OpenFormat) -> TargetDisk:
    """Open a target disk for reading and writing.

    Args:
        path: an image file or block device (``raw``); a monolithicSparse
            file or a descriptor file (``vmdk``, told apart by the magic).
        format: ``raw`` or ``vmdk``.

    Raises:
        DiskFormatError: the format is unknown, or the file is not in it, or
            it is a VMDK kind that cannot be written in place.
        DiskIOError: the file could not be opened or read.
    """
    if format == "raw":
        return RawDisk.open(path)
    if format == "vmdk":
        return open_vmdk(path)
    raise DiskFormatError(f"expected disk format 'raw' or 'vmdk', found {format!r}")


def create_disk(
    path: str | os.PathLike[str],
    format: CreateFormat,
    size: int,
) -> TargetDisk:
    """Create a new, empty target disk and open it.

    The files appear whole or not at all, have mode 0600, and are durable
    (file and directory fsynced) before this returns.

    Args:
        path: the file to create (for ``vmdk-flat`` the descriptor; the data
            goes to ``NAME-flat.vmdk`` beside it).
        format: ``raw`` (sparse file), ``vmdk-sparse`` (monolithicSparse) or
            ``vmdk-flat`` (monolithicFlat).
        size: the virtual size in bytes, a positive multiple of 512.

    Raises:
        DiskSizeError: the size is not whole sectors or above the format's limit.
        DiskExistsError: a file to be created exists; nothing was touched.
        DiskFormatError: the format is unknown.
        DiskIOError: creating or syncing failed.
    """
    if format == "raw":
        return create_raw(path, size)
    if format == "vmdk-sparse":
        return create_vmdk(path, size, "monolithicSparse")
    if format == "vmdk-flat":
        return create_vmdk(path, size, "monolithicFlat")
    raise DiskFormatError(
        f"expected disk format 'raw', 'vmdk-sparse' or 'vmdk-flat', found {format!r}"
    )
