"""Choosing where history starts: by age, under volume pressure, never the newest."""

from __future__ import annotations

from mastertarget.points import PointKind, RecoveryPoint
from mastertarget.retention import choose_cutoff, point_age_ns

S = 10**9
NOW = 10_000 * S


def _points(ages_s: list[int]) -> list[RecoveryPoint]:
    return [
        RecoveryPoint("d", 1, i + 1, NOW - age * S, NOW - age * S, PointKind.CRASH)
        for i, age in enumerate(ages_s)
    ]


def test_points_older_than_the_window_go() -> None:
    points = _points([500, 400, 300, 50, 10])
    assert choose_cutoff(points, 5, now_ns=NOW, window_s=100, over_high_water=False) == (3, 3)


def test_nothing_goes_inside_the_window() -> None:
    points = _points([50, 40, 10])
    assert choose_cutoff(points, 3, now_ns=NOW, window_s=100, over_high_water=False) is None


def test_the_newest_point_always_stays() -> None:
    points = _points([500, 400, 300])
    assert choose_cutoff(points, 3, now_ns=NOW, window_s=100, over_high_water=False) == (2, 2)
    assert choose_cutoff(points[:1], 1, now_ns=NOW, window_s=1, over_high_water=True) is None


def test_volume_pressure_drops_a_tenth_more() -> None:
    points = _points([50] * 40)
    assert choose_cutoff(points, 40, now_ns=NOW, window_s=100, over_high_water=True) == (4, 0)
    assert choose_cutoff(points[:3], 3, now_ns=NOW, window_s=100, over_high_water=True) == (1, 0)


def test_a_source_clock_ahead_cannot_keep_a_point() -> None:
    ahead = RecoveryPoint("d", 1, 1, NOW + 3600 * S, NOW - 500 * S, PointKind.CRASH)
    assert point_age_ns(ahead, NOW) == 500 * S
