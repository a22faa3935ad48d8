"""The RPO monitor: crossings logged once each way, and clock skew that cannot hide a violation."""

from __future__ import annotations

import logging
import threading

import pytest

from mastertarget.rpo import (
    CLOCK_SKEW_WARN_S,
    HEALTH_OK,
    HEALTH_RPO_EXCEEDED,
    SKEW_WINDOW_S,
    RpoMonitor,
)

S = 1_000_000_000
#: Master-target time at which every test starts: 2026-11-22T03:15:00Z.
T0 = 1_795_317_300 * S
THRESHOLD_S = 900.0
LOGGER = "test.rpo"


@pytest.fixture
def monitor() -> RpoMonitor:
    return RpoMonitor(THRESHOLD_S, log=logging.getLogger(LOGGER))


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_rising_above_and_falling_back_log_once_each(
    monitor: RpoMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monitor.add_disk("d1", T0)
    monitor.observe_point("d1", capture_ns=T0, applied_ns=T0 + S)

    status = monitor.evaluate(T0 + 900 * S)["d1"]
    assert (status.rpo_s, status.exceeded, status.health) == (900.0, False, HEALTH_OK)
    assert lines(caplog) == []

    status = monitor.evaluate(T0 + 901 * S)["d1"]
    assert (status.rpo_s, status.threshold_s, status.exceeded) == (901.0, 900.0, True)
    assert status.health == HEALTH_RPO_EXCEEDED
    assert lines(caplog) == [
        (
            logging.WARNING,
            "disk d1: RPO 901.0 s is above the threshold of 900 s;"
            " newest recovery point captured 2026-11-22T03:15:00Z",
        )
    ]
    warning = next(r for r in caplog.records if r.name == LOGGER)
    assert warning.event == "rpo-exceeded"  # type: ignore[attr-defined]
    assert warning.disk == "d1"  # type: ignore[attr-defined]

    # Still above: nothing more, however often it is evaluated.
    for k in range(2, 50):
        assert monitor.evaluate(T0 + (900 + k) * S)["d1"].exceeded
    assert len(lines(caplog)) == 1

    # A new point brings it back: one INFO line.
    monitor.observe_point("d1", capture_ns=T0 + 990 * S, applied_ns=T0 + 991 * S)
    status = monitor.evaluate(T0 + 1000 * S)["d1"]
    assert (status.rpo_s, status.exceeded) == (10.0, False)
    assert lines(caplog)[1:] == [
        (
            logging.INFO,
            "disk d1: RPO 10.0 s is back within the threshold of 900 s;"
            " newest recovery point captured 2026-11-22T03:31:30Z",
        )
    ]
    for k in range(1, 50):
        monitor.evaluate(T0 + (1000 + k) * S)
    assert len(lines(caplog)) == 2

    # And a second violation is logged again.
    monitor.evaluate(T0 + 2000 * S)
    assert [level for level, _ in lines(caplog)] == [logging.WARNING, logging.INFO, logging.WARNING]


def test_source_clock_ahead_cannot_hide_a_violation(
    monitor: RpoMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    """A source clock 1 h ahead stamps points 1 h in the future: the age is clamped."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    ahead = 3600 * S
    monitor.add_disk("d1", T0)
    # Captured at real time T0, stamped T0 + 1 h; applied 2 s later.
    monitor.observe_point("d1", capture_ns=T0 + ahead, applied_ns=T0 + 2 * S)

    status = monitor.evaluate(T0 + 1000 * S)["d1"]
    # Trusting the source would give 1000 - 3600 < 0 and no alert at all.
    assert status.rpo_s == 998.0
    assert status.exceeded
    assert status.skew_s == 3598.0
    messages = [m for _, m in lines(caplog)]
    assert any(
        "RPO 998.0 s is above the threshold" in m
        and "captured 2026-11-22T04:15:00Z by the source clock" in m
        and "counted from 2026-11-22T03:15:02Z when it was applied" in m
        for m in messages
    )


def test_source_clock_behind_gives_a_larger_rpo(monitor: RpoMonitor) -> None:
    behind = 600 * S
    monitor.add_disk("d1", T0)
    monitor.observe_point("d1", capture_ns=T0 - behind, applied_ns=T0 + S)
    status = monitor.evaluate(T0 + 400 * S)["d1"]
    assert status.rpo_s == 1000.0  # 400 s real age + 600 s of skew: an early alert
    assert status.exceeded
    # Behind cannot be told from transit time: not reported as skew.
    assert status.skew_s == 0.0


def test_skew_is_reported_and_logged_once_each_way(
    monitor: RpoMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monitor.add_disk("d1", T0)
    monitor.observe_point("d1", capture_ns=T0 + 5 * S, applied_ns=T0 + S)
    monitor.observe_point("d1", capture_ns=T0 + 3 * S, applied_ns=T0 + 2 * S)
    # The largest recent sample, not the last one.
    assert monitor.evaluate(T0 + 3 * S)["d1"].skew_s == 4.0
    assert monitor.evaluate(T0 + 4 * S)["d1"].skew_s == 4.0
    skew_lines = [(lv, m) for lv, m in lines(caplog) if "clock" in m]
    assert len(skew_lines) == 1
    assert skew_lines[0][0] == logging.WARNING
    assert "source clock is at least 4.0 s ahead" in skew_lines[0][1]
    assert "NTP" in skew_lines[0][1]

    # NTP fixed: samples stop being ahead; after two windows the old ones age out.
    window_ns = int(SKEW_WINDOW_S * S)
    for k in range(1, 4):
        at = T0 + k * window_ns
        monitor.observe_point("d1", capture_ns=at - S, applied_ns=at)
        monitor.evaluate(at + S)
    assert monitor.evaluate(T0 + 3 * window_ns + 2 * S)["d1"].skew_s == 0.0
    skew_lines = [(lv, m) for lv, m in lines(caplog) if "clock" in m]
    assert [lv for lv, _ in skew_lines] == [logging.WARNING, logging.INFO]
    assert "back within 2.0 s" in skew_lines[1][1]


def test_small_skew_is_reported_but_not_logged(
    monitor: RpoMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    small = int(CLOCK_SKEW_WARN_S * S) // 2
    monitor.observe_point("d1", capture_ns=T0 + small, applied_ns=T0)
    assert monitor.evaluate(T0 + S)["d1"].skew_s == CLOCK_SKEW_WARN_S / 2
    assert lines(caplog) == []


def test_disk_without_points_alerts_after_the_threshold(
    monitor: RpoMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monitor.add_disk("d1", T0)
    assert not monitor.evaluate(T0 + 900 * S)["d1"].exceeded
    status = monitor.evaluate(T0 + 901 * S)["d1"]
    assert (status.rpo_s, status.exceeded, status.skew_s) == (901.0, True, 0.0)
    assert lines(caplog) == [
        (
            logging.WARNING,
            "disk d1: RPO 901.0 s is above the threshold of 900 s;"
            " no recovery point yet (disk first seen 2026-11-22T03:15:00Z)",
        )
    ]
    # Adding it again does not reset when it was first seen.
    monitor.add_disk("d1", T0 + 800 * S)
    assert monitor.evaluate(T0 + 902 * S)["d1"].rpo_s == 902.0


def test_disks_are_independent(monitor: RpoMonitor, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monitor.add_disk("d1", T0)
    monitor.add_disk("d2", T0)
    monitor.observe_point("d2", capture_ns=T0 + 500 * S, applied_ns=T0 + 500 * S)
    statuses = monitor.evaluate(T0 + 1000 * S)
    assert statuses["d1"].exceeded
    assert not statuses["d2"].exceeded
    assert statuses["d2"].rpo_s == 500.0
    assert [m.split(":")[0] for _, m in lines(caplog)] == ["disk d1"]


def test_an_unknown_disk_is_added_by_its_first_point(monitor: RpoMonitor) -> None:
    monitor.observe_point("d9", capture_ns=T0, applied_ns=T0)
    assert monitor.evaluate(T0 + 5 * S)["d9"].rpo_s == 5.0


def test_rpo_is_never_negative(monitor: RpoMonitor) -> None:
    monitor.observe_point("d1", capture_ns=T0, applied_ns=T0)
    assert monitor.evaluate(T0 - 10 * S)["d1"].rpo_s == 0.0


@pytest.mark.parametrize(("threshold", "skew"), [(0.0, 2.0), (-1.0, 2.0), (900.0, 0.0)])
def test_thresholds_must_be_positive(threshold: float, skew: float) -> None:
    with pytest.raises(ValueError, match="thresholds must be positive seconds"):
        RpoMonitor(threshold, log=logging.getLogger(LOGGER), skew_warn_s=skew)


def test_observing_from_another_thread_while_evaluating(monitor: RpoMonitor) -> None:
    """The applier thread observes while the loop evaluates; no torn state, no error."""
    count = 20_000
    monitor.add_disk("d1", T0)

    def applier() -> None:
        for i in range(count):
            at = T0 + i * S
            monitor.observe_point("d1", capture_ns=at, applied_ns=at)

    thread = threading.Thread(target=applier)
    thread.start()
    while thread.is_alive():
        status = monitor.evaluate(T0 + count * S)["d1"]
        assert 0 < status.rpo_s <= count
    thread.join()
    assert monitor.evaluate(T0 + count * S)["d1"].rpo_s == 1.0
