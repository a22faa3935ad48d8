"""Positioned I/O on one file or block device, shared by every back-end.

:class:`DiskFile` wraps a file descriptor with the calls the back-ends need —
read, write and zero at an offset, fdatasync, fsync — and turns every
``OSError`` into a :class:`~mastertarget.errors.DiskIOError` that names the
path, the operation, the range and the errno. :func:`create_new_file` makes a
new sparse file that appears under its final name only when complete.

Zeroing deallocates where the kernel can: ``fallocate(PUNCH_HOLE)`` on
regular files, the ``BLKZEROOUT`` ioctl on block devices (which lets thin
storage unmap), and plain zero writes where neither is supported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_codes
import fcntl
import os
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Self

from mastertarget.disks.base import Buffer
from mastertarget.errors import DiskExistsError, DiskFormatError, DiskIOError, DiskRangeError
from runtime.crashsafe import fsync_dir, temp_name_for, write_all
from runtime.errors import DurabilityError

#: The unit of every disk format here: VMDK counts in 512-byte sectors.
SECTOR_SIZE: Final = 512
#: Largest zero write when the kernel cannot punch holes or zero a range: big
#: enough that zeroing a GiB costs a thousand calls, small enough that the one
#: shared buffer of zeros stays a trivial allocation.
ZERO_CHUNK_BYTES: Final = 1 << 20
#: Permissions of files created here: they hold a protected machine's disk,
#: which only the master target's service user may read.
NEW_FILE_MODE: Final = 0o600

# linux/falloc.h
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
# linux/fs.h: _IO(0x12, 127) and _IO(0x12, 104)
BLKZEROOUT: Final = 0x127F
BLKSSZGET: Final = 0x1268
#: errnos that mean "this file system or device cannot do that": fall back to
#: writing zeros instead of failing the zero.
_UNSUPPORTED_ERRNOS: Final = frozenset(
    {errno_codes.EOPNOTSUPP, errno_codes.ENOSYS, errno_codes.ENOTTY, errno_codes.EINVAL}
)

_ZEROS: Final = memoryview(bytes(ZERO_CHUNK_BYTES))
_RANGE: Final = struct.Struct("=QQ")  # struct { uint64 start, len } of BLKZEROOUT

FallocateFn = Callable[[int, int, int, int], int]


def _load_fallocate() -> FallocateFn | None:
    """libc's fallocate(2) with a 64-bit offset, or None (os.posix_fallocate cannot punch)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for name in ("fallocate64", "fallocate"):
        function = getattr(libc, name, None)
        if function is None:
            continue
        if name == "fallocate" and ctypes.sizeof(ctypes.c_long) != 8:
            continue  # 32-bit off_t: offsets past 2 GiB would be cut
        function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        function.restype = ctypes.c_int
        return function  # type: ignore[no-any-return]
    return None


_FALLOCATE: Final = _load_fallocate()


def io_error(
    operation: str, path: str, exc: OSError, *, offset: int | None = None, length: int = 0
) -> DiskIOError:
    """A DiskIOError naming the operation, the path, the range (if any) and the errno."""
    code = exc.errno
    name = errno_codes.errorcode.get(code, str(code)) if code is not None else "no errno"
    reason = exc.strerror or str(exc)
    where = f"{length} bytes at offset {offset} of " if offset is not None else ""
    return DiskIOError(f"{operation} of {where}{path} failed: {reason} ({name})", errno=code)


def check_range(path: str, size: int, offset: int, length: int) -> None:
    """Refuse a range that is not inside a disk of ``size`` bytes.

    Raises:
        DiskRangeError: ``offset`` or ``length`` is negative or the range ends past ``size``.
    """
    if offset < 0 or length < 0 or offset + length > size:
        raise DiskRangeError(
            f"expected a range inside {path} (disk size {size} bytes), "
            f"found offset {offset} length {length} (end {offset + length})"
        )


class DiskFile:
    """An open regular file or block device read and written at offsets.

    Every method turns an ``OSError`` into a :class:`DiskIOError` naming the
    operation, the path, the range and the errno. Not thread-safe: one
    back-end object owns it.
    """

    def __init__(self, path: str, fd: int, *, is_block_device: bool) -> None:
        self.path = path
        self.fd = fd
        self.is_block_device = is_block_device
        self._can_punch = _FALLOCATE is not None and not is_block_device
        self._can_zeroout = is_block_device
        self._logical_block = SECTOR_SIZE

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Self:
        """Open a regular file or block device for reading and writing.

        A block device is opened with O_EXCL: Linux then refuses it (EBUSY)
        while it is mounted or held by another exclusive opener, so a target
        device can never be written under a live file system.

        Raises:
            DiskFormatError: the path is neither a regular file nor a block device.
            DiskIOError: it could not be opened (missing, no permission, busy).
        """
        name = os.fspath(path)
        try:
            info = os.stat(name)
        except OSError as exc:
            raise io_error("open", name, exc) from exc
        is_block = stat.S_ISBLK(info.st_mode)
        if not is_block and not stat.S_ISREG(info.st_mode):
            raise DiskFormatError(
                f"expected a regular file or a block device at {name}, "
                f"found file mode {stat.filemode(info.st_mode)}"
            )
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if is_block else 0)
        try:
            fd = os.open(name, flags)
        except OSError as exc:
            raise io_error("open", name, exc) from exc
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            os.close(fd)  # the path was replaced between stat and open
            raise DiskIOError(f"{name} changed while it was being opened; try again")
        disk_file = cls(name, fd, is_block_device=is_block)
        if is_block:
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(fd, BLKSSZGET, b"\0\0\0\0")
                disk_file._logical_block = max(SECTOR_SIZE, struct.unpack("=i", packed)[0])
        return disk_file

    def size(self) -> int:
        """The file size, or the device size (lseek to the end works for both)."""
        try:
            return os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as exc:
            raise io_error("size query", self.path, exc) from exc

    def read_into(self, offset: int, buffer: memoryview, *, eof_is_zeros: bool = False) -> None:
        """Fill ``buffer`` from ``offset``, resuming after short reads.

        Args:
            eof_is_zeros: bytes past the end of the file read as zeros (the
                buffer must arrive zeroed) instead of being an error.
        """
        done = 0
        total = buffer.nbytes
        while done < total:
            try:
                got = os.preadv(self.fd, [buffer[done:]], offset + done)
            except OSError as exc:
                raise io_error("read", self.path, exc, offset=offset, length=total) from exc
            if got == 0:
                if eof_is_zeros:
                    return
                raise DiskIOError(
                    f"read of {total} bytes at offset {offset} of {self.path} ended at "
                    f"offset {offset + done}: the file is shorter than expected",
                    errno=errno_codes.EIO,
                )
            done += got

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; the end of the file is an error."""
        try:
            data = os.pread(self.fd, length, offset)  # one copy, from the page cache
        except OSError as exc:
            raise io_error("read", self.path, exc, offset=offset, length=length) from exc
        if len(data) == length:
            return data
        buffer = bytearray(length)  # a short read: resume where it stopped
        buffer[: len(data)] = data
        self.read_into(offset + len(data), memoryview(buffer)[len(data) :])
        return bytes(buffer)

    def write(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset``, resuming after short writes."""
        self.write_vector(offset, [memoryview(data).cast("B")])

    def write_vector(self, offset: int, parts: Sequence[memoryview]) -> None:
        """Write ``parts`` back to back from ``offset`` with pwritev(2), no copy."""
        try:
            write_all(self.fd, parts, offset)
        except OSError as exc:
            total = sum(part.nbytes for part in parts)
            raise io_error("write", self.path, exc, offset=offset, length=total) from exc

    def zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes from ``offset`` read as zeros, deallocating where possible."""
        if length <= 0:
            return
        if self._can_punch and self._punch(offset, length):
            return
        if self._can_zeroout:
            self._zero_device(offset, length)
            return
        self.write_zeros(offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        """Write zeros over the range, in chunks of :data:`ZERO_CHUNK_BYTES`."""
        position, end = offset, offset + length
        while position < end:
            step = min(ZERO_CHUNK_BYTES, end - position)
            self.write_vector(position, [_ZEROS[:step]])
            position += step

    def _punch(self, offset: int, length: int) -> bool:
        """Punch a hole (reads as zeros, frees the space); False if unsupported here."""
        assert _FALLOCATE is not None
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _FALLOCATE(self.fd, mode, offset, length) == 0:
            return True
        code = ctypes.get_errno()
        if code in _UNSUPPORTED_ERRNOS:
            self._can_punch = False
            return False
        raise io_error(
            "punch hole", self.path, OSError(code, os.strerror(code)), offset=offset, length=length
        )

    def _zero_device(self, offset: int, length: int) -> None:
        """BLKZEROOUT the aligned middle of the range, write zeros over the edges."""
        block = self._logical_block
        start = -(-offset // block) * block
        end = (offset + length) // block * block
        if end <= start:
            self.write_zeros(offset, length)
            return
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, _RANGE.pack(start, end - start))
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED_ERRNOS:
                raise io_error(
                    "BLKZEROOUT", self.path, exc, offset=start, length=end - start
                ) from exc
            self._can_zeroout = False
            self.write_zeros(offset, length)
            return
        self.write_zeros(offset, start - offset)
        self.write_zeros(end, offset + length - end)

    def truncate(self, size: int) -> None:
        """Set the file size (extend with a hole or cut)."""
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise io_error(f"truncate to {size} bytes", self.path, exc) from exc

    def fdatasync(self) -> None:
        """Make the data written so far durable (and the size, not other metadata)."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise io_error("fdatasync", self.path, exc) from exc

    def fsync(self) -> None:
        """Make everything written so far durable, metadata included."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise io_error("fsync", self.path, exc) from exc

    def close(self) -> None:
        """Close the descriptor (idempotent). Does not flush."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError as exc:
            raise io_error("close", self.path, exc) from exc


def refuse_existing(*paths: Path) -> None:
    """Raise DiskExistsError if any of ``paths`` exists (a dangling symlink counts)."""
    for path in paths:
        if os.path.lexists(path):
            raise _exists(path)


def create_new_file(path: Path, size: int, pieces: Sequence[tuple[int, bytes]]) -> None:
    """Create ``path`` as a sparse file of ``size`` bytes holding ``pieces``, durably.

    The file is written and fsynced under a temp name, then hard-linked to
    ``path``: link(2) never replaces an existing name, and ``path`` never
    shows a partial file. The directory is fsynced last.

    Args:
        path: the file to create.
        size: its size in bytes; everything outside ``pieces`` reads as zeros.
        pieces: ``(offset, bytes)`` to write.

    Raises:
        DiskExistsError: ``path`` exists; it was not touched.
        DiskIOError: any step failed; ``path`` was not created.
    """
    temp = path.parent / temp_name_for(path.name)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(temp, flags, NEW_FILE_MODE)
    except OSError as exc:
        raise io_error("create", os.fspath(temp), exc) from exc
    new_file = DiskFile(os.fspath(temp), fd, is_block_device=False)
    try:
        try:
            os.fchmod(fd, NEW_FILE_MODE)
        except OSError as exc:
            raise io_error("chmod", new_file.path, exc) from exc
        new_file.truncate(size)
        for offset, data in pieces:
            new_file.write(offset, data)
        new_file.fsync()
        new_file.close()
        try:
            os.link(temp, path, follow_symlinks=False)
        except FileExistsError:
            raise _exists(path) from None
        except OSError as exc:
            raise io_error("link", os.fspath(path), exc) from exc
    finally:
        new_file.close()
        with contextlib.suppress(OSError):
            os.unlink(temp)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """fsync a directory so that the files created in it survive a crash.

    Raises:
        DiskIOError: the directory could not be opened or fsynced.
    """
    try:
        fsync_dir(directory)
    except DurabilityError as exc:
        raise DiskIOError(exc.message, errno=exc.errno) from exc


def _exists(path: Path) -> DiskExistsError:
    return DiskExistsError(
        f"expected no file at {path} to create a disk there, found one; it was left as it was"
    )
