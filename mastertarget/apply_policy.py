"""When a disk applies, which state it records, and how long it waits after a target error.

Pure: no I/O, no clock, no event loop. The applier (mastertarget/applying.py)
asks at every step and carries out the answer; the tests drive every
transition without a disk.

The disk's state (mastertarget/state.py, ``DiskState``) after each event:

================  ===============  ==================  ===============  ============
state now         a group applied  a file failed       the target       failed over
                                   verification        failed
================  ===============  ==================  ===============  ============
replicating       replicating      resync-required     paused           failed-over
resync-required   replicating      resync-required     paused           failed-over
paused            replicating      resync-required     paused           failed-over
failed-over       (applies none)   (applies none)      (applies none)   failed-over
================  ===============  ==================  ===============  ============

Applying past the marker proves the stream whole again: a paused target took
the group, or the file after a quarantined one came. A failed-over disk
applies nothing until it is protected again, and nothing is applied while a
failover or anything else holds the applier (``suspended``).

After a target error the group is applied again, whole, after a wait
(docs/design.md crash-safe checklist item 4: never "retry the fsync and carry
on"): :data:`RETRY_FIRST_S`, doubled after each wait that ran out, up to
:data:`RETRY_MAX_S`; back to the first once a group applies, or when a wait
is cut short (the daemon stops, or pruning made room on the retention
volume). The target is opened again before that next try: a back-end that
saw a write or flush fail refuses every later change (``FailureLatch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mastertarget.state import DiskState

#: First wait before applying a group again after a target error, doubled on
#: each failure up to the maximum: quick recovery from a blip, no busy loop
#: against a dead disk.
RETRY_FIRST_S: Final = 1.0
RETRY_MAX_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Transition:
    """A state to record for the disk, with the error that caused it ('' for none)."""

    state: DiskState
    error: str


@dataclass(frozen=True, slots=True)
class Pause:
    """What a target error leads to: the paused state, and how long to wait before trying again."""

    transition: Transition
    wait_s: float


def quarantined(
    generation: int, first_seq: int, last_seq: int, reason: str, where: str
) -> Transition:
    """The state after a file failed verification and was moved aside to ``where``."""
    return Transition(
        DiskState.RESYNC_REQUIRED,
        f"seqs {first_seq}..{last_seq} of generation {generation} failed verification "
        f"({reason}); quarantined as {where}",
    )


class ApplyPolicy:
    """The back-off and the state transitions of one disk's applier.

    Attributes:
        retry_s: the wait after the next target error.
        reopen_target: the target failed since it was last opened: open it
            again before the next group.
    """

    def __init__(self) -> None:
        self.retry_s = RETRY_FIRST_S
        self.reopen_target = False

    @staticmethod
    def may_apply(state: DiskState, *, suspended: bool) -> bool:
        """Whether the applier may start a group (or quarantine a file) now."""
        return not suspended and state is not DiskState.FAILED_OVER

    @staticmethod
    def state_after_apply(state: DiskState) -> DiskState | None:
        """The state a group's marker commit records with it; None to leave it as it is.

        Raises:
            ValueError: ``state`` is failed-over: such a disk applies nothing.
        """
        if state is DiskState.FAILED_OVER:
            raise ValueError("expected a disk that may apply, found one failed over")
        return None if state is DiskState.REPLICATING else DiskState.REPLICATING

    def applied(self) -> None:
        """A group was applied and marked: the next error waits the first wait again."""
        self.retry_s = RETRY_FIRST_S

    def target_failed(self, first_seq: int, last_seq: int, message: str) -> Pause:
        """A group failed on the target (or the journal): pause, wait, open it again."""
        self.reopen_target = True
        error = (
            f"applying seqs {first_seq}..{last_seq} failed: {message}; "
            f"applying the whole file again in {self.retry_s:.0f} s"
        )
        return Pause(Transition(DiskState.PAUSED, error), self.retry_s)

    def waited(self, *, cut_short: bool) -> None:
        """A pause's wait ended: it ran out (the next one is longer), or was cut short."""
        self.retry_s = RETRY_FIRST_S if cut_short else min(self.retry_s * 2, RETRY_MAX_S)

    def reopened(self) -> None:
        """The target was opened again."""
        self.reopen_target = False
