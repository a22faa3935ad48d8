"""The applier's policy: every state transition and the back-off, without a disk."""

from __future__ import annotations

import pytest

from mastertarget.apply_policy import (
    RETRY_FIRST_S,
    RETRY_MAX_S,
    ApplyPolicy,
    quarantined,
)
from mastertarget.state import DiskState

R, S, P, F = (
    DiskState.REPLICATING,
    DiskState.RESYNC_REQUIRED,
    DiskState.PAUSED,
    DiskState.FAILED_OVER,
)

#: The table of mastertarget/apply_policy.py: (state now, event) -> state after.
#: None: the disk applies nothing in that state, so the event cannot happen.
TRANSITIONS = {
    (R, "applied"): R, (R, "bad-file"): S, (R, "target-failed"): P,
    (S, "applied"): R, (S, "bad-file"): S, (S, "target-failed"): P,
    (P, "applied"): R, (P, "bad-file"): S, (P, "target-failed"): P,
    (F, "applied"): None, (F, "bad-file"): None, (F, "target-failed"): None,
}  # fmt: skip


def _after(policy: ApplyPolicy, state: DiskState, event: str) -> DiskState | None:
    """The state once ``event`` happened to a disk in ``state``, as the applier records it."""
    if not policy.may_apply(state, suspended=False):
        return None
    if event == "applied":
        recorded = policy.state_after_apply(state)
        policy.applied()
        return state if recorded is None else recorded
    if event == "bad-file":
        return quarantined(1, 11, 20, "authentication-failed: tag", "/q/f").state
    return policy.target_failed(11, 20, "EIO").transition.state


@pytest.mark.parametrize(("state", "event"), list(TRANSITIONS))
def test_every_state_transition(state: DiskState, event: str) -> None:
    assert _after(ApplyPolicy(), state, event) is TRANSITIONS[(state, event)]


@pytest.mark.parametrize("state", list(DiskState))
def test_nothing_applies_while_suspended_or_failed_over(state: DiskState) -> None:
    policy = ApplyPolicy()
    assert policy.may_apply(state, suspended=True) is False
    assert policy.may_apply(state, suspended=False) is (state is not F)


def test_only_a_change_of_state_is_recorded_with_the_marker() -> None:
    assert ApplyPolicy.state_after_apply(R) is None
    assert ApplyPolicy.state_after_apply(P) is R
    assert ApplyPolicy.state_after_apply(S) is R
    with pytest.raises(ValueError, match="failed over"):
        ApplyPolicy.state_after_apply(F)


def test_a_quarantine_says_which_seqs_why_and_where() -> None:
    change = quarantined(3, 11, 20, "authentication-failed: bad tag", "/cache/quarantine/d0/x")
    assert change.state is S
    assert change.error == (
        "seqs 11..20 of generation 3 failed verification (authentication-failed: bad tag); "
        "quarantined as /cache/quarantine/d0/x"
    )


def test_the_back_off_doubles_to_its_cap_and_starts_over_after_success() -> None:
    policy = ApplyPolicy()
    waits = []
    for _ in range(9):
        pause = policy.target_failed(11, 20, "EIO")
        assert pause.transition.state is P
        assert pause.transition.error == (
            f"applying seqs 11..20 failed: EIO; applying the whole file again in "
            f"{pause.wait_s:.0f} s"
        )
        waits.append(pause.wait_s)
        policy.waited(cut_short=False)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert waits[0] == RETRY_FIRST_S
    assert waits[-1] == RETRY_MAX_S
    policy.applied()
    assert policy.target_failed(11, 20, "EIO").wait_s == RETRY_FIRST_S


def test_a_wait_cut_short_starts_the_back_off_over() -> None:
    """Pruning made room (or the daemon stops): try again at once, from the first wait."""
    policy = ApplyPolicy()
    policy.target_failed(1, 1, "ENOSPC")
    policy.waited(cut_short=False)
    policy.target_failed(1, 1, "ENOSPC")
    policy.waited(cut_short=False)
    assert policy.retry_s == 4.0
    policy.waited(cut_short=True)
    assert policy.retry_s == RETRY_FIRST_S


def test_the_target_is_opened_again_after_it_failed_and_only_then() -> None:
    policy = ApplyPolicy()
    assert policy.reopen_target is False
    policy.target_failed(1, 1, "EIO")
    assert policy.reopen_target is True
    policy.waited(cut_short=False)
    assert policy.reopen_target is True  # a wait does not mend the back-end
    policy.reopened()
    assert policy.reopen_target is False
    policy.applied()
    assert policy.reopen_target is False
