"""The queue of received files: what it applies next, what it drops, what it holds."""

from __future__ import annotations

from pathlib import Path

from mastertarget.inbox import Inbox, InboxEntry
from mastertarget.pending import PendingFiles
from protocol.sequencing import StreamPosition


def _entry(root: Path, generation: int, first: int, last: int) -> InboxEntry:
    path = root / f"{generation}-{first}-{last}.hrl"
    path.write_bytes(b"x")
    return InboxEntry(generation, first, last, path, 1, 0)


def test_a_new_generation_is_not_stuck_behind_an_old_one_with_a_gap(tmp_path: Path) -> None:
    """After a quarantine the old generation has a hole; files of it behind
    the hole can never apply. A resync then starts a newer generation at
    seq 1: it must be applied, and the old files dropped, not waited on."""
    applied = StreamPosition(1, 100)
    behind_the_hole = _entry(tmp_path, 1, 111, 120)
    pending = PendingFiles(Inbox(tmp_path / "cache"), applied, [behind_the_hole])
    assert pending.head(applied) is None  # seqs 101..110 were quarantined
    assert pending.received == applied
    resync = _entry(tmp_path, 2, 1, 10)
    pending.add(resync, applied)
    assert pending.received == StreamPosition(2, 10)
    assert pending.head(applied) == resync
    assert list(pending) == [resync]
    assert not behind_the_hole.path.exists()  # dropped: it can never be applied


def test_a_new_generation_received_while_the_old_one_applies_keeps_it(tmp_path: Path) -> None:
    """A newer generation arrives while the last file of the older one is
    received but not yet applied: that file is on the way, not a hole."""
    applied = StreamPosition(0, 0)
    pending = PendingFiles(Inbox(tmp_path / "cache"), applied, [])
    old = _entry(tmp_path, 2, 1, 1)
    pending.add(old, applied)
    new = _entry(tmp_path, 3, 1, 1)
    pending.add(new, applied)  # the applier is still busy with ``old``
    assert list(pending) == [old, new]
    assert pending.head(applied) == old
    assert old.path.exists()
    assert pending.received == StreamPosition(3, 1)


def test_files_of_the_current_generation_wait_for_the_one_before_them(tmp_path: Path) -> None:
    applied = StreamPosition(3, 10)
    later = _entry(tmp_path, 3, 21, 30)
    pending = PendingFiles(Inbox(tmp_path / "cache"), applied, [later])
    assert pending.head(applied) is None
    assert pending.received == applied
    missing = _entry(tmp_path, 3, 11, 20)
    pending.add(missing, applied)
    assert pending.head(applied) == missing
    assert pending.received == StreamPosition(3, 30)
    assert later.path.exists()


def test_old_generation_files_that_continue_the_stream_are_applied_first(tmp_path: Path) -> None:
    applied = StreamPosition(1, 100)
    next_old = _entry(tmp_path, 1, 101, 110)
    resync = _entry(tmp_path, 2, 1, 10)
    pending = PendingFiles(Inbox(tmp_path / "cache"), applied, [resync, next_old])
    assert pending.received == StreamPosition(2, 10)
    assert list(pending) == [next_old, resync]
    assert pending.head(applied) == next_old
