"""A replica's target disk behind the lock that shows readers whole groups only.

The applier holds the lock for a whole group of files (the undo capture, the
writes, the flush and the marker commit), so whoever else takes it — a
checksum pass, the copy a recover takes, a failover — finds the target after
a whole group or before it, never half of one, and the catalog describing
exactly what it holds.

Threads: the disk itself is reached only through :meth:`GuardedTarget.hold`,
on executor threads. ``size`` is fixed when the target is first opened (a
target opened again at another size is refused), so the event loop reads it
without taking the lock, which a group may hold for seconds.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from mastertarget.disks.base import TargetDisk
from mastertarget.errors import DiskSizeError


class GuardedTarget:
    """One target disk and its lock.

    Args:
        disk: the open target.
        opener: opens it again (after a write or flush failed).
    """

    def __init__(self, disk: TargetDisk, *, opener: Callable[[], TargetDisk]) -> None:
        self._disk = disk
        self._opener = opener
        self._lock = threading.Lock()
        #: the virtual size, fixed for the life of the object
        self.size = disk.size
        self.path = disk.path

    @contextlib.contextmanager
    def hold(self) -> Iterator[TargetDisk]:
        """The disk, with the lock held for the block (blocking: on an executor thread)."""
        with self._lock:
            yield self._disk

    def reopen(self) -> None:
        """Close the target and open it again; blocking.

        Raises:
            DiskError: it cannot be opened, or opens at another size (it is
                then closed, and opened again at the next call).
        """
        with self._lock:
            self._disk.close()
            disk = self._opener()
            if disk.size != self.size:
                disk.close()
                raise DiskSizeError(
                    f"target {self.path} must stay {self.size} bytes, found {disk.size} "
                    "when it was opened again"
                )
            self._disk = disk

    def close(self) -> None:
        """Close the target; blocking (waits for the group in hand)."""
        with self._lock:
            self._disk.close()
