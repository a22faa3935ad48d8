"""The queue of received files: what it applies next, what it drops, what it holds."""

from __future__ import annotations

from pathlib import Path

from mastertarget.inbox import InboxEntry
from mastertarget.pending import PendingFiles
from protocol.sequencing import StreamPosition


def _entry(root: Path, generation: int, first: int, last: int) -> InboxEntry:
    return InboxEntry(generation, first, last, root / f"{generation}-{first}-{last}.hrl", 1, 0)


def test_a_new_generation_is_not_stuck_behind_an_old_one_with_a_gap(tmp_path: Path) -> None:
    """After a quarantine the old generation has a hole; files of it behind
    the hole can never apply. A resync then starts a newer generation at
    seq 1: it must be applied, and the old files dropped, not waited on."""
    applied = StreamPosition(1, 100)
    behind_the_hole = _entry(tmp_path, 1, 111, 120)
    pending = PendingFiles(applied)
    assert pending.load([behind_the_hole]) == []
    assert pending.head() is None  # seqs 101..110 were quarantined
    assert pending.received == applied
    resync = _entry(tmp_path, 2, 1, 10)
    assert pending.add(resync) == [behind_the_hole]  # dropped: it can never be applied
    assert pending.received == StreamPosition(2, 10)
    assert pending.head() == resync
    assert list(pending) == [resync]


def test_a_new_generation_received_while_the_old_one_applies_keeps_it(tmp_path: Path) -> None:
    """A newer generation arrives while the last file of the older one is
    received but not yet applied: that file is on the way, not a hole."""
    pending = PendingFiles(StreamPosition(0, 0))
    old = _entry(tmp_path, 2, 1, 1)
    assert pending.add(old) == []
    new = _entry(tmp_path, 3, 1, 1)
    assert pending.add(new) == []  # the applier is still busy with ``old``
    assert list(pending) == [old, new]
    assert pending.head() == old
    assert pending.received == StreamPosition(3, 1)


def test_files_of_the_current_generation_wait_for_the_one_before_them(tmp_path: Path) -> None:
    applied = StreamPosition(3, 10)
    later = _entry(tmp_path, 3, 21, 30)
    pending = PendingFiles(applied)
    assert pending.load([later]) == []
    assert pending.head() is None
    assert pending.received == applied
    missing = _entry(tmp_path, 3, 11, 20)
    assert pending.add(missing) == []
    assert pending.head() == missing
    assert pending.received == StreamPosition(3, 30)


def test_old_generation_files_that_continue_the_stream_are_applied_first(tmp_path: Path) -> None:
    applied = StreamPosition(1, 100)
    next_old = _entry(tmp_path, 1, 101, 110)
    resync = _entry(tmp_path, 2, 1, 10)
    pending = PendingFiles(applied)
    assert pending.load([resync, next_old]) == []
    assert pending.received == StreamPosition(2, 10)
    assert list(pending) == [next_old, resync]
    assert pending.head() == next_old


def test_files_the_applied_position_makes_useless_are_dropped_at_load(tmp_path: Path) -> None:
    """A crash after the marker moved and before the inbox files were deleted
    leaves them behind: the queue drops them, the caller deletes them."""
    applied = StreamPosition(2, 50)
    done = _entry(tmp_path, 2, 41, 50)
    overlapping = _entry(tmp_path, 2, 45, 55)
    older = _entry(tmp_path, 1, 1, 9)
    waiting = _entry(tmp_path, 2, 51, 60)
    pending = PendingFiles(applied)
    assert sorted(pending.load([waiting, overlapping, done, older])) == sorted(
        [done, overlapping, older]
    )
    assert list(pending) == [waiting]
    assert pending.received == StreamPosition(2, 60)


def test_a_quarantined_file_rewinds_the_received_position(tmp_path: Path) -> None:
    applied = StreamPosition(1, 10)
    bad = _entry(tmp_path, 1, 11, 20)
    after = _entry(tmp_path, 1, 21, 30)
    pending = PendingFiles(applied)
    pending.load([bad, after])
    assert pending.received == StreamPosition(1, 30)
    assert pending.quarantined(bad, applied) == []
    assert pending.received == applied  # seqs 11..20 must come again
    assert pending.head() is None
    assert list(pending) == [after]


def test_applied_files_leave_and_a_rollback_drops_everything(tmp_path: Path) -> None:
    first, second = _entry(tmp_path, 1, 1, 5), _entry(tmp_path, 1, 6, 9)
    pending = PendingFiles(StreamPosition(1, 0))
    pending.load([first, second])
    assert pending.applied_through([first], first.end) == []
    assert pending.head() == second
    assert pending.reset(StreamPosition(1, 2)) == [second]
    assert list(pending) == []
    assert pending.received == pending.applied == StreamPosition(1, 2)
