"""The interface every target-disk back-end implements.

The applier sees a target disk as a flat array of bytes of a fixed size with
five operations. Back-ends: raw image files and block devices
(:mod:`mastertarget.disks.raw`), VMDK monolithicFlat and monolithicSparse
(:mod:`mastertarget.disks.vmdk`). :func:`mastertarget.disks.open_disk` picks
one by the configured format.

Durability contract (docs/design.md invariants 1 and 3): after :meth:`flush`
returns, every write and zero issued before it survives power loss, including
any metadata the back-end needed to make it readable (a sparse VMDK's grain
tables). Before :meth:`flush`, a crash may leave any subset of the writes,
but never metadata pointing at data that is not durable. A back-end that saw
a change fail refuses every later one (:class:`FailureLatch`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from mastertarget.errors import DiskError, DiskIOError

Buffer = bytes | bytearray | memoryview


class FailureLatch:
    """What makes a target disk unusable once a write, zero or flush failed.

    A failed write or fsync means the changes since the last flush are gone
    (docs/design.md crash-safe checklist item 4): going on would ack data that is
    not there. The disk refuses every further change until it is reopened
    and replayed from the last durable point.

    Args:
        path: the disk's path, for the message.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._failure: str | None = None

    def check(self) -> None:
        """Refuse if an earlier change failed.

        Raises:
            DiskIOError: one did; its message is quoted.
        """
        if self._failure is not None:
            raise DiskIOError(
                f"{self._path} is unusable after an earlier failure ({self._failure}); "
                "reopen it and replay from the last durable point"
            )

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Check, then run the change in the ``with`` block; a DiskError from it
        latches the failure before it goes on up.

        Raises:
            DiskIOError: an earlier change failed (the block does not run).
        """
        self.check()
        try:
            yield
        except DiskError as exc:
            self._failure = exc.message
            raise


class TargetDisk(Protocol):
    """A target disk open for reading and writing."""

    @property
    def size(self) -> int:
        """The virtual size in bytes."""
        ...

    @property
    def path(self) -> str:
        """The file or device the disk lives in (the descriptor, for a VMDK)."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; unallocated ranges read as zeros.

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the read failed.
        """
        ...

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from ``offset``, as :meth:`read` would: for readers
        of whole disks, which reuse one buffer instead of allocating per read.

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the read failed.
        """
        ...

    def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``.

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the write failed.
        """
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes from ``offset`` read as zeros (deallocating where it can).

        Raises:
            DiskRangeError: the range is not inside the disk.
            DiskIOError: the write failed.
        """
        ...

    def flush(self) -> None:
        """Make every earlier write and zero durable (fsync), metadata included.

        Raises:
            DiskIOError: fsync failed: the writes since the last flush must be
                treated as lost (docs/design.md crash-safe checklist item 4).
        """
        ...

    def close(self) -> None:
        """Release the file handles. Does not flush."""
        ...
