"""The process server's cache: sealed HRL files waiting to be shipped.

::

    CACHE_DIR/disks/DISK/GGGG…-FFFF…-LLLL….hrl      (protocol/filenames.py)
    CACHE_DIR/quarantine/DISK/NAME.TIME + NAME.TIME.reason

Files are stored by **group commit** (:meth:`Cache.store_group`): every file
of a group is written under a temp name and fsynced, renamed into place, and
then each directory that gained a file is fsynced once. A batch is
acknowledged only after its group returned (docs/design.md invariant 1); many
concurrent requests share the directory fsyncs. A shipped file is deleted
only after the master target's 200, without a directory fsync: if the delete
is lost in a crash, the file is shipped again and the master target answers
"duplicate".

At start-up :meth:`Cache.scan` checks every file's header and length (no key
needed, protocol/hrl.py): a torn or corrupt file is quarantined and its disk
must be resynced from the agent. Usage is kept against a high and a low
watermark: over the high one new batches are refused (503 + Retry-After,
never dropped), until shipping brings it under the low one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocol.errors import ProtocolError
from protocol.filenames import hrl_file_name, parse_hrl_file_name
from protocol.hrl import HRL_HEADER, SealedHrl, parse_header
from runtime.crashsafe import (
    fsync_dir,
    remove_stale_temps,
    write_file_atomic,
    write_file_synced,
)

#: Cached files hold ciphertext only, but their sizes and timing still tell
#: how a disk is written: readable by the service alone.
FILE_MODE: Final = 0o600


@dataclass(frozen=True, slots=True, order=True)
class CachedFile:
    """One HRL file in the cache."""

    generation: int
    first_seq: int
    last_seq: int
    disk_id: str
    path: Path
    size: int
    stored_ns: int


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a start-up scan of one disk found."""

    files: list[CachedFile]
    #: files that failed their checks, moved to quarantine, with the reason
    quarantined: list[tuple[Path, str]]


class Cache:
    """The cache directory of one process server.

    Args:
        root: the cache directory.
        high_bytes, low_bytes: the watermarks (see the module docstring).
    """

    def __init__(self, root: Path, *, high_bytes: int, low_bytes: int) -> None:
        self.root = root
        self.high_bytes = high_bytes
        self.low_bytes = low_bytes
        self._lock = threading.Lock()
        self._bytes = 0
        self._full = False

    def set_marks(self, *, high_bytes: int, low_bytes: int) -> None:
        """New watermarks (a reload); the next admission decision uses them."""
        with self._lock:
            self.high_bytes = high_bytes
            self.low_bytes = low_bytes

    def _folder(self, disk_id: str) -> Path:
        return self.root / "disks" / disk_id

    @property
    def bytes(self) -> int:
        """Bytes of cached files."""
        return self._bytes

    @property
    def full(self) -> bool:
        """Over the high watermark, and not yet back under the low one."""
        with self._lock:
            if self._full and self._bytes < self.low_bytes:
                self._full = False
            elif not self._full and self._bytes >= self.high_bytes:
                self._full = True
            return self._full

    def scan(self, disk_id: str) -> ScanResult:
        """Prepare a disk's folder and check every file in it (blocking)."""
        folder = self._folder(disk_id)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_temps(folder)
        files: list[CachedFile] = []
        quarantined: list[tuple[Path, str]] = []
        for item in os.scandir(folder):
            place = parse_hrl_file_name(item.name)
            if place is None or not item.is_file(follow_symlinks=False):
                continue
            path = Path(item.path)
            reason = _check(path, disk_id, place)
            if reason:
                quarantined.append((self.quarantine(disk_id, path, reason), reason))
                continue
            stat = item.stat(follow_symlinks=False)
            files.append(CachedFile(*place, disk_id, path, stat.st_size, stat.st_mtime_ns))
        files.sort()
        with self._lock:
            self._bytes += sum(f.size for f in files)
        return ScanResult(files, quarantined)

    def store_group(self, sealed: Iterable[SealedHrl]) -> list[CachedFile]:
        """Store files durably with one directory fsync per disk (blocking).

        Returns:
            The cached files, in the order given.

        Raises:
            DurabilityError: a write or fsync failed: none of the group may be
                acknowledged (some may be in place; a resend overwrites them).
        """
        now = time.time_ns()
        stored: list[CachedFile] = []
        folders: set[Path] = set()
        replaced = 0  # bytes of files a resend wrote again under the same name
        for item in sealed:
            header = item.header
            folder = self._folder(header.disk_id)
            path = folder / hrl_file_name(header.generation, header.first_seq, header.last_seq)
            with contextlib.suppress(FileNotFoundError):
                replaced += path.stat().st_size
            write_file_synced(path, list(item.segments), mode=FILE_MODE)
            folders.add(folder)
            size = len(item.header_bytes) + len(item.body)
            stored.append(
                CachedFile(
                    header.generation,
                    header.first_seq,
                    header.last_seq,
                    header.disk_id,
                    path,
                    size,
                    now,
                )
            )
        for folder in folders:
            fsync_dir(folder)
        with self._lock:
            self._bytes += sum(f.size for f in stored) - replaced
        return stored

    def remove(self, cached: CachedFile) -> None:
        """Delete a file the master target acknowledged (see the module docstring)."""
        try:
            cached.path.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._bytes -= cached.size

    def quarantine(self, disk_id: str, path: Path, reason: str) -> Path:
        """Move a file that failed its checks aside, with its reason; durable."""
        folder = self.root / "quarantine" / disk_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = folder / f"{path.name}.{time.time_ns()}"
        write_file_atomic(target.with_name(target.name + ".reason"), reason.encode() + b"\n")
        os.replace(path, target)
        fsync_dir(folder)
        fsync_dir(path.parent)
        return target


def _check(path: Path, disk_id: str, place: tuple[int, int, int]) -> str:
    """Why a cached file cannot be shipped, or '' when its header and length hold."""
    try:
        with path.open("rb") as file:
            head = file.read(HRL_HEADER.size)
            size = os.fstat(file.fileno()).st_size
        header = parse_header(head)
    except ProtocolError as exc:
        return f"{exc.code}: {exc.message}"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    found = (header.disk_id, header.generation, header.first_seq, header.last_seq)
    if found != (disk_id, *place):
        return f"header names disk {found[0]} generation {found[1]} seqs {found[2]}..{found[3]}"
    if size != header.file_len:
        return f"truncated or extended: {size} bytes, the header says {header.file_len}"
    return ""
