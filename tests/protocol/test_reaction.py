"""The senders' reactions to every kind of answer, without a socket: the
agent's stream to a process server's, the shipper to a master target's."""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.api import (
    AckedPosition,
    BatchesAnswer,
    FailedOver,
    HrlAnswer,
    PsDiskState,
    ReceivedPosition,
    SeqRefusal,
    StaleGeneration,
)
from protocol.reaction import (
    Journaled,
    SendAction,
    SendDecision,
    ShipAction,
    ShipDecision,
    StateAction,
    StateDecision,
    react_to_batches,
    react_to_hrl,
    react_to_state,
)

# --- the agent ------------------------------------------------------------------------

#: Generation 2; the master target holds up to seq 10; seqs 11..40 are journaled.
JOURNAL = Journaled(generation=2, trimmed_seq=10, end_seq=40)
#: The request began at seq 21.
FIRST = 21


def _acked(seq: int) -> BatchesAnswer:
    return BatchesAnswer(AckedPosition("d", 2, seq))


def _refused(refusal: SeqRefusal | StaleGeneration) -> BatchesAnswer:
    return BatchesAnswer(AckedPosition("d", 2, 20), refusal)


@pytest.mark.parametrize(
    ("answer", "action", "seq", "journal_behind"),
    [
        (_acked(30), SendAction.ACKED, 30, False),
        (_acked(40), SendAction.ACKED, 40, False),  # everything journaled
        (_acked(41), SendAction.BROKEN, 41, True),  # more than this agent gave out
        (_refused(StaleGeneration(3, "m")), SendAction.BROKEN, 0, False),
        (_refused(SeqRefusal("gap", 15, "m")), SendAction.RESEND, 15, False),
        (_refused(SeqRefusal("overlap", 25, "m")), SendAction.RESEND, 25, False),
        (_refused(SeqRefusal("gap", 41, "m")), SendAction.RESEND, 41, False),  # past the end: ok
        (_refused(SeqRefusal("gap", 42, "m")), SendAction.BROKEN, 42, True),  # never given out
        (_refused(SeqRefusal("gap", 10, "m")), SendAction.BACK_OFF, 10, False),  # trimmed
        (_refused(SeqRefusal("gap", 1, "m")), SendAction.BACK_OFF, 1, False),
        (_refused(SeqRefusal("gap", FIRST, "m")), SendAction.BACK_OFF, FIRST, False),  # just sent
        (_refused(SeqRefusal("overlap", FIRST, "m")), SendAction.BACK_OFF, FIRST, False),
    ],
    ids=[
        "acked", "acked-all", "acked-past-end", "stale", "gap-resend", "overlap-resend",
        "gap-at-end", "gap-past-end", "gap-trimmed", "gap-one", "gap-same", "overlap-same",
    ],
)  # fmt: skip
def test_the_stream_reacts_to_each_answer(
    answer: BatchesAnswer, action: SendAction, seq: int, journal_behind: bool
) -> None:
    decision = react_to_batches(answer, FIRST, JOURNAL)
    assert (decision.action, decision.seq, decision.journal_behind) == (
        action, seq, journal_behind,
    )  # fmt: skip
    if action is not SendAction.ACKED:
        assert decision.reason


def test_the_reasons_name_what_was_expected_and_found() -> None:
    same = react_to_batches(_refused(SeqRefusal("gap", FIRST, "m")), FIRST, JOURNAL)
    assert same.reason == "answered gap expecting seq 21, the seq the request began with"
    stale = react_to_batches(_refused(StaleGeneration(3, "m")), FIRST, JOURNAL)
    assert stale.reason == "the process server is on generation 3, newer than this stream's 2"


@given(
    first=st.integers(1, 50),
    trimmed=st.integers(0, 50),
    extra=st.integers(0, 50),
    expected=st.integers(1, 120),
)
def test_a_resend_always_moves_to_a_journaled_seq_other_than_the_one_sent(
    first: int, trimmed: int, extra: int, expected: int
) -> None:
    """Whatever the process server says, the stream never sends the same
    request again at once, nor from a seq it does not hold."""
    journal = Journaled(1, trimmed, trimmed + extra)
    decision = react_to_batches(_refused(SeqRefusal("gap", expected, "m")), first, journal)
    if decision.action is SendAction.RESEND:
        assert decision.seq != first
        assert trimmed < decision.seq <= journal.end_seq + 1


#: The stream counts seqs up to 25 as acknowledged.
ACKED = 25


def _state(
    generation: int = 2, acked: int = 30, shipped: int = 15, *, resync: bool = False
) -> PsDiskState:
    return PsDiskState("d", generation, acked, shipped, 0, 0.0, resync)


@pytest.mark.parametrize(
    ("state", "decision"),
    [
        # A newer generation there: another agent, or a resync the process server began.
        (_state(3), StateDecision(StateAction.BROKEN)),
        (_state(3, acked=99, resync=True), StateDecision(StateAction.BROKEN)),
        # An older one: it has not seen this generation yet.
        (_state(1), StateDecision(StateAction.IGNORE)),
        (_state(1, acked=99, shipped=99, resync=True), StateDecision(StateAction.IGNORE)),
        (_state(resync=True), StateDecision(StateAction.BROKEN)),
        # The whole disk is compared then: resync_required wins over a journal behind.
        (_state(acked=41, resync=True), StateDecision(StateAction.BROKEN)),
        (_state(acked=41), StateDecision(StateAction.BROKEN, journal_behind=True)),
        (_state(acked=41, shipped=41), StateDecision(StateAction.BROKEN, journal_behind=True)),
        # Acknowledged further, and the master target holds more: both move.
        (_state(), StateDecision(StateAction.FOLLOW, acked_seq=30, trim_seq=15)),
        (_state(acked=40, shipped=40), StateDecision(StateAction.FOLLOW, 40, 40)),
        # Neither moves back, nor stays put as a move.
        (_state(acked=ACKED, shipped=10), StateDecision(StateAction.FOLLOW)),
        (_state(acked=20, shipped=5), StateDecision(StateAction.FOLLOW)),
        (_state(acked=0, shipped=0), StateDecision(StateAction.FOLLOW)),
        (_state(acked=26, shipped=10), StateDecision(StateAction.FOLLOW, acked_seq=26)),
        (_state(acked=20, shipped=11), StateDecision(StateAction.FOLLOW, trim_seq=11)),
        # A shipped seq past the journal's end trims no further than the end.
        (_state(acked=40, shipped=45), StateDecision(StateAction.FOLLOW, 40, 40)),
    ],
    ids=[
        "newer", "newer-wins", "older", "older-says-nothing", "resync", "resync-wins",
        "journal-behind", "journal-behind-shipped", "both-move", "all-shipped", "acked-same",
        "acked-older", "fresh-server", "acked-moves", "trim-moves", "shipped-past-end",
    ],
)  # fmt: skip
def test_the_stream_reacts_to_each_state(state: PsDiskState, decision: StateDecision) -> None:
    found = react_to_state(state, JOURNAL, ACKED)
    assert (found.action, found.acked_seq, found.trim_seq, found.journal_behind) == (
        decision.action, decision.acked_seq, decision.trim_seq, decision.journal_behind,
    )  # fmt: skip
    assert bool(found.reason) == (found.action is StateAction.BROKEN)


def test_a_broken_state_names_what_was_expected_and_found() -> None:
    reasons = [
        react_to_state(state, JOURNAL, ACKED).reason
        for state in (_state(3), _state(resync=True), _state(acked=41))
    ]
    assert reasons == [
        "is on generation 3, newer than this stream's 2",
        "says the disk needs a resync (seqs the master target needs are lost)",
        "holds seqs up to 41 of generation 2, but this agent gave out only up to 40",
    ]


@given(
    generation=st.integers(1, 3),
    acked=st.integers(0, 60),
    shipped=st.integers(0, 60),
    resync=st.booleans(),
    stream_acked=st.integers(10, 40),
)
def test_a_state_never_moves_the_stream_back_nor_past_its_journal(
    generation: int, acked: int, shipped: int, resync: bool, stream_acked: int
) -> None:
    decision = react_to_state(_state(generation, acked, shipped, resync=resync), JOURNAL,
                              stream_acked)  # fmt: skip
    if decision.action is not StateAction.FOLLOW:
        assert (decision.acked_seq, decision.trim_seq) == (None, None)
        return
    if decision.acked_seq is not None:
        assert stream_acked < decision.acked_seq <= JOURNAL.end_seq
    if decision.trim_seq is not None:
        assert JOURNAL.trimmed_seq < decision.trim_seq <= min(shipped, JOURNAL.end_seq)


# --- the shipper ----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    generation: int
    first_seq: int
    last_seq: int


#: The cache of one disk: generation 1 seqs 1..30 in three files, then generation 2.
CACHE = [Run(1, 1, 10), Run(1, 11, 20), Run(1, 21, 30), Run(2, 1, 5)]
POSITION = ReceivedPosition("d", 1, 0, 1, 0)


def _hrl(
    refusal: SeqRefusal | StaleGeneration | FailedOver | None, received_seq: int = 0
) -> HrlAnswer:
    position = dataclasses.replace(POSITION, received_seq=received_seq)
    return HrlAnswer(None if isinstance(refusal, FailedOver) else position, refusal)


@pytest.mark.parametrize(
    ("received_seq", "decision"),
    [
        (10, ShipDecision(ShipAction.SHIPPED, held=1)),  # one file sent, or the first of a run
        (30, ShipDecision(ShipAction.SHIPPED, held=3)),  # a run of three, all stored
        (25, ShipDecision(ShipAction.SHIPPED, held=2)),  # not a file's end: the whole ones
        (99, ShipDecision(ShipAction.SHIPPED, held=3)),  # generation 2 is not covered by 1
        (0, ShipDecision(ShipAction.BACK_OFF)),  # a 200 that covers nothing: no way forward
    ],
)
def test_a_200_ships_the_files_its_position_covers(
    received_seq: int, decision: ShipDecision
) -> None:
    found = react_to_hrl(_hrl(None, received_seq), CACHE)
    assert (found.action, found.held) == (decision.action, decision.held)


@pytest.mark.parametrize(
    ("cached", "refusal", "decision"),
    [
        (CACHE, None, ShipDecision(ShipAction.BACK_OFF)),  # a 200 at seq 0 holds nothing
        (CACHE, FailedOver("m"), ShipDecision(ShipAction.STOP)),
        # It holds the first two files already: drop them, ship the third.
        (CACHE, SeqRefusal("overlap", 21, "m"), ShipDecision(ShipAction.GO_ON, held=2)),
        # It asks for the file just sent: no way forward.
        (CACHE, SeqRefusal("gap", 1, "m"), ShipDecision(ShipAction.BACK_OFF)),
        # It needs seqs this cache no longer holds; a newer generation waits: drop the old one.
        (CACHE, SeqRefusal("gap", 15, "m"),
         ShipDecision(ShipAction.GO_ON, held=1, resync=True, older=2)),
        (CACHE[:3], SeqRefusal("gap", 15, "m"),
         ShipDecision(ShipAction.BACK_OFF, held=1, resync=True)),
        # Past everything cached: all of it is held; nothing is left to send.
        (CACHE[:3], SeqRefusal("gap", 99, "m"),
         ShipDecision(ShipAction.BACK_OFF, held=3, resync=True)),
        # The master target is on generation 2: drop generation 1.
        (CACHE, StaleGeneration(2, "m"), ShipDecision(ShipAction.GO_ON, older=3)),
        # Nothing older cached: no way forward.
        (CACHE[3:], StaleGeneration(2, "m"), ShipDecision(ShipAction.BACK_OFF)),
        (CACHE[3:], StaleGeneration(1, "m"), ShipDecision(ShipAction.BACK_OFF)),
    ],
    ids=[
        "200-at-0", "failed-over", "overlap-held", "gap-same", "gap-lost-newer-waits",
        "gap-lost", "gap-past-all", "stale-drop", "stale-nothing-older", "stale-older-than-us",
    ],
)  # fmt: skip
def test_the_shipper_reacts_to_each_answer(
    cached: list[Run], refusal: SeqRefusal | StaleGeneration | FailedOver | None,
    decision: ShipDecision,
) -> None:  # fmt: skip
    found = react_to_hrl(_hrl(refusal), cached)
    assert (found.action, found.held, found.resync, found.older) == (
        decision.action, decision.held, decision.resync, decision.older,
    )  # fmt: skip
    assert found.held + found.older <= len(cached)


@pytest.mark.parametrize("expected", [1, 15, 21, 99])
def test_the_shipper_decides_alike_on_the_process_servers_queue(expected: int) -> None:
    """The process server hands its cached files as a deque, which indexes but
    cannot be sliced: every decision is the same as on a list (a gap for seqs
    the cache no longer holds once ended the shipping task, and the daemon)."""
    refusal = SeqRefusal("gap", expected, "m")
    assert react_to_hrl(_hrl(refusal), collections.deque(CACHE)) == react_to_hrl(
        _hrl(refusal), CACHE
    )


def test_the_shipper_names_the_seq_it_no_longer_holds() -> None:
    decision = react_to_hrl(_hrl(SeqRefusal("gap", 15, "m")), CACHE)
    assert decision.reason == ("the master target expects seq 15, which this cache no longer holds")


@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4)), min_size=1, max_size=8),
    st.integers(1, 40),
    st.sampled_from(["gap", "overlap", "stale"]),
)
def test_the_shipper_never_sends_the_same_file_again_at_once(
    shape: list[tuple[int, int]], number: int, kind: str
) -> None:
    """A decision to go on always changed the cache; the counts never pass its end."""
    cached: list[Run] = []
    for generation, count in sorted(shape):
        last = cached[-1].last_seq if cached and cached[-1].generation == generation else 0
        cached.append(Run(generation, last + 1, last + count))
    refusal: SeqRefusal | StaleGeneration = (
        StaleGeneration(number, "m") if kind == "stale"
        else SeqRefusal("gap" if kind == "gap" else "overlap", number, "m")
    )  # fmt: skip
    decision = react_to_hrl(_hrl(refusal), cached)
    assert decision.held + decision.older <= len(cached)
    if decision.action is ShipAction.GO_ON:
        assert decision.held + decision.older > 0


def test_send_decisions_are_frozen() -> None:
    decision = SendDecision(SendAction.ACKED, 3)
    with pytest.raises(AttributeError):
        decision.seq = 4  # type: ignore[misc]
