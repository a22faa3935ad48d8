"""The daemons' sqlite: all or nothing per transaction, newer schemas and damaged
files refused, with nothing left open."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from runtime.durabledb import DurableDatabase
from runtime.errors import DurabilityError

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER) STRICT;"


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    db = DurableDatabase(tmp_path / "x.db", schema=SCHEMA, version=1, what="test database")
    db.write("INSERT INTO t VALUES ('a', 1)")

    def update_then_break_the_key() -> None:
        with db.transaction() as conn:
            conn.execute("UPDATE t SET v = 2 WHERE k = 'a'")
            conn.execute("INSERT INTO t VALUES ('a', 3)")  # breaks the primary key

    with pytest.raises(DurabilityError, match=r"test database .*x\.db"):
        update_then_break_the_key()
    assert db.query("SELECT k, v FROM t") == [("a", 1)]
    assert db.query("PRAGMA journal_mode") == [("wal",)]
    db.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    DurableDatabase(path, schema=SCHEMA, version=1, what="test database").close()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version=7")
    with pytest.raises(DurabilityError, match="schema version 7; this build reads up to 1"):
        DurableDatabase(path, schema=SCHEMA, version=1, what="test database")


def _open_on(path: Path) -> list[str]:
    """The file descriptors of this process open on ``path`` or its WAL files."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


@pytest.mark.parametrize("damage", ["not-a-database", "newer-schema"])
def test_a_refused_database_holds_no_file_open(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.db"
    if damage == "not-a-database":
        path.write_bytes(b"not a database, " * 512)
    else:
        DurableDatabase(path, schema=SCHEMA, version=1, what="test database").close()
        with sqlite3.connect(path) as raw:
            raw.execute("PRAGMA user_version=7")
        raw.close()
    with pytest.raises(DurabilityError, match=r"test database .*x\.db") as refused:
        DurableDatabase(path, schema=SCHEMA, version=1, what="test database")
    # The traceback keeps the refused object alive: its file must be closed anyway.
    assert refused.value.__traceback__ is not None
    assert _open_on(path) == []
