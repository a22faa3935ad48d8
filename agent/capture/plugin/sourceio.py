"""The plugin's access to the source disk: positional reads and writes, zeroing,
holes and durability, for an image file or a block device.

Standard library only (the plugin runs in nbdkit's embedded Python):
``fallocate(2)`` is called through ctypes, block devices are zeroed with
the ``BLKZEROOUT`` ioctl.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from typing import Final

#: fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10
#: ioctl(2) that zeroes a byte range of a block device: _IO(0x12, 127).
BLKZEROOUT: Final = 0x127F
#: Block devices are addressed in 512-byte sectors; BLKZEROOUT takes only those.
SECTOR_BYTES: Final = 512
#: Bytes of zeros written at a time where nothing faster zeroes a range.
ZERO_WRITE_BYTES: Final = 2**20
#: errnos that mean "this file system cannot do that fallocate mode".
UNSUPPORTED: Final = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})

#: Extent types of nbdkit's extents callback (NBD_STATE_HOLE, NBD_STATE_ZERO).
EXTENT_DATA: Final = 0
EXTENT_HOLE_ZERO: Final = 0x03

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class NotFastError(OSError):
    """Zeroing would mean writing zeros, and the client asked for a fast zero only."""

    def __init__(self) -> None:
        super().__init__(errno.ENOTSUP, "zeroing this range is not fast")


class SourceFile:
    """The source disk, opened for reading and writing.

    Raises:
        OSError: it cannot be opened, or is neither a regular file nor a block device.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            mode = os.fstat(self.fd).st_mode
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"{path} is neither a regular file nor a block device")
        self.is_file = stat.S_ISREG(mode)

    def close(self) -> None:
        os.close(self.fd)

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; a short read is an error."""
        done = 0
        while done < len(buf):
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"{self.path} ended at byte {offset + done}")
            done += got

    def write(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``."""
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def sync(self) -> None:
        """Make every write so far durable."""
        os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        """Make ``length`` bytes from ``offset`` read as zeros.

        A file: a hole is punched (``may_trim``) or the range zeroed in place
        (fallocate), else zeros are written. A block device: BLKZEROOUT when
        sector-aligned, else zeros are written.

        Raises:
            NotFastError: only writing zeros would do, and ``fast`` was asked.
            OSError: the source refused.
        """
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        zero_range = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        if self.is_file:
            for mode in (punch, zero_range) if may_trim else (zero_range, punch):
                if self._fallocate(mode, offset, length):
                    return
        elif offset % SECTOR_BYTES == 0 and length % SECTOR_BYTES == 0:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
            return
        if fast:
            raise NotFastError
        zeros = memoryview(bytes(min(length, ZERO_WRITE_BYTES)))
        for at in range(offset, offset + length, ZERO_WRITE_BYTES):
            self.write(zeros[: min(ZERO_WRITE_BYTES, offset + length - at)], at)

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        """True if done; False if the file system cannot do ``mode``."""
        if _fallocate(self.fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in UNSUPPORTED:
            return False
        raise OSError(err, f"fallocate of {self.path} at byte {offset}: {os.strerror(err)}")

    def extents(self, offset: int, length: int, *, one: bool) -> list[tuple[int, int, int]]:
        """``(offset, length, type)`` of the data and the holes from ``offset`` (a file only).

        Args:
            one: the client wants the first extent only.
        """
        end = min(offset + length, self.size)
        found: list[tuple[int, int, int]] = []
        at = offset
        while at < end and not (one and found):
            try:
                data = os.lseek(self.fd, at, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data from here to the end
                    raise
                data = self.size
            if data > at:
                stop = min(data, end)
                found.append((at, stop - at, EXTENT_HOLE_ZERO))
            else:
                stop = min(os.lseek(self.fd, at, os.SEEK_HOLE), end)
                found.append((at, stop - at, EXTENT_DATA))
            at = stop
        return found
