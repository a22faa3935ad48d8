"""The source disk: a block device or an image file, read by offset.

Reads are positional (``pread``), so several threads may read one source at
once, and a short read is an error: a source that shrinks under the agent
is not one it can replicate.

An image file is also hashed through a memory map (:meth:`SourceDisk.mapped`):
its pages are hashed where the page cache holds them, without the copy a
read makes, which costs more than the hashing itself. A block device is
always read: its bytes come from the device, and large reads serve it best.
A file truncated while it is mapped would kill the agent with SIGBUS, so
each mapping is made only after the file was checked to reach its end; a
killed sync goes on where it stopped when run again.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from agent.errors import SourceError

#: Bytes read per system call when hashing: a multiple of every chunk size
#: (4 KiB .. 4 MiB), large enough that the call overhead vanishes, small
#: enough to stay in the CPU caches while it is hashed.
READ_PIECE_BYTES: Final = 4 * 2**20


class SourceDisk:
    """An open source disk.

    Args:
        path: a regular file (raw image) or a block device.

    Raises:
        SourceError: it cannot be opened, is neither a regular file nor a
            block device, or is empty.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(
                f"cannot open source {path}: {exc.strerror or exc}; expected a readable "
                "block device or raw image file"
            ) from exc
        try:
            info = os.fstat(self._fd)
            # SEEK_END gives the size of block devices as well as of files.
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(self._fd)
            raise SourceError(f"cannot find the size of source {path}: {exc.strerror}") from exc
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
            os.close(self._fd)
            raise SourceError(
                f"source {path} must be a block device or a regular file (a raw image), "
                f"found {_kind(info.st_mode)}"
            )
        if self.size == 0:
            os.close(self._fd)
            raise SourceError(f"source {path} is empty: expected a disk of at least one byte")
        #: whether :meth:`mapped` maps (a regular file) rather than reads (a device)
        self.mappable = stat.S_ISREG(info.st_mode)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> SourceDisk:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytearray:
        """``length`` bytes from ``offset``.

        Raises:
            SourceError: the read failed or the source ended early.
        """
        buffer = bytearray(length)
        self.read_into(offset, memoryview(buffer))
        return buffer

    @contextlib.contextmanager
    def mapped(self, offset: int, length: int) -> Iterator[memoryview | None]:
        """``length`` bytes from ``offset`` as a read-only view of a memory map.

        ``offset`` must be a multiple of :data:`mmap.ALLOCATIONGRANULARITY`.
        Yields None for a block device: read it instead. The view is valid
        inside the ``with`` block only.

        Raises:
            SourceError: the file no longer reaches ``offset + length``, or
                cannot be mapped.
        """
        if not self.mappable:
            yield None
            return
        try:
            now = os.fstat(self._fd).st_size
            if now < offset + length:
                raise SourceError(
                    f"source {self.path} is now {now} bytes, expected at least "
                    f"{offset + length} (it was {self.size} bytes when opened)"
                )
            region = mmap.mmap(self._fd, length, prot=mmap.PROT_READ, offset=offset)
        except OSError as exc:
            raise SourceError(f"cannot map source {self.path} at byte {offset}: {exc}") from exc
        try:
            region.madvise(mmap.MADV_SEQUENTIAL)
            with memoryview(region) as view:
                yield view
        finally:
            region.close()

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes from ``offset``.

        Raises:
            SourceError: the read failed or the source ended early.
        """
        done = 0
        total = len(view)
        while done < total:
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as exc:
                raise SourceError(
                    f"cannot read source {self.path} at byte {offset + done}: {exc.strerror or exc}"
                ) from exc
            if got == 0:
                raise SourceError(
                    f"source {self.path} ended at byte {offset + done}, expected "
                    f"{total - done} more bytes (it was {self.size} bytes when opened)"
                )
            done += got


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "another kind of file"
