"""Raw target disks: an image file or a block device, byte for byte the source disk.

The simplest back-end and the fastest: a write is one pwrite(2), a zero
punches a hole (file) or issues BLKZEROOUT (device), and :meth:`RawDisk.flush`
is one fsync(2), issued only if something was written since the last flush.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from mastertarget.disks.base import Buffer, FailureLatch
from mastertarget.disks.diskfile import SECTOR_SIZE, DiskFile, check_range, create_new_file
from mastertarget.errors import DiskSizeError

#: Largest raw file :func:`create_raw` makes: 64 TiB is more than any disk a
#: vSphere VM or a physical server protected here has (VMFS caps a disk at
#: 62 TiB); a bigger size is a typo that ext4 would refuse anyway (16 TiB).
MAX_CREATE_BYTES: Final = 64 << 40


class RawDisk:
    """A raw image file or block device open as a target disk.

    Not thread-safe. After a write, zero or flush fails the object refuses
    every further change (:class:`~mastertarget.disks.base.FailureLatch`);
    reopen to recover.
    """

    def __init__(self, disk_file: DiskFile) -> None:
        self._file = disk_file
        self._size = disk_file.size()
        self._unflushed = False
        self._latch = FailureLatch(disk_file.path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RawDisk:
        """Open a raw image file or block device.

        Raises:
            DiskFormatError: the path is neither a regular file nor a block device.
            DiskIOError: it could not be opened (missing, no permission, a
                mounted device: EBUSY).
        """
        disk_file = DiskFile.open(path)
        try:
            return cls(disk_file)
        except BaseException:
            disk_file.close()
            raise

    @property
    def size(self) -> int:
        """The virtual size in bytes: the file size or the device size."""
        return self._size

    @property
    def path(self) -> str:
        """The file or device path as opened."""
        return self._file.path

    @property
    def is_block_device(self) -> bool:
        """Whether the target is a block device rather than a file."""
        return self._file.is_block_device

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``.

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the read failed.
        """
        check_range(self.path, self._size, offset, length)
        return self._file.read(offset, length)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from ``offset``.

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the read failed.
        """
        check_range(self.path, self._size, offset, buffer.nbytes)
        self._file.read_into(offset, buffer)

    def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset`` (pwrite, resumed after short writes).

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the write failed, or an earlier one did.
        """
        view = memoryview(data).cast("B")
        check_range(self.path, self._size, offset, view.nbytes)
        with self._latch.guard():
            self._unflushed = True
            self._file.write(offset, view)

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros: punch a hole in a file, BLKZEROOUT a device.

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the zeroing failed, or an earlier change did.
        """
        check_range(self.path, self._size, offset, length)
        with self._latch.guard():
            self._unflushed = True
            self._file.zero(offset, length)

    def flush(self) -> None:
        """fsync the file or device if anything changed since the last flush.

        Raises:
            DiskIOError: fsync failed (the changes since the last flush are
                lost), or an earlier change failed.
        """
        with self._latch.guard():
            if not self._unflushed:
                return
            self._file.fsync()
            self._unflushed = False

    def close(self) -> None:
        """Close the file; does not flush."""
        self._file.close()


def create_raw(path: str | os.PathLike[str], size: int) -> RawDisk:
    """Create a sparse raw image file of ``size`` bytes and open it.

    The file appears complete or not at all, is fsynced with its directory
    before this returns, and has mode 0600.

    Raises:
        DiskSizeError: ``size`` is not a positive multiple of 512 or is above
            :data:`MAX_CREATE_BYTES`.
        DiskExistsError: ``path`` exists; it was left as it was.
        DiskIOError: creating, fsyncing or opening failed.
    """
    check_create_size(size, MAX_CREATE_BYTES)
    target = Path(path)
    create_new_file(target, size, [])
    return RawDisk.open(target)


def check_create_size(size: int, limit: int) -> None:
    """Refuse a size that is not a positive whole number of sectors up to ``limit``.

    Raises:
        DiskSizeError: it is not.
    """
    if size <= 0 or size % SECTOR_SIZE or size > limit:
        raise DiskSizeError(
            f"expected a disk size that is a positive multiple of {SECTOR_SIZE} bytes "
            f"and at most {limit} bytes, found {size}"
        )
