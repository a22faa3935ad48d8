"""sqlite as the daemons keep their markers: WAL mode with ``synchronous=FULL``,
so a committed transaction survives power loss (docs/design.md crash-safe
checklist item 7), one connection shared by threads under a lock, a schema
version that a newer file refuses, and every sqlite error turned into a
:class:`~runtime.errors.DurabilityError` that names the file.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from runtime.crashsafe import fsync_dir
from runtime.errors import DurabilityError

#: How long a writer waits for sqlite's lock: only this process writes, so a
#: wait means a stuck transaction; fail loudly rather than hang.
BUSY_TIMEOUT_S: Final = 30.0


class DurableDatabase:
    """One sqlite database file of a daemon.

    Args:
        path: the file.
        schema: ``CREATE ... IF NOT EXISTS`` statements run at every open.
        version: the schema version stored in ``PRAGMA user_version``.
        what: names the database in messages ("state database").

    Raises:
        DurabilityError: it cannot be opened, or was written by a newer schema.
    """

    def __init__(self, path: Path, *, schema: str, version: int, what: str) -> None:
        self.path = path
        self._what = what
        created = not path.exists()
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
            )
        except sqlite3.Error as exc:
            raise DurabilityError(f"cannot open {what} {path}: {exc}") from exc
        try:
            self._prepare(schema, version, check=not created)
            if created:
                fsync_dir(path.parent)  # the new file's name must survive too
        except BaseException:
            self._db.close()  # a refused database holds no file open
            raise
        self._lock = threading.Lock()

    def _prepare(self, schema: str, version: int, *, check: bool) -> None:
        """WAL and full sync, the file checked whole (``check``), the schema in place."""
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if check:
                self._check_whole(self.path)
            found = self._db.execute("PRAGMA user_version").fetchone()[0]
            if found > version:
                raise DurabilityError(
                    f"{self._what} {self.path} has schema version {found}; this build reads up "
                    f"to {version}: run the newer release"
                )
            self._db.executescript(schema)
            self._db.execute(f"PRAGMA user_version={int(version)}")
        except sqlite3.Error as exc:
            raise DurabilityError(f"cannot open {self._what} {self.path}: {exc}") from exc

    def _check_whole(self, path: Path) -> None:
        """Refuse a damaged database at open, before anything is read from it or built on it.

        ``quick_check`` reads every page (milliseconds for the few MiB these
        databases hold); a torn or bit-flipped page would otherwise surface
        at some later query, after decisions were made on the pages before it.
        """
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise DurabilityError(
                f"{self._what} {path} is damaged ({'; '.join(problems)}); the daemon will not "
                "start on it: see docs/operations.md, 'A damaged state database'"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise DurabilityError(f"{self._what} {self.path}: {exc}") from exc

    def write(self, sql: str, args: tuple[object, ...] = ()) -> None:
        """One statement in a transaction of its own; durable when this returns."""
        with self.transaction() as db:
            db.execute(sql, args)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed (durable) at the end of the block, or
        rolled back and raised as DurabilityError if any statement fails."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise DurabilityError(f"{self._what} {self.path}: {exc}") from exc
