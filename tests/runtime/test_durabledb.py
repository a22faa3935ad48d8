"""The daemons' sqlite: all or nothing per transaction, newer schemas refused."""

from __future__ import annotations

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
