"""Keeping the retention window: which recovery points and undo data go.

Points older than the window (24 hours by default, the failback policy of the
seeds) go, oldest first, with the undo data only they needed. When the
retention volume fills past its high-water mark, the oldest history goes
early, a tenth of the points at a time, until usage is back under the
low-water mark; what the window then falls short of is a metric and a log
line. Replication never stops to save history (docs/design.md invariant 5).

A point's age is counted as the RPO counts it (docs/recovery-points.md): from
``min(capture_ns, applied_ns)``, so a source clock running ahead cannot keep a
point past its window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from mastertarget.points import RecoveryPoint
from protocol.sequencing import StreamPosition

#: Share of the points dropped per step when the volume is over its
#: high-water mark: quick to relieve the volume, without emptying it at once.
PRESSURE_STEP: Final = 0.10


@dataclass(frozen=True, slots=True)
class Cutoff:
    """Where history starts after pruning, and why."""

    keep_from: StreamPosition
    #: points dropped because they were older than the window
    expired: int
    #: points dropped early because the volume was over its high-water mark
    early: int


def point_age_ns(point: RecoveryPoint, now_ns: int) -> int:
    """The age of a point by the master target's own clock (see the module docstring)."""
    return max(0, now_ns - min(point.capture_ns, point.applied_ns))


def choose_cutoff(
    head: Sequence[RecoveryPoint],
    total: int,
    *,
    now_ns: int,
    window_s: float,
    over_high_water: bool,
) -> tuple[int, int] | None:
    """Which point history starts at after pruning, by its index in stream order.

    The newest point is always kept: it is the target itself.

    Args:
        head: the oldest points in stream order, at least up to the first one
            inside the window (or all of them).
        total: how many points the disk has.
        now_ns: the master target's time.
        window_s: the retention window.
        over_high_water: the volume is over its high-water mark: drop a
            further tenth of what is left (at least one point).

    Returns:
        ``(keep, expired)``: the index of the oldest point kept and how many
        went for their age; None when nothing needs to go.
    """
    if total <= 1:
        return None
    window_ns = int(window_s * 1e9)
    inside = (i for i, p in enumerate(head) if point_age_ns(p, now_ns) <= window_ns)
    keep = min(next(inside, total - 1), total - 1)
    expired = keep
    if over_high_water:
        keep = min(total - 1, keep + max(1, (total - keep) // int(1 / PRESSURE_STEP)))
    return None if keep == 0 else (keep, expired)
