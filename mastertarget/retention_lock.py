"""The lock that keeps a second master target off a retention volume.

A master target holds an exclusive ``flock`` on ``RETENTION_DIR/.blockrepl.lock``
from the moment its retention directory passed every other check
(mastertarget/retention_volume.py) until it stops; the offline commands
(``mastertarget recover|failover`` without a daemon) take it too, so a daemon
cannot start on a volume they are rolling back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Final

from mastertarget.errors import RetentionCriterion, RetentionVolumeError

#: The lock file a master target holds inside its retention directory. A dot
#: name, so that listings of journal files skip it.
LOCK_FILE_NAME: Final = ".blockrepl.lock"
#: Largest lock file content read back: a pid (at most 20 digits), a space, a
#: host name (HOST_NAME_MAX is 64) and a newline, with room to spare.
MAX_LOCK_FILE_BYTES: Final = 256


class RetentionLock:
    """An exclusive ``flock`` on ``RETENTION_DIR/.blockrepl.lock``.

    Held until :meth:`release` or the end of the process (the kernel drops a
    flock when its last descriptor closes, so kill -9 leaves no stale lock).
    The descriptor is close-on-exec, so a child such as qemu-img does not keep
    the lock alive after the master target dies. The file holds the holder's
    pid and host name for the refusal message of a second master target; it
    is never deleted, as unlinking a lock file lets two processes lock two
    different files under one name.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd = fd

    @property
    def path(self) -> Path:
        """The lock file."""
        return self._path

    @property
    def held(self) -> bool:
        """True until :meth:`release` was called."""
        return self._fd >= 0

    def release(self) -> None:
        """Release the lock (closing the descriptor drops the flock). Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> RetentionLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RetentionLock({str(self._path)!r}, held={self.held})"


def take_lock(shown: str, resolved: Path) -> RetentionLock:
    """Lock the directory for this process, or the refusal naming the holder."""
    path = resolved / LOCK_FILE_NAME
    fd = _open_lock_file(shown, path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RetentionVolumeError.refusing(
                RetentionCriterion.LOCKED, shown, f"cannot be locked ({path}): {exc.strerror}"
            ) from exc
        raise RetentionVolumeError.refusing(
            RetentionCriterion.LOCKED,
            shown,
            f"is locked: another master target ({holder}) holds {path}; stop it or give"
            " this master target a retention directory of its own",
        ) from None
    try:
        # Holder facts for a second master target's message; the lock itself
        # is the flock, so a torn or empty content is harmless.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {os.uname().nodename}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise RetentionVolumeError.refusing(
            RetentionCriterion.NOT_WRITABLE,
            shown,
            f"cannot write the lock file {path}: {exc.strerror}",
        ) from exc
    return RetentionLock(path, fd)


def _open_lock_file(shown: str, path: Path) -> int:
    """Open (creating) the lock file; refuse anything but a regular file."""
    try:
        # O_NOFOLLOW: a symlink planted under the lock's name must not make a
        # master target running as root truncate the file it points at.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise RetentionVolumeError.refusing(
            RetentionCriterion.NOT_WRITABLE,
            shown,
            f"cannot open the lock file {path}: {exc.strerror}",
        ) from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise RetentionVolumeError.refusing(
            RetentionCriterion.LOCKED,
            shown,
            f"has a {file_kind(mode)} as its lock file {path}: expected a regular file",
        )
    return fd


def _holder(fd: int) -> str:
    """The holder as the lock file names it: ``pid 123 on host mt01``."""
    with contextlib.suppress(OSError):
        words = os.pread(fd, MAX_LOCK_FILE_BYTES, 0).decode("ascii", "replace").split()
        if words and words[0].isdigit():
            host = f" on host {words[1]}" if len(words) > 1 else ""
            return f"pid {words[0]}{host}"
    return "its pid is not recorded yet"


def file_kind(mode: int) -> str:
    """What a file is, by its mode, for messages."""
    kinds = (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISREG, "regular file"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
    )
    return next((name for test, name in kinds if test(mode)), f"file of mode {mode:o}")
