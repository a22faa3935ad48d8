"""The undo journal's start-up sweep: only files no point can use go."""

from __future__ import annotations

import os
from pathlib import Path

from mastertarget.journal import UndoJournal
from protocol.keyring import KeyRing
from protocol.sequencing import StreamPosition


def _name(generation: int, first: int, last: int) -> str:
    return f"{generation:020d}-{first:020d}-{last:020d}-{0:07d}.undo"


def test_sweep_keeps_indexed_and_future_files(tmp_path: Path) -> None:
    journal = UndoJournal(tmp_path, KeyRing({1: os.urandom(32)}, 1))
    journal.prepare("d")
    folder = tmp_path / "d"
    names = {
        "pruned": _name(1, 1, 3),  # before the marker, not in the index: history pruned
        "indexed": _name(1, 10, 12),  # a point needs it
        "pending": _name(1, 20, 22),  # after the marker: the inbox may reuse it
        "old-generation": _name(0, 30, 31),  # a superseded stream
    }
    for name in names.values():
        (folder / name).write_bytes(b"x")
    (folder / "notes.txt").write_bytes(b"not ours")
    removed = journal.sweep("d", StreamPosition(1, 15), {(1, 10)})
    assert removed == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [names["indexed"], names["pending"], "notes.txt"]
    )
