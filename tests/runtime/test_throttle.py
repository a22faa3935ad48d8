"""The log throttle: a burst, then a steady trickle, and a count of what it held back."""

from __future__ import annotations

import pytest

from runtime.throttle import LogThrottle, held_back_note


def test_a_burst_goes_out_then_one_line_per_period() -> None:
    throttle = LogThrottle(burst=3, every_s=1.0)
    decisions = [throttle.take(100.0) for _ in range(10)]
    assert decisions == [0, 0, 0] + [None] * 7
    assert throttle.take(100.5) is None  # half a period earns half a line
    assert throttle.take(101.0) == 8  # a whole one: it goes out and says 8 were held
    assert throttle.take(101.0) is None


def test_a_quiet_spell_refills_the_burst_and_no_more() -> None:
    throttle = LogThrottle(burst=2, every_s=10.0)
    assert [throttle.take(0.0) for _ in range(3)] == [0, 0, None]
    assert [throttle.take(1000.0) for _ in range(3)] == [1, 0, None]


def test_a_flood_of_any_length_writes_lines_in_proportion_to_time() -> None:
    throttle = LogThrottle(burst=5, every_s=1.0)
    written = sum(throttle.take(i / 1000) is not None for i in range(60_000))  # 60 s at 1 kHz
    assert written <= 5 + 60
    assert throttle.take(61.0) is not None


def test_a_clock_going_back_earns_nothing() -> None:
    throttle = LogThrottle(burst=1, every_s=1.0)
    assert throttle.take(50.0) == 0
    assert throttle.take(10.0) is None


@pytest.mark.parametrize(("burst", "every_s"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_a_throttle_that_could_never_write_is_refused(burst: int, every_s: float) -> None:
    with pytest.raises(ValueError, match="expected burst >= 1 and every_s > 0"):
        LogThrottle(burst, every_s)


def test_the_note_says_what_was_held_back() -> None:
    assert held_back_note(0) == ""
    assert held_back_note(41) == " (41 more like it held back)"
