"""The source disk: a block device or an image file, read by offset.

Reads are positional (``pread``), so several threads may read one source at
once, and a short read is an error: a source that shrinks under the agent
is not one it can replicate.
"""

from __future__ import annotations

import os
import stat
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
