"""The inbox: received HRL files waiting to be applied, one folder per disk.

A file is named by its place in the disk's stream, zero padded so that names
sort in stream order::

    CACHE_DIR/inbox/DISK/GGGGGGGGGGGGGGGGGGGG-FFFFFFFFFFFFFFFFFFFF-LLLLLLLLLLLLLLLLLLLL.hrl
                         generation           first seq            last seq

A file is stored with the crash-safe write of runtime/crashsafe.py (temp file,
fsync, rename, directory fsync) before the PUT that brought it is answered:
docs/design.md invariant 1. After it is applied and the marker moved, it is
unlinked without a directory fsync: if the unlink is lost in a crash, the
file's seqs are at or below the marker at start-up and it is removed again.

Files that fail verification are moved to ``CACHE_DIR/quarantine/DISK/`` with
a ``.reason`` file beside them, for an operator to inspect.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocol.filenames import hrl_file_name, parse_hrl_file_name
from protocol.hrl import HrlHeader
from protocol.sequencing import StreamPosition
from runtime.crashsafe import (
    BytesLike,
    remove_stale_temps,
    rename_durable,
    write_file_atomic,
)

#: Inbox files are secrets at rest only in ciphertext, but their sizes and
#: timing still tell how a disk is written: readable by the service alone.
FILE_MODE: Final = 0o600


@dataclass(frozen=True, slots=True, order=True)
class InboxEntry:
    """One stored HRL file."""

    generation: int
    first_seq: int
    last_seq: int
    path: Path
    size: int
    stored_ns: int

    @property
    def end(self) -> StreamPosition:
        """The stream position after this file is applied."""
        return StreamPosition(self.generation, self.last_seq)

    @property
    def place(self) -> tuple[int, int, int]:
        """``(generation, first_seq, last_seq)``: where its name puts it in the stream."""
        return self.generation, self.first_seq, self.last_seq


class Inbox:
    """The inbox and quarantine folders of one master target.

    Args:
        cache_dir: the master target's cache directory.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.root = cache_dir / "inbox"
        self.quarantine_root = cache_dir / "quarantine"

    def prepare(self, disk_id: str) -> None:
        """Create the disk's folders and clear temp files a crash left behind."""
        folder = self.root / disk_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_temps(folder)

    def store(
        self, header: HrlHeader, data: BytesLike | list[BytesLike], *, now_ns: int
    ) -> InboxEntry:
        """Store a received file durably; blocking (run it in an executor).

        Raises:
            DurabilityError: the write or an fsync failed; nothing was stored.
        """
        name = hrl_file_name(header.generation, header.first_seq, header.last_seq)
        path = self.root / header.disk_id / name
        write_file_atomic(path, data, mode=FILE_MODE)
        size = sum(len(d) for d in data) if isinstance(data, list) else len(data)
        return InboxEntry(header.generation, header.first_seq, header.last_seq, path, size, now_ns)

    def scan(self, disk_id: str) -> list[InboxEntry]:
        """Every file of the disk, in stream order (names that do not parse are skipped)."""
        folder = self.root / disk_id
        entries = []
        for item in os.scandir(folder):
            place = parse_hrl_file_name(item.name)
            if place is None or not item.is_file(follow_symlinks=False):
                continue
            stat = item.stat(follow_symlinks=False)
            generation, first, last = place
            entries.append(
                InboxEntry(generation, first, last, Path(item.path), stat.st_size, stat.st_mtime_ns)
            )
        entries.sort()
        return entries

    def remove(self, entry: InboxEntry) -> None:
        """Remove an applied file (see the module docstring for why no fsync)."""
        entry.path.unlink(missing_ok=True)

    def remove_all(self, entries: Iterable[InboxEntry]) -> None:
        """Remove files that can never apply (see :mod:`mastertarget.pending`)."""
        for entry in entries:
            self.remove(entry)

    def quarantine(self, disk_id: str, entry: InboxEntry, reason: str, *, now_ns: int) -> Path:
        """Move a file that failed verification aside, with its reason; durable.

        Returns:
            Where the file now is.
        """
        folder = self.quarantine_root / disk_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = folder / f"{entry.path.name}.{now_ns}"
        write_file_atomic(target.with_name(target.name + ".reason"), reason.encode() + b"\n")
        rename_durable(entry.path, target)
        return target

    def quarantined(self, disk_id: str) -> list[Path]:
        """The quarantined files of a disk, oldest first."""
        folder = self.quarantine_root / disk_id
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if not p.name.endswith(".reason"))
