"""Where each disk's stream stands at the process server, durably.

The cache alone cannot tell: files are deleted once the master target has
them. So each disk's acknowledged position (generation, last seq acked) and
shipped position are kept in sqlite (WAL, ``synchronous=FULL``) in the cache
directory, and written in the same group commit as the files they cover
(processserver/committer.py). At start-up the position of a disk is the
later of what the database says and what the cache holds.

How a position moves is decided here, by pure methods of :class:`DiskPosition`
(as protocol/sequencing.py decides where a batch fits); the disk's stream
(processserver/stream.py) makes each move durable and is the only caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from protocol.sequencing import StreamPosition
from runtime.durabledb import DurableDatabase

#: The schema version in ``PRAGMA user_version``.
SCHEMA_VERSION: Final = 1

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

    def recovered(self, cached_end: StreamPosition | None, *, quarantined: bool) -> DiskPosition:
        """The position after a restart, from the database's (``self``) and the cache's.

        Args:
            cached_end: the end of the newest cached file, None if none is: a
                file stored whose position commit was lost still counts.
            quarantined: a cached file failed its checks: the seqs in it are
                lost here, and only a resync from the agent makes the stream whole.
        """
        acked = self.acked if cached_end is None else max(self.acked, cached_end)
        return replace(self, acked=acked, resync_required=self.resync_required or quarantined)

    def stored(self, last: StreamPosition) -> DiskPosition:
        """A batch ending at ``last`` is cached."""
        return replace(self, acked=last)

    def shipped(self, generation: int, last_seq: int) -> DiskPosition:
        """The master target holds a cached file of ``generation`` that ends at ``last_seq``.

        ``shipped_seq`` is a seq of the acknowledged generation (docs/api.md):
        a file of an older one, shipped or dropped after the agent started a
        newer generation, moves nothing. Taken as a seq of the new generation
        it would let the agent trim journal entries the master target does
        not hold (docs/design.md invariant 1).
        """
        if generation != self.acked.generation:
            return self
        return replace(self, shipped_seq=last_seq)

    def needing_resync(self) -> DiskPosition:
        """Seqs the master target needs are gone: only the agent can make the stream whole."""
        return replace(self, resync_required=True)

    def following(self, there: StreamPosition, *, cached: bool) -> DiskPosition | None:
        """The master target's position ``there`` taken, or None where it must not be.

        Taken only when nothing of the disk waits in the cache (``cached``
        false) and ``there`` is past what is acknowledged here: the agent
        moved here from another process server and sends again from what the
        master target holds (processserver/server.py, ``post_batches``).
        """
        if cached or there <= self.acked:
            return None
        return DiskPosition(there, shipped_seq=there.seq, resync_required=False)

    def new_generation(self, generation: int) -> DiskPosition:
        """A newer generation starts: nothing of it is acknowledged or shipped yet."""
        return DiskPosition(StreamPosition(generation, 0), shipped_seq=0, resync_required=False)


class PositionStore:
    """The positions database.

    Raises:
        DurabilityError: it cannot be opened, or is of a newer schema.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = DurableDatabase(
            path, schema=_SCHEMA, version=SCHEMA_VERSION, what="position database"
        )

    def close(self) -> None:
        self._db.close()

    def get(self, disk_id: str) -> DiskPosition:
        """A disk's position; nothing acked yet for a disk never seen."""
        rows = self._db.query(
            "SELECT generation, acked_seq, shipped_seq, resync_required FROM disks "
            "WHERE disk_id = ?",
            (disk_id,),
        )
        if not rows:
            return DiskPosition(StreamPosition(0, 0), 0, False)
        generation, acked, shipped, resync = rows[0]
        return DiskPosition(StreamPosition(generation, acked), shipped, bool(resync))

    def put(self, positions: Mapping[str, DiskPosition]) -> None:
        """Write several disks' positions in one transaction; durable on return.

        Raises:
            DurabilityError: the commit failed; none of them moved.
        """
        with self._db.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO disks VALUES (?, ?, ?, ?, ?)",
                [
                    (disk, p.acked.generation, p.acked.seq, p.shipped_seq, int(p.resync_required))
                    for disk, p in positions.items()
                ],
            )
