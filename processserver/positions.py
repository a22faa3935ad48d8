"""Where each disk's stream stands at the process server, durably.

The cache alone cannot tell: files are deleted once the master target has
them. So each disk's acknowledged position (generation, last seq acked) and
shipped position are kept in sqlite (WAL, ``synchronous=FULL``) in the cache
directory, and written in the same group commit as the files they cover
(processserver/committer.py). At start-up the position of a disk is the
later of what the database says and what the cache holds.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocol.sequencing import StreamPosition
from runtime.crashsafe import fsync_dir
from runtime.errors import DurabilityError

#: The schema version in ``PRAGMA user_version``.
SCHEMA_VERSION: Final = 1
#: Only this process writes: a wait means a stuck transaction; fail loudly.
BUSY_TIMEOUT_S: Final = 30.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS disks (
    disk_id         TEXT PRIMARY KEY,
    generation      INTEGER NOT NULL,
    acked_seq       INTEGER NOT NULL,
    shipped_seq     INTEGER NOT NULL,
    resync_required INTEGER NOT NULL
) STRICT;
"""


@dataclass(frozen=True, slots=True)
class DiskPosition:
    """One disk's stream at the process server."""

    acked: StreamPosition
    shipped_seq: int
    resync_required: bool


class PositionStore:
    """The positions database.

    Raises:
        DurabilityError: it cannot be opened, or is of a newer schema.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        created = not path.exists()
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DurabilityError(
                    f"position database {path} has schema version {version}; this build reads "
                    f"up to {SCHEMA_VERSION}"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise DurabilityError(f"cannot open position database {path}: {exc}") from exc
        if created:
            fsync_dir(path.parent)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, disk_id: str) -> DiskPosition:
        """A disk's position; nothing acked yet for a disk never seen."""
        with self._lock:
            row = self._db.execute(
                "SELECT generation, acked_seq, shipped_seq, resync_required FROM disks "
                "WHERE disk_id = ?",
                (disk_id,),
            ).fetchone()
        if row is None:
            return DiskPosition(StreamPosition(0, 0), 0, False)
        generation, acked, shipped, resync = row
        return DiskPosition(StreamPosition(generation, acked), shipped, bool(resync))

    def put(self, positions: Mapping[str, DiskPosition]) -> None:
        """Write several disks' positions in one transaction; durable on return.

        Raises:
            DurabilityError: the commit failed; none of them moved.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT OR REPLACE INTO disks VALUES (?, ?, ?, ?, ?)",
                    [
                        (disk, p.acked.generation, p.acked.seq, p.shipped_seq,
                         int(p.resync_required))
                        for disk, p in positions.items()
                    ],
                )  # fmt: skip
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise DurabilityError(f"position database {self.path}: {exc}") from exc
