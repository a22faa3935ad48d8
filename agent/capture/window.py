"""The resync window of a captured disk: what needs a resync, and what the stream says.

A write that reached the source but not the stream (a request left dirty, a
source write that failed, an unclean start, a new generation whose journal
is gone) leaves the target missing something that later writes may follow.
From then until a resync pass has read every such region again, every batch
carries the stream flag RESYNC — the *window* — and the master target offers
no recovery point inside it (docs/design.md invariant 6). The pass's last batch
carries RESYNC_END, but only if nothing was left dirty meanwhile; otherwise
the window stays open for the next pass. Nothing else closes the window, so
a pass is due whenever it is open, even with no region to read again.

A pass reads the source while live writes go on. A region it read may be
written, and that live request journaled, before the pass's batch is: the
batch would then put older bytes after newer ones. So each live append
*stamps* the regions it touched (while a pass runs), each read of the pass
remembers the stamp it began at, and the regions stamped since are read
again when the batch is appended.

:class:`ResyncWindow` is the only holder of that state, with one method per
event. It does no I/O and never waits, and runs on the capture's one event
loop. Appends call it under the append lock, from the moment their flags
are decided until they are in the stream; a failed source write reaches it
from the socket reader whenever it comes, during an append too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from protocol.records import NO_FLAGS, StreamFlags

#: What every batch carries while the window is open.
RESYNC: Final = StreamFlags.RESYNC
#: What the last batch of the pass that closes the window carries.
RESYNC_END: Final = StreamFlags.RESYNC | StreamFlags.RESYNC_END


class ResyncWindow:
    """The regions that need a resync, the pass under way, and whether the window is open."""

    def __init__(self) -> None:
        #: regions that need a resync (the plugin keeps the same, durably)
        self._pending: set[int] = set()
        #: the regions the pass under way took from :attr:`_pending`; None: no pass
        self._resyncing: frozenset[int] | None = None
        self._open = False
        #: live appends so far
        self._stamp = 0
        #: while a pass runs: region -> the stamp of its latest live append
        self._live_stamps: dict[int, int] = {}

    # --- what the rest of the capture asks ------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether batches carry RESYNC: the master target offers no point now."""
        return self._open

    @property
    def pending_regions(self) -> int:
        return len(self._pending)

    @property
    def resyncing_regions(self) -> int:
        return len(self._resyncing or ())

    @property
    def pass_due(self) -> bool:
        """Whether a pass should start now: none runs, and the window is open.

        Only a pass's RESYNC_END closes the window, so an open one needs a pass
        even with no region pending (a new generation that marked none, a pass
        over none that failed): that pass compares nothing and ends the window.
        """
        return self._resyncing is None and (self._open or bool(self._pending))

    @property
    def settled(self) -> bool:
        """Nothing waits for a resync and the window is closed (a stop now is clean)."""
        return not self._pending and not self._open

    @property
    def stamp(self) -> int:
        """The stamp a read of the pass begins at (see :meth:`written_since`)."""
        return self._stamp

    def live_flags(self) -> StreamFlags:
        """The flags a batch of live requests carries."""
        return RESYNC if self._open else NO_FLAGS

    def tag(self) -> tuple[StreamFlags, bool]:
        """The flags a tag's batch carries, and whether the tag is answered consistent.

        Both are decided at once: the master target offers the point by the flags,
        so a source write that fails while the tag is appended (it opens the window)
        must not change the answer after them.
        """
        return self.live_flags(), not self._open

    # --- events: what needs a resync ------------------------------------------------------

    def unclean_start(self, dirty: Iterable[int]) -> None:
        """The capture started after anything but a clean stop: ``dirty`` needs a resync."""
        self._pending = set(dirty)
        self._open = bool(self._pending)

    def left_dirty(self, regions: Iterable[int]) -> None:
        """Requests were only marked dirty (the journal is full, or there is no stream)."""
        self._pending.update(regions)
        self._open = True

    def source_failed(self, regions: Iterable[int]) -> None:
        """A source write failed: what it left on the source is unknown to the target."""
        self.left_dirty(regions)

    def generation_marked(self, regions: Iterable[int]) -> None:
        """A new generation starts: ``regions`` (every range the plugin has pending then,
        those of journaled requests not yet shipped among them) need a resync.

        The window opens even if there are none: what the old generation left at the
        master target (a pass's RESYNC batches whose RESYNC_END was lost with the
        journal, say) may hold its window open, and only a RESYNC_END closes it. With
        no region, the next pass compares nothing and sends that batch
        (:attr:`pass_due`).
        """
        self._pending.update(regions)
        self._open = True

    def journaled(self, regions: Iterable[int]) -> None:
        """A group of live requests was appended; ``regions`` (those it touched) are
        iterated only while a pass runs."""
        self._stamp += 1
        if self._resyncing is not None:
            for region in regions:
                self._live_stamps[region] = self._stamp

    # --- events: a pass -------------------------------------------------------------------

    def take_pass(self) -> frozenset[int]:
        """A pass starts: it takes every pending region, and live appends are stamped."""
        assert self._resyncing is None, "a resync pass is under way already"
        regions = frozenset(self._pending)
        self._pending.clear()
        self._resyncing = regions
        self._live_stamps = {}
        return regions

    def written_since(self, regions: Iterable[int], stamp: int) -> list[int]:
        """Those of ``regions`` a live append touched after a read that began at ``stamp``
        (in the order given): they must be read again."""
        return [region for region in regions if self._live_stamps.get(region, 0) > stamp]

    def pass_flags(self, *, last: bool) -> StreamFlags:
        """The flags of a batch of the pass: RESYNC_END on its last if nothing is pending."""
        return RESYNC_END if last and not self._pending else RESYNC

    def pass_appended(self, flags: StreamFlags) -> None:
        """A batch of the pass, with ``flags`` from :meth:`pass_flags`, is in the stream."""
        # A source write that failed while the last batch was appended made a region
        # pending after its flags were decided: the window stays open for the next pass.
        self._open = flags != RESYNC_END or bool(self._pending)

    def pass_ended(self) -> None:
        """The pass went through: its regions are in the stream."""
        self._resyncing = None
        self._live_stamps = {}

    def pass_failed(self) -> None:
        """The pass stopped short: its regions need a resync again."""
        self._pending |= self._resyncing or frozenset()
        self._resyncing = None
        self._live_stamps = {}
