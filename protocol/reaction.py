"""What a sender does with a receiver's answer: the decisions of the agent's
stream and of the process server's shipper, as pure functions.

A sender sends a run of its stream and gets an answer (protocol/api.py):
the receiver took it, or refused it naming where its stream stands
(protocol/sequencing.py). What to do next depends on what the sender holds,
and every refusal needs a way forward. One that names none — a gap
expecting the very seq just sent, a stale generation with nothing older to
drop — is waited out like a failed exchange (:attr:`SendAction.BACK_OFF`,
:attr:`ShipAction.BACK_OFF`): sending the same run again at once would loop
as fast as the network allows. The agent also asks where the process server
stands (its state answer) to trim what the master target holds, and that
answer may say the stream cannot go on (:func:`react_to_state`).

The callers (agent/sender.py, processserver/shipper.py) carry the decisions
out; these functions only decide, so every answer kind is tested without a
socket (tests/protocol/test_reaction.py).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol.api import (
    BatchesAnswer,
    FailedOver,
    HrlAnswer,
    PsDiskState,
    SeqRefusal,
    StaleGeneration,
)

# --- the agent: its journal, sent to a process server ------------------------------------


@dataclass(frozen=True, slots=True)
class Journaled:
    """What an agent's stream holds: seqs ``trimmed_seq + 1 .. end_seq`` of ``generation``
    are journaled; the master target holds every seq up to ``trimmed_seq``."""

    generation: int
    trimmed_seq: int
    end_seq: int


class SendAction(enum.Enum):
    #: the process server holds every seq up to ``seq``
    ACKED = "acked"
    #: send again from ``seq``
    RESEND = "resend"
    #: no way forward now: a failed exchange, waited out
    BACK_OFF = "back-off"
    #: the stream cannot go on in its generation: the owner starts a new one
    BROKEN = "broken"


@dataclass(frozen=True, slots=True)
class SendDecision:
    """What the stream does after an answer; ``reason`` says why, for a log line or an error."""

    action: SendAction
    seq: int = 0
    reason: str = ""
    #: BROKEN because the process server holds seqs this journal never had
    journal_behind: bool = False


def react_to_batches(answer: BatchesAnswer, first_seq: int, journal: Journaled) -> SendDecision:
    """The stream's next step after ``answer`` to a request that began at ``first_seq``.

    - 200: acknowledged up to ``acked_seq`` — unless that is past what this
      agent gave out (its state is older than the stream): BROKEN;
    - ``stale-generation``: the process server is on a newer generation: BROKEN;
    - ``gap``/``overlap``: send again from ``expected_seq``, if this journal
      holds it and it is not the seq the request began with; a seq past the
      journal's end is BROKEN, one the master target holds already (the
      process server lags behind it) or the very seq just sent is BACK_OFF.
    """
    refusal = answer.refusal
    if refusal is None:
        acked = answer.position.acked_seq
        if acked > journal.end_seq:
            return SendDecision(
                SendAction.BROKEN,
                acked,
                journal_behind=True,
                reason=f"the process server acknowledged seq {acked} of generation "
                f"{journal.generation}, but this agent gave out seqs only up to {journal.end_seq}",
            )
        return SendDecision(SendAction.ACKED, acked)
    if isinstance(refusal, StaleGeneration):
        return SendDecision(
            SendAction.BROKEN,
            reason=f"the process server is on generation "
            f"{refusal.current_generation}, newer than this stream's {journal.generation}",
        )
    return _send_again(refusal, first_seq, journal)


def _send_again(refusal: SeqRefusal, first_seq: int, journal: Journaled) -> SendDecision:
    expected = refusal.expected_seq
    if expected > journal.end_seq + 1:
        return SendDecision(
            SendAction.BROKEN,
            expected,
            journal_behind=True,
            reason=f"the process server expects seq {expected} of generation "
            f"{journal.generation}, but this agent gave out seqs only up to {journal.end_seq}: "
            "its state is older than the stream",
        )
    if expected <= journal.trimmed_seq:
        # It lags behind what the master target holds (it still ships older
        # files, or cannot reach the master target): not yet.
        return SendDecision(
            SendAction.BACK_OFF,
            expected,
            reason=f"expects seq {expected}, which the master "
            f"target holds already (up to {journal.trimmed_seq})",
        )
    if expected == first_seq:
        return SendDecision(
            SendAction.BACK_OFF,
            expected,
            reason=f"answered {refusal.code} expecting seq "
            f"{expected}, the seq the request began with",
        )
    return SendDecision(SendAction.RESEND, expected, reason=refusal.code)


class StateAction(enum.Enum):
    #: the answer is about an older generation: the process server has not seen
    #: this one yet (it takes the master target's position when the batches come)
    IGNORE = "ignore"
    #: move what is acknowledged and trim the journal, where the decision says
    FOLLOW = "follow"
    #: the stream cannot go on in its generation: the owner starts a new one
    BROKEN = "broken"


@dataclass(frozen=True, slots=True)
class StateDecision:
    """What the stream does after a state answer. ``reason`` follows the process
    server's name in a log line or an error ("https://ps01:9443 is on ...")."""

    action: StateAction
    #: FOLLOW: the process server holds every seq up to this one (None: nothing new)
    acked_seq: int | None = None
    #: FOLLOW: trim the journal up to this seq, which the master target holds (None: keep)
    trim_seq: int | None = None
    reason: str = ""
    #: BROKEN because the process server holds seqs this journal never had
    journal_behind: bool = False


def react_to_state(state: PsDiskState, journal: Journaled, acked_seq: int) -> StateDecision:
    """The stream's next step after the process server's state of the disk.

    Args:
        state: the answer.
        journal: what the stream holds.
        acked_seq: the last seq the stream counts as acknowledged.

    In this order:

    - a newer generation there: BROKEN (another agent, or a resync it started);
    - an older one: IGNORE;
    - ``resync_required`` (seqs the master target needs are lost): BROKEN;
    - ``acked_seq`` past what this agent gave out (its state is older than
      the stream): BROKEN, journal behind;
    - otherwise FOLLOW: acknowledged up to its ``acked_seq`` if that is beyond
      ``acked_seq``, and trimmed up to its ``shipped_seq`` (no further than the
      journal's end) if that is beyond ``journal.trimmed_seq``.
    """
    if state.generation > journal.generation:
        return StateDecision(
            StateAction.BROKEN,
            reason=f"is on generation {state.generation}, "
            f"newer than this stream's {journal.generation}",
        )
    if state.generation < journal.generation:
        return StateDecision(StateAction.IGNORE)
    if state.resync_required:
        return StateDecision(
            StateAction.BROKEN,
            reason="says the disk needs a resync (seqs the master target needs are lost)",
        )
    if state.acked_seq > journal.end_seq:
        return StateDecision(
            StateAction.BROKEN,
            journal_behind=True,
            reason=f"holds seqs up to {state.acked_seq} of generation {journal.generation}, "
            f"but this agent gave out only up to {journal.end_seq}",
        )
    return StateDecision(
        StateAction.FOLLOW,
        acked_seq=state.acked_seq if state.acked_seq > acked_seq else None,
        trim_seq=(
            min(state.shipped_seq, journal.end_seq)
            if state.shipped_seq > journal.trimmed_seq
            else None
        ),
    )


# --- the process server: its cache, shipped to the master target -------------------------


class CachedRun(Protocol):
    """A cached file as the shipper's decisions see it: a run of one generation."""

    @property
    def generation(self) -> int: ...
    @property
    def first_seq(self) -> int: ...
    @property
    def last_seq(self) -> int: ...


class ShipAction(enum.Enum):
    #: the master target holds ``held`` files from the head durably: delete
    #: them, send the next
    SHIPPED = "shipped"
    #: files were dropped (see the decision's counts): send the next at once
    GO_ON = "go-on"
    #: no way forward now: wait (the back-off), then send the same file again
    BACK_OFF = "back-off"
    #: the disk was failed over: ship nothing more of it
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class ShipDecision:
    """What the shipper does after an answer, in this order: drop ``held`` files
    from the head of the cache as shipped (the master target holds them), mark
    the disk resync-required if ``resync``, then drop ``older`` more files of
    older generations from the head."""

    action: ShipAction
    held: int = 0
    resync: bool = False
    older: int = 0
    reason: str = ""


def react_to_hrl(answer: HrlAnswer, cached: Sequence[CachedRun]) -> ShipDecision:
    """The shipper's next step after ``answer`` to the PUT of a run of files
    from ``cached[0]`` on (one file, or several consecutive ones).

    Args:
        cached: the disk's cached files, oldest first; the first was sent.

    - 200: SHIPPED, ``held`` the files from the head that the answer's
      position covers (a master target whose inbox filled during a run
      stores only its first files, and says so); BACK_OFF if it covers none;
    - ``gap``/``overlap``: the files that end before ``expected_seq`` are
      held already; if the next file starts at ``expected_seq`` shipping goes
      on from it (BACK_OFF if that is the file just sent). Otherwise the seqs
      the master target needs are gone: resync — and if the agent started a
      newer generation meanwhile, the broken one's files are dropped (GO_ON);
    - ``stale-generation``: the files of older generations are dropped; with
      none to drop, BACK_OFF;
    - ``failed-over``: STOP.
    """
    refusal = answer.refusal
    if refusal is None:
        assert answer.position is not None  # every answer but failed-over has one
        held = _held(cached, answer.position.generation, answer.position.received_seq)
        if not held:
            return ShipDecision(
                ShipAction.BACK_OFF,
                reason=f"the master target answered 200 but holds only up to seq "
                f"{answer.position.received_seq} of generation {answer.position.generation}",
            )
        return ShipDecision(ShipAction.SHIPPED, held=held)
    if isinstance(refusal, FailedOver):
        return ShipDecision(ShipAction.STOP, reason="the master target failed it over")
    if isinstance(refusal, StaleGeneration):
        older = _leading_older(cached, 0, refusal.current_generation)
        action = ShipAction.GO_ON if older else ShipAction.BACK_OFF
        return ShipDecision(
            action,
            older=older,
            reason=f"the master target is on generation {refusal.current_generation}",
        )
    return _realign(refusal, cached)


def _realign(refusal: SeqRefusal, cached: Sequence[CachedRun]) -> ShipDecision:
    expected = refusal.expected_seq
    held = 0
    while held < len(cached) and cached[held].last_seq < expected:
        held += 1
    if held < len(cached) and cached[held].first_seq == expected:
        action = ShipAction.GO_ON if held else ShipAction.BACK_OFF  # held 0: the file just sent
        return ShipDecision(action, held=held, reason=f"{refusal.code} expecting seq {expected}")
    reason = f"the master target expects seq {expected}, which this cache no longer holds"
    rest = list(itertools.islice(cached, held, None))  # a deque cannot be sliced
    newest = max((f.generation for f in rest), default=0)
    if rest and newest > rest[0].generation:
        # The agent has started a newer generation: the broken one can never be whole.
        older = _leading_older(cached, held, newest)
        return ShipDecision(ShipAction.GO_ON, held=held, resync=True, older=older, reason=reason)
    return ShipDecision(ShipAction.BACK_OFF, held=held, resync=True, reason=reason)


def _held(cached: Sequence[CachedRun], generation: int, received_seq: int) -> int:
    """How many files from the head of ``cached`` a master target at
    ``received_seq`` of ``generation`` holds."""
    count = 0
    while (
        count < len(cached)
        and cached[count].generation == generation
        and cached[count].last_seq <= received_seq
    ):
        count += 1
    return count


def _leading_older(cached: Sequence[CachedRun], start: int, generation: int) -> int:
    """How many files from ``cached[start]`` on are, one after the other, of generations
    before ``generation``."""
    count = 0
    while start + count < len(cached) and cached[start + count].generation < generation:
        count += 1
    return count
