"""A disk's received files that wait to be applied, and its received position.

The queue keeps the inbox entries of one disk in stream order and knows how
far the stream is held durably: ``received`` is the last seq of the run of
files that continue the applied position without a gap. Files that the
applied position makes useless (already applied, of an older generation, or
overlapping what was applied) are dropped, and so are files of a generation
older than the one the held stream continues in (a hole that a newer
generation's resync went around).

Pure: it decides and never touches a file. Every method that drops files
returns them; the caller deletes them from the inbox.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from mastertarget.inbox import InboxEntry
from protocol.sequencing import Admission, Fit, StreamPosition, admit


class PendingFiles:
    """The received, not yet applied files of one disk.

    Args:
        applied: the disk's applied position.
    """

    def __init__(self, applied: StreamPosition) -> None:
        self._entries: list[InboxEntry] = []
        #: the position the disk's target holds (the applier's marker)
        self.applied = applied
        #: the last position held durably, in the inbox or applied
        self.received = applied

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

    def load(self, entries: Iterable[InboxEntry]) -> list[InboxEntry]:
        """The files found in the inbox at start, in any order.

        Returns:
            The files dropped (see the module docstring).
        """
        for entry in entries:
            self._insert(entry)
        return self._settle()

    def admission(self, generation: int, first_seq: int, last_seq: int) -> Admission:
        """How a file fits after what is received (protocol/sequencing.py)."""
        return admit(self.received, generation, first_seq, last_seq)

    def add(self, entry: InboxEntry) -> list[InboxEntry]:
        """A file stored in the inbox: it is queued and the position moves over it.

        Returns:
            The files dropped.
        """
        self._insert(entry)
        return self._settle()

    def head(self) -> InboxEntry | None:
        """The file to apply next, if it continues the applied position."""
        if not self._entries:
            return None
        entry = self._entries[0]
        fit = admit(self.applied, entry.generation, entry.first_seq, entry.last_seq).fit
        return entry if fit is Fit.NEXT else None

    def applied_through(
        self, entries: Iterable[InboxEntry], applied: StreamPosition
    ) -> list[InboxEntry]:
        """A group of files was applied and marked at ``applied``: they leave the
        queue (the applier deleted them).

        Returns:
            Other files dropped.
        """
        for entry in entries:
            self._entries.remove(entry)
        self.applied = applied
        return self._settle()

    def quarantined(self, entry: InboxEntry, applied: StreamPosition) -> list[InboxEntry]:
        """A file failed verification and was moved aside: the stream is held
        only up to ``applied`` now, plus whatever queued files continue it.

        Returns:
            Other files dropped.
        """
        self._entries.remove(entry)
        self.applied = self.received = applied
        return self._settle()

    def reset(self, applied: StreamPosition) -> list[InboxEntry]:
        """The target was rolled back to ``applied`` (a failover): every file is dropped.

        Returns:
            The files dropped: all of them.
        """
        dropped, self._entries = self._entries, []
        self.applied = self.received = applied
        return dropped

    def _settle(self) -> list[InboxEntry]:
        """Drop what ``applied`` makes useless; move ``received`` over what continues it."""
        keep: list[InboxEntry] = []
        dropped: list[InboxEntry] = []
        for entry in self._entries:
            fit = admit(self.applied, entry.generation, entry.first_seq, entry.last_seq).fit
            (dropped if fit in (Fit.DUPLICATE, Fit.STALE, Fit.OVERLAP) else keep).append(entry)
        # The chain runs from the applied position, not from ``received``: a
        # file received earlier and not applied yet is on the way, not stale.
        position = self.applied
        chain: set[InboxEntry] = set()
        for entry in keep:
            if admit(position, entry.generation, entry.first_seq, entry.last_seq).fit is Fit.NEXT:
                position = entry.end
                chain.add(entry)
        self.received = max(self.received, position)
        # Once the held stream continues in a newer generation (a resync after a
        # quarantine left a hole), files of an older generation that are not on
        # the way there can never apply: waiting on them would block the newer
        # generation behind them.
        self._entries = []
        for entry in keep:
            stale = entry.generation < self.received.generation and entry not in chain
            (dropped if stale else self._entries).append(entry)
        return dropped

    def _insert(self, entry: InboxEntry) -> None:
        position = bisect.bisect(self._entries, entry)
        if position and self._entries[position - 1].path == entry.path:
            self._entries[position - 1] = entry  # stored again under the same name
        else:
            self._entries.insert(position, entry)
