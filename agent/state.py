"""What the agent keeps durably about each disk, in ``STATE_DIR/agent.db``.

- **streams**: the disk's generation and its trimmed seq — the last seq the
  master target is known to hold. Every later seq of the generation is in
  the journal (agent/journal.py), so the next seq is the journal's end + 1,
  or the trimmed seq + 1 when the journal is empty.
- **syncs**: a sync pass under way: which source, the chunk size, and the
  cursor — every differing chunk before it is in the journal — so an
  interrupted sync goes on from there.

sqlite in WAL mode with ``synchronous=FULL`` (runtime/durabledb.py): a
committed change survives power loss. One agent process works on a disk at
a time (:class:`DiskLock`).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import DiskBusyError
from protocol.sequencing import StreamPosition
from runtime.durabledb import DurableDatabase
from runtime.errors import DurabilityError

#: The schema version in ``PRAGMA user_version``.
SCHEMA_VERSION: Final = 1
DATABASE_NAME: Final = "agent.db"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS streams (
    disk_id     TEXT PRIMARY KEY,
    generation  INTEGER NOT NULL,
    trimmed_seq INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS syncs (
    disk_id     TEXT PRIMARY KEY,
    generation  INTEGER NOT NULL,
    source      TEXT NOT NULL,
    source_size INTEGER NOT NULL,
    chunk_bytes INTEGER NOT NULL,
    cursor      INTEGER NOT NULL,
    window_open INTEGER NOT NULL,
    started_ns  INTEGER NOT NULL,
    baseline_generation INTEGER NOT NULL,
    baseline_seq        INTEGER NOT NULL
) STRICT;
"""


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """A disk's stream on the source side."""

    generation: int
    trimmed_seq: int


@dataclass(frozen=True, slots=True)
class SyncProgress:
    """A sync pass that has not finished.

    Args:
        generation: the stream generation the pass sends in.
        source: the source path, as given.
        source_size: its size when the pass started.
        chunk_bytes: the leaf chunk of the pass.
        cursor: every differing chunk before this byte is in the journal.
        window_open: a batch of the pass (flag RESYNC) is in the journal, so
            the pass must end with a RESYNC_END batch.
        started_ns: when the pass started (the source's clock).
        baseline: the stream position the target must have applied before
            its digests are compared (what was sent ahead of the pass);
            0/0 when it cannot be known.
    """

    generation: int
    source: str
    source_size: int
    chunk_bytes: int
    cursor: int
    window_open: bool
    started_ns: int
    baseline: StreamPosition


class AgentState:
    """The state database.

    Raises:
        DurabilityError: it cannot be opened, or is of a newer schema.
    """

    def __init__(self, state_dir: Path) -> None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise DurabilityError(
                f"cannot create the state directory {state_dir}: {exc.strerror}",
                errno=exc.errno,
                path=str(state_dir),
            ) from exc
        self._db = DurableDatabase(
            state_dir / DATABASE_NAME,
            schema=_SCHEMA,
            version=SCHEMA_VERSION,
            what="agent state database",
        )

    def close(self) -> None:
        self._db.close()

    def stream(self, disk_id: str) -> StreamRecord | None:
        rows = self._db.query(
            "SELECT generation, trimmed_seq FROM streams WHERE disk_id = ?", (disk_id,)
        )
        return StreamRecord(*rows[0]) if rows else None

    def put_stream(self, disk_id: str, record: StreamRecord) -> None:
        """Durable on return."""
        self._db.write(
            "INSERT OR REPLACE INTO streams VALUES (?, ?, ?)",
            (disk_id, record.generation, record.trimmed_seq),
        )

    def sync(self, disk_id: str) -> SyncProgress | None:
        rows = self._db.query(
            "SELECT generation, source, source_size, chunk_bytes, cursor, window_open, "
            "started_ns, baseline_generation, baseline_seq FROM syncs WHERE disk_id = ?",
            (disk_id,),
        )
        if not rows:
            return None
        generation, source, size, chunk, cursor, window_open, started, base_gen, base_seq = rows[0]
        return SyncProgress(
            generation,
            source,
            size,
            chunk,
            cursor,
            bool(window_open),
            started,
            StreamPosition(base_gen, base_seq),
        )

    def put_sync(self, disk_id: str, progress: SyncProgress) -> None:
        """Durable on return."""
        p = progress
        self._db.write(
            "INSERT OR REPLACE INTO syncs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                disk_id,
                p.generation,
                p.source,
                p.source_size,
                p.chunk_bytes,
                p.cursor,
                int(p.window_open),
                p.started_ns,
                p.baseline.generation,
                p.baseline.seq,
            ),
        )

    def delete_sync(self, disk_id: str) -> None:
        """The pass is over (durable on return)."""
        self._db.write("DELETE FROM syncs WHERE disk_id = ?", (disk_id,))


class DiskLock:
    """An exclusive lock on one disk's state, held while a command works on it.

    flock(2) on ``STATE_DIR/locks/DISK.lock``: the kernel releases it when
    the process ends, however it ends, so a killed agent never leaves a
    disk locked.

    Raises:
        DiskBusyError: another process holds the lock.
    """

    def __init__(self, state_dir: Path, disk_id: str) -> None:
        folder = state_dir / "locks"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{disk_id}.lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise DiskBusyError(
                f"disk {disk_id} is in use by another agent process (it holds {path}); "
                "wait for it to finish or stop it"
            ) from None

    def release(self) -> None:
        os.close(self._fd)
