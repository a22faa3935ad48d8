"""The retention journal: write-ahead before-images of every applied segment.

Before a segment's first write reaches the target, the bytes it will change
are read from the target, sealed into undo files (protocol/undo.py) and made
durable (docs/design.md invariant 3)::

    RETENTION_DIR/journal/DISK/GGGG…-FFFF…-LLLL…-CCCCCCC.undo
                                gen    first  last  chunk

Each file is written under a temp name, fsynced and renamed; the directory is
fsynced once after the segment's last file, before the caller writes the
target. After a crash, a segment whose undo files are all present and verify
is **reused, never captured again**: the target may already hold part of the
segment, and a new capture would copy half-applied data. A segment with some
files missing was never written to the target (its writes wait for the
directory fsync), so its leftovers are removed and it is captured afresh.
"""

from __future__ import annotations

import errno as errno_codes
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import zstandard

from mastertarget.apply import Segment
from mastertarget.disks.base import TargetDisk
from protocol.errors import ProtocolError
from protocol.keyring import KeyRing
from protocol.limits import MiB
from protocol.records import Record, Write, Zero, is_zero
from protocol.sequencing import StreamPosition
from protocol.undo import MAX_UNDO_PLAINTEXT, MAX_UNDO_RECORDS, UndoFile, open_undo, seal_undo
from runtime.crashpoints import crash_point
from runtime.crashsafe import fsync_dir, remove_stale_temps, write_file_synced
from runtime.errors import DurabilityError

#: Bytes read from the target at a time while capturing: each piece becomes
#: one WRITE (or one ZERO if it read as zeros) in an undo file.
CAPTURE_PIECE: Final = 4 * MiB
#: Bytes the undo journal leaves free on the retention volume. The state
#: database lives there too, and must still commit the prune that deletes
#: old undo files to make room: filled to the last byte, a volume could
#: never be emptied again.
STATE_RESERVE_BYTES: Final = 4 * MiB
#: Range bytes per undo file: below the format's plaintext limit with room
#: for the record table.
CHUNK_RANGE_BYTES: Final = MAX_UNDO_PLAINTEXT - MiB
NAME_PATTERN: Final = re.compile(r"(\d{20})-(\d{20})-(\d{20})-(\d{7})\.undo")
FILE_MODE: Final = 0o600


@dataclass(frozen=True, slots=True)
class UndoPart:
    """The undo files of one segment, as the catalog indexes them."""

    generation: int
    first_seq: int
    last_seq: int
    chunks: int
    bytes: int
    capture_ns: int


def _name(generation: int, first: int, last: int, chunk: int) -> str:
    return f"{generation:020d}-{first:020d}-{last:020d}-{chunk:07d}.undo"


def _chunk_plan(ranges: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Cut ranges into capture pieces, and pieces into undo files."""
    chunks: list[list[tuple[int, int]]] = [[]]
    size = 0
    for offset, length in ranges:
        for start in range(offset, offset + length, CAPTURE_PIECE):
            piece = (start, min(CAPTURE_PIECE, offset + length - start))
            if chunks[-1] and (
                size + piece[1] > CHUNK_RANGE_BYTES or len(chunks[-1]) >= (MAX_UNDO_RECORDS)
            ):
                chunks.append([])
                size = 0
            chunks[-1].append(piece)
            size += piece[1]
    return chunks


class UndoJournal:
    """The undo files of every disk on one retention volume.

    Args:
        root: ``RETENTION_DIR/journal``.
        keyring: seals with its active key, opens with any.
    """

    def __init__(self, root: Path, keyring: KeyRing, *, zstd_level: int = 1) -> None:
        self.root = root
        self._keyring = keyring
        self._zstd_level = zstd_level

    def prepare(self, disk_id: str) -> None:
        folder = self.root / disk_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_temps(folder)

    def sweep(self, disk_id: str, applied: StreamPosition, indexed: set[tuple[int, int]]) -> int:
        """Delete undo files no point can use; call at start-up (blocking).

        A file at or before the applied position whose segment is not in the
        catalog's undo index belongs to history already pruned (the index was
        committed, the unlink lost in a crash) or to a segment that was never
        committed and can no longer be (its stream was superseded). Files
        after the applied position are kept: the files in the inbox may
        still reuse them.

        Returns:
            How many files were deleted.
        """
        removed = 0
        for item in os.scandir(self.root / disk_id):
            match = NAME_PATTERN.fullmatch(item.name)
            if match is None:
                continue
            generation, first = int(match[1]), int(match[2])
            after = (generation, first) > (applied.generation, applied.seq)
            if not after and (generation, first) not in indexed:
                os.unlink(item.path)
                removed += 1
        return removed

    def _path(self, disk_id: str, generation: int, first: int, last: int, chunk: int) -> Path:
        return self.root / disk_id / _name(generation, first, last, chunk)

    def _chunk_paths(self, disk_id: str, part: UndoPart) -> list[Path]:
        return [
            self._path(disk_id, part.generation, part.first_seq, part.last_seq, chunk)
            for chunk in range(part.chunks)
        ]

    def capture_or_reuse(
        self,
        disk_id: str,
        target: TargetDisk,
        segment: Segment,
        *,
        generation: int,
        capture_ns: int,
    ) -> UndoPart:
        """Make the segment's before-images durable, reusing a complete earlier capture.

        Blocking; call with the target's lock held, before the segment is applied.

        Raises:
            DiskIOError: reading the target failed.
            DurabilityError: writing the journal failed.
        """
        existing = self._complete(disk_id, generation, segment)
        if existing is not None:
            return existing
        compressor = zstandard.ZstdCompressor(level=self._zstd_level, write_checksum=False)
        plan = _chunk_plan(segment.ranges())
        folder = self.root / disk_id
        total = 0
        for chunk, pieces in enumerate(plan):
            records: list[Record] = []
            for offset, length in pieces:
                data = target.read(offset, length)
                records.append(Zero(offset, length) if is_zero(data) else Write(offset, data))
            sealed = seal_undo(
                records,
                keyring=self._keyring,
                compressor=compressor,
                disk_id=disk_id,
                generation=generation,
                first_seq=segment.first_seq,
                last_seq=segment.last_seq,
                chunk=chunk,
                chunks=len(plan),
                capture_ns=capture_ns,
                salt=os.urandom(32),
            )
            path = folder / _name(generation, segment.first_seq, segment.last_seq, chunk)
            _require_room(path, len(sealed))
            write_file_synced(path, sealed, mode=FILE_MODE)
            crash_point("undo-written")
            total += len(sealed)
        fsync_dir(folder)  # the segment's writes may go to the target after this
        crash_point("undo-durable")
        return UndoPart(
            generation, segment.first_seq, segment.last_seq, len(plan), total, capture_ns
        )

    def _complete(self, disk_id: str, generation: int, segment: Segment) -> UndoPart | None:
        """The earlier capture of this segment if every file of it is there and verifies.

        Looked up by name, not by listing the folder: the journal of a busy
        disk holds a day of files.
        """
        first = self._path(disk_id, generation, segment.first_seq, segment.last_seq, 0)
        if not first.exists():
            return None  # the usual case: never captured
        try:
            head = open_undo(first.read_bytes(), self._keyring).header
            part = UndoPart(
                generation, segment.first_seq, segment.last_seq, head.chunks, 0, head.capture_ns
            )
            paths = self._chunk_paths(disk_id, part)
            files = [open_undo(p.read_bytes(), self._keyring) for p in paths]
            if [f.header.chunk for f in files] == list(range(part.chunks)):
                size = sum(p.stat().st_size for p in paths)
                return UndoPart(
                    generation,
                    segment.first_seq,
                    segment.last_seq,
                    part.chunks,
                    size,
                    head.capture_ns,
                )
        except (ProtocolError, OSError):
            pass
        # Incomplete: the target was never written for this segment; start over.
        for path in (self.root / disk_id).glob(first.name.rsplit("-", 1)[0] + "-*.undo"):
            path.unlink(missing_ok=True)
        return None

    def open_part(self, disk_id: str, part: UndoPart) -> Iterator[UndoFile]:
        """Every verified undo file of a part.

        Raises:
            ProtocolError: a file fails verification (the journal is damaged).
            DurabilityError: a file is missing.
        """
        for path in self._chunk_paths(disk_id, part):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise DurabilityError(
                    f"undo of disk {disk_id} seqs {part.first_seq}..{part.last_seq} must have "
                    f"{part.chunks} files in {self.root / disk_id}; {path.name} is missing"
                ) from None
            try:
                opened = open_undo(data, self._keyring)
            except ProtocolError as exc:
                # Same class and code; the message names the file to look at.
                raise type(exc)(
                    f"{path}: {exc.message}; the points before seq {part.last_seq} of this "
                    "disk cannot be rebuilt past it (the journal is damaged)",
                    details=exc.details,
                ) from exc
            yield opened

    def remove_part(self, disk_id: str, part: UndoPart) -> None:
        """Delete a part's files (pruning); the directory is not fsynced: a part
        that comes back after a crash is pruned again."""
        for path in self._chunk_paths(disk_id, part):
            path.unlink(missing_ok=True)


def _require_room(path: Path, size: int) -> None:
    """Refuse, as a full volume would, a write that would leave less than
    :data:`STATE_RESERVE_BYTES` free on the retention volume."""
    try:
        info = os.statvfs(path.parent)
    except OSError as exc:
        raise DurabilityError(
            f"cannot read the free space of {path.parent}: {exc.strerror}",
            errno=exc.errno,
            path=str(path.parent),
        ) from exc
    free = info.f_bavail * info.f_frsize
    if free < size + STATE_RESERVE_BYTES:
        raise DurabilityError(
            f"could not write {path.name}: expected {size + STATE_RESERVE_BYTES} bytes free on "
            f"the retention volume ({size} and {STATE_RESERVE_BYTES} kept for the state "
            f"database), found {free}",
            errno=errno_codes.ENOSPC,
            path=str(path),
        )
