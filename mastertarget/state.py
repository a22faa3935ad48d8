"""The master target's durable state: per disk, the applied marker and the
replication state, in sqlite on the retention volume.

sqlite in WAL mode with ``synchronous=FULL``: a commit returns only after the
write-ahead log is fsynced, so a marker that was committed survives power
loss (docs/design.md crash-safe checklist item 7: the applied marker is written
only after the data it covers is durable — the applier flushes the target
first). The recovery-point catalog of the retention journal lives in the same
database, so a marker and the points it makes honest commit together.

Every method may be called from any thread (one connection, one lock), but
not from the event loop: each is a blocking sqlite call, and a commit waits
for an fsync.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mastertarget.journal import UndoPart
from mastertarget.points import PointKind, RecoveryPoint
from protocol.sequencing import StreamPosition
from runtime.durabledb import DurableDatabase

#: The schema version in ``PRAGMA user_version``; a newer one is refused.
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS disks (
    disk_id            TEXT PRIMARY KEY,
    applied_generation INTEGER NOT NULL,
    applied_seq        INTEGER NOT NULL,
    state              TEXT NOT NULL,
    last_error         TEXT NOT NULL DEFAULT '',
    resync_open        INTEGER NOT NULL DEFAULT 0,
    updated_ns         INTEGER NOT NULL
) STRICT;

-- The recovery-point catalog: one row per point (docs/recovery-points.md).
CREATE TABLE IF NOT EXISTS points (
    disk_id    TEXT NOT NULL,
    generation INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    capture_ns INTEGER NOT NULL,
    applied_ns INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    tag_id     BLOB NOT NULL,
    group_id   TEXT NOT NULL,
    consistent INTEGER NOT NULL,
    PRIMARY KEY (disk_id, generation, seq, kind, name)
) STRICT;
CREATE INDEX IF NOT EXISTS points_by_time ON points (disk_id, capture_ns);
-- Group points are found by their group and tag id (mastertarget/groups.py);
-- partial indexes: only tags are in them, not the point at every file's end.
CREATE INDEX IF NOT EXISTS points_by_group ON points (group_id, tag_id) WHERE kind = 'group';
CREATE INDEX IF NOT EXISTS points_by_app_tag ON points (tag_id) WHERE kind = 'app';

-- The undo parts of the retention journal, by the segment they undo.
CREATE TABLE IF NOT EXISTS undo (
    disk_id    TEXT NOT NULL,
    generation INTEGER NOT NULL,
    first_seq  INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL,
    chunks     INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    capture_ns INTEGER NOT NULL,
    PRIMARY KEY (disk_id, generation, first_seq)
) STRICT;
"""


class DiskState(enum.StrEnum):
    """The replication state of one disk, as the state endpoint reports it."""

    #: files are applied as they arrive
    REPLICATING = "replicating"
    #: the stream is broken (a file failed verification, or the source lost
    #: track): only a resync from the agent makes the target whole again
    RESYNC_REQUIRED = "resync-required"
    #: applying stopped on an error of the target (I/O, size); retried with back-off
    PAUSED = "paused"
    #: an operator failed the disk over; nothing more is applied
    FAILED_OVER = "failed-over"


@dataclass(frozen=True, slots=True)
class DiskRecord:
    """What the state store holds for one disk."""

    disk_id: str
    applied: StreamPosition
    state: DiskState
    last_error: str
    #: a resync pass has begun and its RESYNC_END batch is not applied yet
    resync_open: bool


class StateStore:
    """The sqlite state database.

    Args:
        path: the database file, on the retention volume.

    Raises:
        DurabilityError: the database cannot be opened or is of a newer schema.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = DurableDatabase(
            path, schema=_SCHEMA, version=SCHEMA_VERSION, what="state database"
        )

    def close(self) -> None:
        self._db.close()

    def disk(self, disk_id: str) -> DiskRecord:
        """The record of ``disk_id``, created (nothing applied, replicating) on first use."""
        rows = self._db.query(
            "SELECT applied_generation, applied_seq, state, last_error, resync_open "
            "FROM disks WHERE disk_id = ?",
            (disk_id,),
        )
        if not rows:
            self._db.write(
                "INSERT OR IGNORE INTO disks (disk_id, applied_generation, applied_seq, state, "
                "updated_ns) VALUES (?, 0, 0, ?, 0)",
                (disk_id, DiskState.REPLICATING.value),
            )
            return DiskRecord(disk_id, StreamPosition(0, 0), DiskState.REPLICATING, "", False)
        generation, seq, state, error, resync_open = rows[0]
        return DiskRecord(
            disk_id, StreamPosition(generation, seq), DiskState(state), error, bool(resync_open)
        )

    def record_applied(
        self,
        disk_id: str,
        applied: StreamPosition,
        *,
        resync_open: bool,
        points: list[RecoveryPoint],
        undo: list[UndoPart],
        now_ns: int,
        state: DiskState | None = None,
    ) -> None:
        """Advance the marker and add the points and undo parts it makes good,
        in one transaction: durable, all or nothing, when this returns.

        Args:
            state: a new replication state to record with it (its error
                cleared), or None to leave the state as it is.

        Raises:
            DurabilityError: the commit failed; nothing of it counts.
        """
        with self._db.transaction() as db:
            db.execute(
                "UPDATE disks SET applied_generation = ?, applied_seq = ?, resync_open = ?, "
                "updated_ns = ? WHERE disk_id = ?",
                (applied.generation, applied.seq, int(resync_open), now_ns, disk_id),
            )
            if state is not None:
                db.execute(
                    "UPDATE disks SET state = ?, last_error = '' WHERE disk_id = ?",
                    (state.value, disk_id),
                )
            db.executemany(
                "INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        disk_id,
                        p.generation,
                        p.seq,
                        p.capture_ns,
                        p.applied_ns,
                        p.kind.value,
                        p.name,
                        p.tag_id,
                        p.group_id,
                        int(p.consistent),
                    )
                    for p in points
                ],
            )
            db.executemany(
                "INSERT OR REPLACE INTO undo VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        disk_id,
                        u.generation,
                        u.first_seq,
                        u.last_seq,
                        u.chunks,
                        u.bytes,
                        u.capture_ns,
                    )
                    for u in undo
                ],
            )

    def points(self, disk_id: str) -> list[RecoveryPoint]:
        """Every point of the disk, oldest first (consistent or not)."""
        return self._points(disk_id, "ORDER BY generation, seq, kind, name", ())

    _POINT_COLUMNS = (
        "generation, seq, capture_ns, applied_ns, kind, name, tag_id, group_id, consistent"
    )

    def _points(self, disk_id: str, sql: str, args: tuple[object, ...]) -> list[RecoveryPoint]:
        rows = self._db.query(
            f"SELECT {self._POINT_COLUMNS} FROM points WHERE disk_id = ? {sql}",  # noqa: S608 - constant SQL
            (disk_id, *args),
        )
        return [
            RecoveryPoint(disk_id, g, s, c, a, PointKind(k), n, bytes(t), grp, bool(ok))
            for g, s, c, a, k, n, t, grp, ok in rows
        ]

    def oldest_points(self, disk_id: str, offset: int, limit: int) -> list[RecoveryPoint]:
        """Points in stream order from the ``offset``-th oldest, at most ``limit``."""
        return self._points(
            disk_id, "ORDER BY generation, seq, kind, name LIMIT ? OFFSET ?", (limit, offset)
        )

    def newest_consistent(self, disk_id: str, limit: int) -> list[RecoveryPoint]:
        """The ``limit`` newest consistent points, newest first."""
        return self._points(
            disk_id,
            "AND consistent = 1 ORDER BY generation DESC, seq DESC, kind DESC, name DESC LIMIT ?",
            (limit,),
        )

    def group_points(self, group_id: str, disks: Sequence[str]) -> list[RecoveryPoint]:
        """What the common points of a group are made of, on ``disks``, in stream order.

        Every GROUP point of the group on those disks (consistent or not), and
        the APP points that share a tag id with one of them: an app-consistent
        group round puts an APP tag right before its GROUP tag.
        """
        marks = ", ".join("?" * len(disks))
        rows = self._db.query(
            f"SELECT disk_id, {self._POINT_COLUMNS} FROM points "  # noqa: S608 - constant SQL
            f"WHERE disk_id IN ({marks}) AND ((kind = 'group' AND group_id = ?) OR "
            "(kind = 'app' AND tag_id IN (SELECT tag_id FROM points "
            "WHERE kind = 'group' AND group_id = ?))) "
            "ORDER BY disk_id, generation, seq, kind",
            (*disks, group_id, group_id),
        )
        return [
            RecoveryPoint(d, g, s, c, a, PointKind(k), n, bytes(t), grp, bool(ok))
            for d, g, s, c, a, k, n, t, grp, ok in rows
        ]

    def group_summary(self, group_id: str, disks: Sequence[str]) -> tuple[int, int, int] | None:
        """How many tag ids of the group every one of ``disks`` has a consistent
        GROUP point of, and the capture and latest apply time of the newest
        (by capture time); None when there is none. For the gauges: cheaper
        than assembling every point."""
        marks = ", ".join("?" * len(disks))
        rows = self._db.query(
            "SELECT COUNT(*) OVER (), capture_ns, applied_ns FROM ("  # noqa: S608 - constant SQL
            "SELECT MAX(capture_ns) AS capture_ns, MAX(applied_ns) AS applied_ns FROM points "
            f"WHERE kind = 'group' AND group_id = ? AND consistent = 1 AND disk_id IN ({marks}) "
            "GROUP BY tag_id HAVING COUNT(DISTINCT disk_id) = ?"
            ") ORDER BY capture_ns DESC LIMIT 1",
            (group_id, *disks, len(disks)),
        )
        if not rows:
            return None
        count, capture_ns, applied_ns = rows[0]
        return int(count), int(capture_ns), int(applied_ns)

    def point_count(self, disk_id: str) -> int:
        rows = self._db.query("SELECT COUNT(*) FROM points WHERE disk_id = ?", (disk_id,))
        return int(rows[0][0])

    def consistent_summary(
        self, disk_id: str
    ) -> tuple[dict[str, int], RecoveryPoint | None, RecoveryPoint | None]:
        """Consistent points by kind, and the oldest and newest of them."""
        counts = {
            str(kind): int(count)
            for kind, count in self._db.query(
                "SELECT kind, COUNT(*) FROM points WHERE disk_id = ? AND consistent = 1 "
                "GROUP BY kind",
                (disk_id,),
            )
        }
        oldest = self._points(disk_id, "AND consistent = 1 ORDER BY generation, seq LIMIT 1", ())
        newest = self._points(
            disk_id, "AND consistent = 1 ORDER BY generation DESC, seq DESC LIMIT 1", ()
        )
        return counts, oldest[0] if oldest else None, newest[0] if newest else None

    def undo_after(self, disk_id: str, position: StreamPosition) -> list[UndoPart]:
        """The undo parts of segments after ``position``, newest first: the order
        in which they roll the target back to ``position``."""
        rows = self._db.query(
            "SELECT generation, first_seq, last_seq, chunks, bytes, capture_ns FROM undo "
            "WHERE disk_id = ? AND (generation > ? OR (generation = ? AND first_seq > ?)) "
            "ORDER BY generation DESC, first_seq DESC",
            (disk_id, position.generation, position.generation, position.seq),
        )
        return [UndoPart(*row) for row in rows]

    def forget_after(self, disk_id: str, position: StreamPosition, *, now_ns: int) -> None:
        """After a rollback to ``position``: drop later points and undo parts, move the marker."""
        args = (disk_id, position.generation, position.generation, position.seq)
        with self._db.transaction() as db:
            db.execute(
                "DELETE FROM points WHERE disk_id = ? AND "
                "(generation > ? OR (generation = ? AND seq > ?))",
                args,
            )
            db.execute(
                "DELETE FROM undo WHERE disk_id = ? AND "
                "(generation > ? OR (generation = ? AND first_seq > ?))",
                args,
            )
            db.execute(
                "UPDATE disks SET applied_generation = ?, applied_seq = ?, resync_open = 0, "
                "updated_ns = ? WHERE disk_id = ?",
                (position.generation, position.seq, now_ns, disk_id),
            )

    def prune(self, disk_id: str, keep_from: StreamPosition) -> list[UndoPart]:
        """Forget the points before ``keep_from`` and the undo parts only they needed.

        Returns:
            The undo parts removed from the index; the caller deletes their files.

        Raises:
            DurabilityError: the commit failed; nothing was forgotten.
        """
        before = (disk_id, keep_from.generation, keep_from.generation, keep_from.seq)
        with self._db.transaction() as db:
            rows = db.execute(
                "SELECT generation, first_seq, last_seq, chunks, bytes, capture_ns FROM undo "
                "WHERE disk_id = ? AND (generation < ? OR (generation = ? AND last_seq <= ?))",
                before,
            ).fetchall()
            db.execute(
                "DELETE FROM undo WHERE disk_id = ? AND "
                "(generation < ? OR (generation = ? AND last_seq <= ?))",
                before,
            )
            db.execute(
                "DELETE FROM points WHERE disk_id = ? AND "
                "(generation < ? OR (generation = ? AND seq < ?))",
                before,
            )
        return [UndoPart(*row) for row in rows]

    def undo_keys(self, disk_id: str) -> set[tuple[int, int]]:
        """``(generation, first_seq)`` of every undo part the index holds for the disk."""
        rows = self._db.query(
            "SELECT generation, first_seq FROM undo WHERE disk_id = ?", (disk_id,)
        )
        return {(int(g), int(f)) for g, f in rows}

    def undo_bytes(self, disk_id: str) -> int:
        """Bytes of undo files the index holds for the disk."""
        rows = self._db.query(
            "SELECT COALESCE(SUM(bytes), 0) FROM undo WHERE disk_id = ?", (disk_id,)
        )
        return int(rows[0][0])

    def set_state(self, disk_id: str, state: DiskState, error: str, *, now_ns: int) -> None:
        """Record a new replication state and the error that caused it ('' for none)."""
        self._db.write(
            "UPDATE disks SET state = ?, last_error = ?, updated_ns = ? WHERE disk_id = ?",
            (state.value, error, now_ns, disk_id),
        )
