"""The capture's resync window (agent/capture/window.py) against a model of honest points.

A Hypothesis state machine drives a :class:`ResyncWindow` as the capture
does — live writes journaled or left dirty, source writes that fail, new
generations, resync passes that read regions while live writes go on and
then end or fail, tags — and keeps a model of the disk beside it:

- the source: a version per region, a new one at every write;
- the stream: the batches appended, in order, each with the versions of the
  regions it carries and its flags; a new generation loses some of those
  appended since the last one (those not yet shipped);
- the target: the stream applied in order, and the master target's own
  window as mastertarget/apply.py keeps it (from a RESYNC batch to the end
  of a RESYNC_END batch, no point is consistent).

An append holds the capture's lock from the moment its flags are decided
until it is in the stream (or failed). Only what does not take the lock
comes in between: a failed source write (the socket reader takes FAILED as
it comes), a pass starting, reading or failing.

The invariants are docs/design.md invariant 6, "points are honest":

- every point the master target would offer (a tag outside its window, the
  end of a batch that leaves it closed) and every tag the agent calls
  consistent holds exactly the source as it was when the flags were
  decided: every write before it journaled in order, or read again by a
  pass that ended after it;
- a tag's answer is what the master target does with it;
- a pass never puts older bytes after newer ones: a region that a live
  write journaled after the pass read it is read again (the stamps);
- the window is closed only when nothing is pending or being resynced, and
  then the target is the source and the master target's window is closed;
- RESYNC_END is carried only by a pass's last batch, with nothing pending;
- and the window does close: after a quiet period with the stream up (no
  write, no failure, a pass run whenever the window says one is due) it is
  closed — whatever opened it, a new generation with no region to resync
  among them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from agent.capture.window import RESYNC, RESYNC_END, ResyncWindow
from protocol.records import NO_FLAGS, StreamFlags

#: Few regions: the interleavings that break a window touch the same region.
REGIONS: Final = 3
#: A pass that finds nothing to send sends the disk's last chunk again.
LAST_REGION: Final = REGIONS - 1
#: Events that open the window or stop a pass (a write not journaled, a new
#: generation, a pass or an append that fails) in one run at most: every
#: interleaving that broke a window here needs two or three, and runs with
#: more keep the window open to their end, where nothing can go wrong.
TROUBLES: Final = 4
#: Passes a quiet period runs at most: one under way may be refused (a new generation
#: came) or end with regions pending (they came during it); the next takes them all.
QUIET_PASSES: Final = 3
#: Runs of the machine: a few seconds on one core.
MAX_EXAMPLES: Final = 500
#: Runs a broken window is given to be found in: each of those below is, in
#: far fewer (the search stops at the first failure).
FIND_EXAMPLES: Final = 2000
STEPS: Final = 30

REGION = st.integers(0, REGIONS - 1)
SOME_REGIONS = st.frozensets(REGION, min_size=1, max_size=2)


@dataclass(frozen=True)
class Batch:
    #: region -> the version it puts there
    versions: dict[int, int]
    flags: StreamFlags


@dataclass(frozen=True)
class Append:
    """An append under way: its flags are decided, the lock is held."""

    kind: Literal["live", "tag", "pass"]
    batch: Batch
    #: the source when the flags were decided
    source: tuple[int, ...]
    #: live: the regions it wrote
    regions: frozenset[int] = frozenset()
    #: tag: what the agent answers
    consistent: bool = False
    #: pass: its last batch
    last: bool = False


@dataclass
class Pass:
    regions: frozenset[int]
    #: regions compared so far (sent or found equal)
    compared: set[int] = field(default_factory=set)
    #: read to be sent and not yet appended: region -> (the stamp the read began at, version)
    reads: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: a new generation started: its next append fails
    doomed: bool = False


class Target:
    """The stream applied in order, and the master target's window (mastertarget/apply.py)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.versions = [0] * REGIONS
        self.window_open = False
        for batch in batches:
            self.apply(batch)

    def apply(self, batch: Batch) -> tuple[bool, bool]:
        """Apply ``batch``; whether the master target offers a point at a tag in it, and at
        its end."""
        inside = self.window_open or StreamFlags.RESYNC in batch.flags
        for region, version in batch.versions.items():
            self.versions[region] = version
        self.window_open = inside and StreamFlags.RESYNC_END not in batch.flags
        return not inside, not self.window_open


class WindowMachine(RuleBasedStateMachine):
    #: the window under test (a broken one in the tests that prove the machine can fail)
    window_type: type[ResyncWindow] = ResyncWindow

    def __init__(self) -> None:
        super().__init__()
        self.window = self.window_type()
        self.source = [0] * REGIONS
        self.stream: list[Batch] = []
        #: batches before this one were shipped before a new generation started
        self.generation_start = 0
        self.target = Target([])
        self.appending: Append | None = None
        self.resync: Pass | None = None
        self.troubles = 0
        self._versions = itertools.count(1)

    def _write(self, regions: Iterable[int]) -> None:
        for region in regions:
            self.source[region] = next(self._versions)

    def _trouble(self) -> bool:
        """Count one trouble; False once the run had its share."""
        self.troubles += 1
        return self.troubles <= TROUBLES

    # --- what the capture does ----------------------------------------------------------

    @initialize(dirty=st.frozensets(REGION), more=st.frozensets(REGION))
    def unclean_start(self, dirty: frozenset[int], more: frozenset[int]) -> None:
        """Writes to ``dirty`` reached the source, not the target, before a kill; the map
        holds them dirty (and maybe more)."""
        self._write(dirty)
        self.window.unclean_start(dirty | more)

    @precondition(lambda self: self.appending is None)
    @rule(regions=SOME_REGIONS, held=st.booleans())
    def live_write(self, regions: frozenset[int], held: bool) -> None:
        self._write(regions)
        flags = self.window.live_flags()
        assert flags in (NO_FLAGS, RESYNC)
        batch = Batch({region: self.source[region] for region in regions}, flags)
        self._begin(Append("live", batch, tuple(self.source), regions=regions), held)

    @precondition(lambda self: self.appending is None)
    @rule(held=st.booleans())
    def tag(self, held: bool) -> None:
        flags, consistent = self.window.tag()
        assert flags in (NO_FLAGS, RESYNC)
        self._begin(
            Append("tag", Batch({}, flags), tuple(self.source), consistent=consistent), held
        )

    @precondition(lambda self: self.appending is None and self.troubles < TROUBLES)
    @rule(regions=SOME_REGIONS)
    def write_left_dirty(self, regions: frozenset[int]) -> None:
        """The journal is full, or the stream down: the request is only marked dirty."""
        self._trouble()
        self._write(regions)
        self.window.left_dirty(regions)

    @precondition(lambda self: self.appending is not None or self.troubles < TROUBLES)
    @rule(regions=SOME_REGIONS)
    def source_write_fails(self, regions: frozenset[int]) -> None:
        """What a failed write left on the source is unknown: say it changed. Any time:
        the socket reader takes FAILED as it comes, lock or not. One that comes while an
        append is under way costs no trouble: those interleavings matter most."""
        if self.appending is None:
            self._trouble()
        self._write(regions)
        self.window.source_failed(regions)

    @precondition(lambda self: self.appending is None and self.troubles < TROUBLES)
    @rule(full=st.booleans(), lost=st.integers(0, 2), more=st.frozensets(REGION))
    def new_generation(self, full: bool, lost: int, more: frozenset[int]) -> None:
        """The last ``lost`` batches were not shipped: their journal is gone. The plugin
        marks pending every region that may differ — those of lost batches, those left
        dirty, those of the pass under way — and maybe more; all of them with ``full``."""
        self._trouble()
        del self.stream[max(self.generation_start, len(self.stream) - lost) :]
        self.generation_start = len(self.stream)
        self.target = Target(self.stream)
        differ = {r for r in range(REGIONS) if self.target.versions[r] != self.source[r]}
        taken = self.resync.regions if self.resync is not None else frozenset()
        self.window.generation_marked(range(REGIONS) if full else differ | taken | more)
        if self.resync is not None:
            self.resync.doomed = True

    # --- a resync pass ------------------------------------------------------------------

    @precondition(lambda self: self.resync is None and self.window.pass_due)
    @rule(data=st.data())
    def pass_starts(self, data: st.DataObject) -> None:
        """A pass takes the pending regions (maybe none), and compares some of them at once."""
        self.resync = Pass(self.window.take_pass())
        if self.resync.regions:
            self._compare(data.draw(st.sets(st.sampled_from(sorted(self.resync.regions)))))

    @precondition(
        lambda self: self.resync is not None and self.resync.compared != self.resync.regions
    )
    @rule(data=st.data())
    def pass_reads(self, data: st.DataObject) -> None:
        """The pass compares more of its regions, and reads those that differ — without
        the lock, so while an append may be under way."""
        assert self.resync is not None
        left = sorted(self.resync.regions - self.resync.compared)
        self._compare(data.draw(st.sets(st.sampled_from(left), min_size=1)))

    def _compare(self, regions: Iterable[int]) -> None:
        assert self.resync is not None
        for region in sorted(regions):
            self.resync.compared.add(region)
            if self.source[region] != self.target.versions[region]:
                self.resync.reads[region] = (self.window.stamp, self.source[region])

    @precondition(lambda self: self.resync is not None and self.appending is None)
    @rule(data=st.data(), last=st.booleans(), held=st.booleans())
    def pass_appends(self, data: st.DataObject, last: bool, held: bool) -> None:
        """A batch of the pass, under the lock: a region a live append stamped since it was
        read is read again. The last batch comes once every region is compared (those
        left are compared just before it)."""
        resync = self.resync
        assert resync is not None
        last = last or not resync.reads
        chosen = (
            None if last else data.draw(st.sets(st.sampled_from(sorted(resync.reads)), min_size=1))
        )
        self._append_pass_batch(chosen, held)

    def _append_pass_batch(self, chosen: Iterable[int] | None, held: bool) -> None:
        """Append the regions ``chosen`` of those the pass read, or with None its last batch."""
        resync = self.resync
        assert resync is not None
        if resync.doomed:  # the stream changed: the append is refused
            self.window.pass_failed()
            self.resync = None
            return
        last = chosen is None
        if chosen is None:
            self._compare(resync.regions - resync.compared)
            chosen = resync.reads
        versions: dict[int, int] = {}
        for region in sorted(chosen):
            stamp, version = resync.reads.pop(region)
            if self.window.written_since([region], stamp):
                version = self.source[region]
            versions[region] = version
        if last and not versions:
            versions[LAST_REGION] = self.source[LAST_REGION]
        flags = self.window.pass_flags(last=last)
        assert flags in (RESYNC, RESYNC_END)
        if flags == RESYNC_END:
            assert last, "RESYNC_END on a batch that is not the pass's last"
            assert self.window.pending_regions == 0, "RESYNC_END with regions pending"
        self._begin(Append("pass", Batch(versions, flags), tuple(self.source), last=last), held)

    @precondition(
        lambda self: (
            self.resync is not None
            and (self.appending is None or self.appending.kind != "pass")
            and self.troubles < TROUBLES
        )
    )
    @rule()
    def pass_fails(self) -> None:
        """A digest request or a source read failed."""
        self._trouble()
        self.window.pass_failed()
        self.resync = None

    @rule()
    def quiet_period(self) -> None:
        """No write and no failure for a while, the stream up: an append under way ends,
        and the capture runs a pass whenever the window says one is due
        (resync.py, ``run_resyncs``), each to its end. Nothing else can close the
        window, so it must be closed then — after a new generation with no region to
        resync too."""
        if self.appending is not None:
            self.append_ends(fails=False)
        for _ in range(QUIET_PASSES):
            if self.resync is None:
                if not self.window.pass_due:
                    break
                self.resync = Pass(self.window.take_pass())
            self._append_pass_batch(None, held=False)
        assert not self.window.is_open, "a quiet period left the window open: nothing closes it"

    # --- the end of an append -----------------------------------------------------------

    def _begin(self, append: Append, held: bool) -> None:
        """An append whose flags are decided: in the stream at once, or ``held`` until
        :meth:`append_ends`, for what does not take the lock to come in between."""
        self.appending = append
        if not held:
            self.append_ends(fails=False)

    @precondition(lambda self: self.appending is not None)
    @rule(fails=st.integers(0, 3).map(lambda n: n == 0))
    def append_ends(self, fails: bool) -> None:
        """The append is in the stream, or failed (the journal could not take it): then
        nothing of it is, live requests are left dirty, and a pass stops short."""
        append, self.appending = self.appending, None
        assert append is not None
        if fails and self._trouble():
            if append.kind == "live":
                self.window.left_dirty(append.regions)
            elif append.kind == "pass":
                self.window.pass_failed()
                self.resync = None
            return
        if append.kind == "pass":
            for region, version in append.batch.versions.items():
                newest = self.target.versions[region]
                assert version >= newest, "a pass put older bytes after newer ones in the stream"
        self.stream.append(append.batch)
        tag_offered, offered = self.target.apply(append.batch)
        if append.kind == "live":
            self.window.journaled(append.regions)
        elif append.kind == "tag":
            assert append.consistent == tag_offered, "the agent's answer is not the target's"
        else:
            self.window.pass_appended(append.batch.flags)
            if append.last:
                self.window.pass_ended()
                self.resync = None
        if offered:
            assert self.target.versions == list(append.source), "a point that is not honest"

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def the_status_counts_the_pass(self) -> None:
        taken = len(self.resync.regions) if self.resync is not None else 0
        assert self.window.resyncing_regions == taken

    @invariant()
    def the_window_closes_only_when_nothing_waits(self) -> None:
        if self.window.is_open:
            return
        assert self.window.pending_regions == 0
        assert self.window.resyncing_regions == 0
        assert self.resync is None
        if self.appending is None:
            assert self.target.versions == self.source, "closed, yet the target is not the source"
            assert not self.target.window_open, "closed here, open at the master target"


SETTINGS: Final = settings(max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None)

TestResyncWindow = WindowMachine.TestCase
TestResyncWindow.settings = SETTINGS


# --- the machine can fail: windows broken the ways that matter ------------------------


class ForgetsTheStamps(ResyncWindow):
    def journaled(self, regions: Iterable[int]) -> None:
        super().journaled(())


class EndsWithRegionsPending(ResyncWindow):
    def pass_flags(self, *, last: bool) -> StreamFlags:
        return RESYNC_END if last else RESYNC


class ClosesDespiteAFailureDuringTheLastBatch(ResyncWindow):
    def pass_appended(self, flags: StreamFlags) -> None:
        super().pass_appended(flags)
        self._open = flags != RESYNC_END


class DropsTheRegionsOfAFailedPass(ResyncWindow):
    def pass_failed(self) -> None:
        self.pass_ended()


class OnlyRegionsMakeAPassDue(ResyncWindow):
    """A new generation with no region to mark leaves the window open for good."""

    @property
    def pass_due(self) -> bool:
        return self.resyncing_regions == 0 and self.pending_regions > 0


@pytest.mark.parametrize(
    "broken",
    [ForgetsTheStamps, EndsWithRegionsPending, ClosesDespiteAFailureDuringTheLastBatch,
     DropsTheRegionsOfAFailedPass, OnlyRegionsMakeAPassDue],
    ids=lambda broken: broken.__name__,
)  # fmt: skip
def test_the_machine_finds_a_broken_window(broken: type[ResyncWindow]) -> None:
    machine = type(f"{broken.__name__}Machine", (WindowMachine,), {"window_type": broken})
    found = settings(
        SETTINGS, max_examples=FIND_EXAMPLES, phases=[Phase.generate], derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine, settings=found)


def test_a_new_generation_with_no_region_is_closed_by_a_pass_over_none() -> None:
    window = ResyncWindow()
    window.unclean_start([])
    assert (window.settled, window.pass_due) == (True, False)
    window.generation_marked([])
    # Open, with nothing pending: only a pass (over none) can close it.
    assert (window.is_open, window.tag(), window.pass_due) == (True, (RESYNC, False), True)
    assert window.take_pass() == frozenset()
    assert (window.is_open, window.pass_due) == (True, False)  # a pass is under way
    window.pass_failed()  # the pass over none failed: it is due again
    assert (window.is_open, window.pass_due) == (True, True)
    window.take_pass()
    flags = window.pass_flags(last=True)
    assert flags == RESYNC_END
    window.pass_appended(flags)
    window.pass_ended()
    assert (window.settled, window.pass_due) == (True, False)
    assert window.tag() == (NO_FLAGS, True)
