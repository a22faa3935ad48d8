"""The RPO monitor: how much data a disk would lose if the source died now.

**RPO** of a disk is the age of its newest recovery point on the master
target, counted from when the source captured it, compared with a threshold
(docs/design.md: 15 minutes by default). Above it the disk's health is
``rpo-exceeded``; each crossing, up and down, logs exactly one line.

**Clock skew never hides a violation.** ``capture_ns`` is read on the source
clock, ``applied_ns`` and ``now`` on the master target's. A point's age is

    age = now_ns - min(capture_ns, applied_ns)

A point cannot have been captured after the master target applied it, so a
capture time later than the apply time is a source clock running ahead; it
would make the age look small and hide a violation, so it is clamped to the
master target's own observation. A source clock running behind only makes
the RPO look larger: an early alert, never a hidden one.

**Skew is reported.** Per disk, the largest ``capture_ns - applied_ns`` of the
points applied in the last one to two :data:`SKEW_WINDOW_S` windows (by apply
time, up to the disk's newest point), when positive (source ahead), is the
disk's ``skew_s``. It is a lower bound of the true skew: transit time
is hidden inside it. A source behind cannot be told apart from transit time
and is reported as 0. Above :data:`CLOCK_SKEW_WARN_S` one WARNING line asks
the operator to fix time sync; one INFO line follows when it is fixed.

**A disk that never replicates alerts.** Until its first point, a disk's RPO
is counted from ``start_ns``, when the master target first saw it.

The monitor reads no clock: times are passed in, so tests drive it exactly.
It is thread-safe: the applier calls :meth:`RpoMonitor.observe_point` from its
thread, the event loop calls :meth:`RpoMonitor.evaluate`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Final

from mastertarget.pointspec import format_time_ns

#: The health state of a disk whose RPO is above the threshold.
HEALTH_RPO_EXCEEDED: Final = "rpo-exceeded"
#: The health state of a disk within its RPO threshold.
HEALTH_OK: Final = "ok"

#: Default RPO threshold (docs/design.md policy numbers: 15 minutes).
DEFAULT_RPO_THRESHOLD_S: Final = 15 * 60.0

#: Source clock ahead by more than this logs a warning. NTP keeps clocks
#: within tens of milliseconds, and the measure already subtracts the transit
#: time, so 2 s means time sync is broken, while still being far below any
#: RPO threshold worth setting.
CLOCK_SKEW_WARN_S: Final = 2.0

#: How long a skew sample counts as recent: long enough to outlive the gap
#: between points of a quiet disk (crash tags come every 5 minutes at most),
#: short enough that a fixed clock stops being reported within 20 minutes.
SKEW_WINDOW_S: Final = 10 * 60.0

_NS_PER_S: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RpoStatus:
    """One disk's RPO at one evaluation.

    Attributes:
        rpo_s: age in seconds of the newest recovery point (or of the
            disk's first sighting, before any point).
        threshold_s: the threshold it is compared with.
        exceeded: ``rpo_s > threshold_s``.
        skew_s: how far the source clock was seen ahead of the master
            target's recently, in seconds; 0.0 when not ahead.
    """

    rpo_s: float
    threshold_s: float
    exceeded: bool
    skew_s: float

    @property
    def health(self) -> str:
        """``"rpo-exceeded"`` or ``"ok"``."""
        return HEALTH_RPO_EXCEEDED if self.exceeded else HEALTH_OK


class _DiskState:
    """What the monitor keeps per disk; guarded by the monitor's lock."""

    __slots__ = (
        "capture_ns",
        "exceeded",
        "point_ns",
        "skew_bucket",
        "skew_current_ns",
        "skew_previous_ns",
        "skew_warned",
        "start_ns",
    )

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        #: min(capture, applied) of the newest point; None before the first.
        self.point_ns: int | None = None
        #: the newest point's capture time as the source reported it.
        self.capture_ns: int | None = None
        # Recent skew as two tumbling windows: the maximum of the current and
        # the previous one covers the last one to two windows, in O(1) memory.
        self.skew_bucket = 0
        self.skew_current_ns = 0
        self.skew_previous_ns = 0
        self.exceeded = False
        self.skew_warned = False

    def rotate_skew(self, bucket: int) -> None:
        """Move the skew windows forward to ``bucket``."""
        if bucket <= self.skew_bucket:
            return
        self.skew_previous_ns = self.skew_current_ns if bucket == self.skew_bucket + 1 else 0
        self.skew_current_ns = 0
        self.skew_bucket = bucket

    def skew_ns(self) -> int:
        return max(self.skew_current_ns, self.skew_previous_ns)


class RpoMonitor:
    """RPO and clock skew of every disk of a master target.

    Args:
        threshold_s: the RPO above which a disk is ``rpo-exceeded``.
        log: where crossings are logged.
        skew_warn_s: the source-ahead skew above which a warning is logged.

    Raises:
        ValueError: a threshold that is not positive.
    """

    def __init__(
        self,
        threshold_s: float = DEFAULT_RPO_THRESHOLD_S,
        *,
        log: logging.Logger,
        skew_warn_s: float = CLOCK_SKEW_WARN_S,
    ) -> None:
        if not threshold_s > 0 or not skew_warn_s > 0:
            raise ValueError(
                f"thresholds must be positive seconds, found threshold_s={threshold_s!r}"
                f" skew_warn_s={skew_warn_s!r}"
            )
        self.threshold_s = threshold_s
        self.skew_warn_s = skew_warn_s
        self._log = log
        self._lock = threading.Lock()
        self._disks: dict[str, _DiskState] = {}

    def add_disk(self, disk_id: str, start_ns: int) -> None:
        """Start watching a disk; its RPO counts from ``start_ns`` until its first point.

        Adding a disk that is already watched changes nothing: it was seen
        first earlier.

        Args:
            disk_id: the disk.
            start_ns: master-target time the disk was first seen.
        """
        with self._lock:
            self._disks.setdefault(disk_id, _DiskState(start_ns))

    def observe_point(self, disk_id: str, capture_ns: int, applied_ns: int) -> None:
        """Record a disk's newest recovery point, in stream order.

        A disk not yet added is added, first seen at ``applied_ns``.

        Args:
            disk_id: the disk.
            capture_ns: source-clock capture time of the point.
            applied_ns: master-target time the point was applied.
        """
        with self._lock:
            state = self._disks.setdefault(disk_id, _DiskState(applied_ns))
            # A point cannot be captured after it was applied: a later capture
            # time is the source clock running ahead, and trusting it would
            # make the RPO look smaller than it is.
            state.point_ns = min(capture_ns, applied_ns)
            state.capture_ns = capture_ns
            state.rotate_skew(self._skew_bucket(applied_ns))
            state.skew_current_ns = max(state.skew_current_ns, capture_ns - applied_ns)

    def evaluate(self, now_ns: int) -> dict[str, RpoStatus]:
        """Every disk's RPO at ``now_ns``; logs each crossing of a threshold once.

        A WARNING when a disk's RPO rises above the threshold, an INFO when it
        falls back, and the same for the clock skew; nothing while a state
        stays the same.

        Args:
            now_ns: master-target time now.

        Returns:
            RpoStatus by disk id.
        """
        statuses: dict[str, RpoStatus] = {}
        lines: list[tuple[int, str, tuple[object, ...], dict[str, object]]] = []
        with self._lock:
            for disk_id, state in self._disks.items():
                status = self._status(state, now_ns)
                statuses[disk_id] = status
                lines.extend(self._crossings(disk_id, state, status))
        # Log outside the lock: a slow handler must not stall the applier.
        for level, message, args, extra in lines:
            self._log.log(level, message, *args, extra=extra)
        return statuses

    def _skew_bucket(self, time_ns: int) -> int:
        return time_ns // int(SKEW_WINDOW_S * _NS_PER_S)

    def _status(self, state: _DiskState, now_ns: int) -> RpoStatus:
        # The skew windows move with points only: a disk whose points stopped
        # (the very disk that is alerting) keeps its last measured skew
        # rather than claiming its clock is fine.
        since_ns = state.start_ns if state.point_ns is None else state.point_ns
        # now before the point only happens if the caller's clock stepped
        # back; an RPO is never negative.
        rpo_s = max(0, now_ns - since_ns) / _NS_PER_S
        return RpoStatus(
            rpo_s=rpo_s,
            threshold_s=self.threshold_s,
            exceeded=rpo_s > self.threshold_s,
            skew_s=max(0, state.skew_ns()) / _NS_PER_S,
        )

    def _crossings(
        self, disk_id: str, state: _DiskState, status: RpoStatus
    ) -> list[tuple[int, str, tuple[object, ...], dict[str, object]]]:
        """The log lines for the thresholds this evaluation crossed; updates the state."""
        lines: list[tuple[int, str, tuple[object, ...], dict[str, object]]] = []
        newest = self._newest_text(state)
        extra: dict[str, object] = {
            "disk": disk_id,
            "rpo_s": round(status.rpo_s, 3),
            "threshold_s": status.threshold_s,
        }
        if status.exceeded and not state.exceeded:
            lines.append(
                (
                    logging.WARNING,
                    "disk %s: RPO %.1f s is above the threshold of %.0f s; %s",
                    (disk_id, status.rpo_s, status.threshold_s, newest),
                    {**extra, "event": "rpo-exceeded"},
                )
            )
        elif state.exceeded and not status.exceeded:
            lines.append(
                (
                    logging.INFO,
                    "disk %s: RPO %.1f s is back within the threshold of %.0f s; %s",
                    (disk_id, status.rpo_s, status.threshold_s, newest),
                    {**extra, "event": "rpo-recovered"},
                )
            )
        state.exceeded = status.exceeded
        skewed = status.skew_s > self.skew_warn_s
        skew_extra: dict[str, object] = {"disk": disk_id, "skew_s": round(status.skew_s, 3)}
        if skewed and not state.skew_warned:
            lines.append(
                (
                    logging.WARNING,
                    "disk %s: source clock is at least %.1f s ahead of the master target's"
                    " (warning above %.1f s); capture times are clamped to apply times,"
                    " fix time sync (NTP) on the source",
                    (disk_id, status.skew_s, self.skew_warn_s),
                    {**skew_extra, "event": "clock-skew"},
                )
            )
        elif state.skew_warned and not skewed:
            lines.append(
                (
                    logging.INFO,
                    "disk %s: source clock skew is back within %.1f s (now %.1f s ahead)",
                    (disk_id, self.skew_warn_s, status.skew_s),
                    {**skew_extra, "event": "clock-skew-recovered"},
                )
            )
        state.skew_warned = skewed
        return lines

    @staticmethod
    def _newest_text(state: _DiskState) -> str:
        if state.point_ns is None or state.capture_ns is None:
            return f"no recovery point yet (disk first seen {format_time_ns(state.start_ns)})"
        if state.capture_ns != state.point_ns:
            return (
                f"newest recovery point captured {format_time_ns(state.capture_ns)} by the"
                f" source clock, counted from {format_time_ns(state.point_ns)} when it was"
                " applied"
            )
        return f"newest recovery point captured {format_time_ns(state.capture_ns)}"
