"""The guard that fails a test whose daemon held the event loop (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import SLOW_CALLBACK_S, _LoopHoldGuard

HELD_S = SLOW_CALLBACK_S * 1.5


def _run_guarded(guard: _LoopHoldGuard, callback: object, *, daemon_running: bool = True) -> None:
    async def main() -> None:
        asyncio.get_running_loop().call_soon(callback)  # type: ignore[arg-type]
        await asyncio.sleep(HELD_S * 2)

    if daemon_running:
        guard.running.add(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(asyncio.events.Handle, "_run", guard.timed_run)
        asyncio.run(main())


def test_a_callback_that_blocks_is_reported() -> None:
    guard = _LoopHoldGuard()
    _run_guarded(guard, lambda: time.sleep(HELD_S))
    assert len(guard.seen) == 1
    assert "held the loop" in guard.seen[0]


def test_the_tests_own_checking_is_left_out() -> None:
    guard = _LoopHoldGuard()

    def check() -> None:
        with guard.test_side():
            time.sleep(HELD_S)

    _run_guarded(guard, check)
    assert guard.seen == []


def test_nothing_is_timed_while_no_daemon_runs() -> None:
    guard = _LoopHoldGuard()
    _run_guarded(guard, lambda: time.sleep(HELD_S), daemon_running=False)
    assert guard.seen == []
