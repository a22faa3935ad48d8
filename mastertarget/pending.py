"""A disk's received files that wait to be applied, and its received position.

The queue keeps the inbox entries of one disk in stream order and knows how
far the stream is held durably: ``received`` is the last seq of the run of
files that continue the applied position without a gap. Files that the
applied position makes useless (already applied, of an older generation, or
overlapping what was applied) are dropped and deleted, and so are files of a
generation older than the one the held stream continues in (a hole that a
newer generation's resync went around).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from mastertarget.inbox import Inbox, InboxEntry
from protocol.sequencing import Admission, Fit, StreamPosition, admit


class PendingFiles:
    """The received, not yet applied files of one disk.

    Args:
        inbox: where the files are (dropped files are deleted from it).
        applied: the disk's applied position.
        entries: the files found in the inbox at start, any order.
    """

    def __init__(self, inbox: Inbox, applied: StreamPosition, entries: list[InboxEntry]) -> None:
        self._inbox = inbox
        self._entries: list[InboxEntry] = []
        #: the last position held durably, in the inbox or applied
        self.received = applied
        for entry in entries:
            self._insert(entry)
        self.settle(applied)

    def __iter__(self) -> Iterator[InboxEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self._entries)

    @property
    def oldest_ns(self) -> int | None:
        return min((e.stored_ns for e in self._entries), default=None)

    def admission(self, generation: int, first_seq: int, last_seq: int) -> Admission:
        """How a file fits after what is received (protocol/sequencing.py)."""
        return admit(self.received, generation, first_seq, last_seq)

    def add(self, entry: InboxEntry, applied: StreamPosition) -> None:
        """A file stored in the inbox; it is queued and the position moves over it."""
        self._insert(entry)
        self.settle(applied)

    def head(self, applied: StreamPosition) -> InboxEntry | None:
        """The file to apply next, if it continues ``applied``."""
        if not self._entries:
            return None
        entry = self._entries[0]
        fit = admit(applied, entry.generation, entry.first_seq, entry.last_seq).fit
        return entry if fit is Fit.NEXT else None

    def remove(self, entry: InboxEntry) -> None:
        """Take an applied or quarantined file off the queue (its file is the caller's)."""
        self._entries.remove(entry)

    def rewind(self, applied: StreamPosition) -> None:
        """After a file was quarantined: the stream is held only up to ``applied`` now,
        plus whatever queued files continue it."""
        self.received = applied
        self.settle(applied)

    def clear(self) -> None:
        """Delete every queued file (after a failover)."""
        for entry in self._entries:
            self._inbox.remove(entry)
        self._entries.clear()

    def settle(self, applied: StreamPosition) -> None:
        """Drop what ``applied`` makes useless; move ``received`` over what continues it."""
        keep: list[InboxEntry] = []
        for entry in self._entries:
            fit = admit(applied, entry.generation, entry.first_seq, entry.last_seq).fit
            if fit in (Fit.DUPLICATE, Fit.STALE, Fit.OVERLAP):
                self._inbox.remove(entry)
            else:
                keep.append(entry)
        self._entries = keep
        # The chain runs from the applied position, not from ``received``: a
        # file received earlier and not applied yet is on the way, not stale.
        position = applied
        chain: list[InboxEntry] = []
        for entry in self._entries:
            if admit(position, entry.generation, entry.first_seq, entry.last_seq).fit is Fit.NEXT:
                position = entry.end
                chain.append(entry)
        self.received = max(self.received, position)
        # Once the held stream continues in a newer generation (a resync after a
        # quarantine left a hole), files of an older generation that are not on
        # the way there can never apply: waiting on them would block the newer
        # generation behind them.
        stale = [
            e for e in self._entries if e.generation < self.received.generation and e not in chain
        ]
        for entry in stale:
            self._inbox.remove(entry)
            self._entries.remove(entry)

    def _insert(self, entry: InboxEntry) -> None:
        position = bisect.bisect(self._entries, entry)
        if position and self._entries[position - 1].path == entry.path:
            self._entries[position - 1] = entry  # stored again under the same name
        else:
            self._entries.insert(position, entry)
