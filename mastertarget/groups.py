"""Consistency groups at the master target: the points common to every disk of a group.

A group round (docs/groups.md) holds the writes of every disk of every
member machine at once, then puts a GROUP tag with one tag id, name and time
into each disk's stream. A **group point** is such a tag id once every disk
of the group (``[[groups]] disks``) has applied a consistent GROUP point with
it: recovering each disk at its own GROUP point of that tag id gives the
disks as they were at one instant. A tag id that some disk lacks (a round
that aborted half-way, a point pruned or inside a resync on one disk) is no
group point.

An app-consistent round puts an APP tag with the same tag id right before
the GROUP tag on every disk (nothing can come between: writes are held); the
group point is app-consistent when every disk has it.

Group points are ordered by the stream of the group's first disk. Every disk
agrees on that order: a member takes one round at a time, and all disks of a
round are held at one common instant, so two rounds' holds follow each other
in the same order on every disk.

This module is pure: no I/O and no clock reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from mastertarget.errors import PointNotFoundError
from mastertarget.points import PointKind, RecoveryPoint
from mastertarget.pointspec import PointSpec, SpecKind, format_time_ns

#: Tag names listed in a "no such tag" error, as for one disk.
MAX_LISTED_TAGS: Final = 5
_NS_PER_S: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class GroupPoint:
    """A point common to every disk of a group.

    Attributes:
        group_id: the group.
        tag_id: the round's tag id.
        name: the round's name.
        capture_ns: the round's time (the coordinator's clock).
        applied_ns: when the last of the disks applied its tag (this
            master target's clock): the moment the point became whole.
        app: every member was quiesced before the tag.
        members: each disk's own GROUP point, in the group's disk order.
    """

    group_id: str
    tag_id: bytes
    name: str
    capture_ns: int
    applied_ns: int
    app: bool
    members: tuple[RecoveryPoint, ...]

    @property
    def kind(self) -> str:
        """``app`` or ``crash``: what the point is consistent for."""
        return "app" if self.app else "crash"


def common_points(
    group_id: str, disks: Sequence[str], points: Iterable[RecoveryPoint]
) -> list[GroupPoint]:
    """The group points among the catalog's points of the group's disks, oldest first.

    Args:
        group_id: the group.
        disks: every disk of the group, in the config's order.
        points: the disks' GROUP points of the group and the APP points that
            share a tag id with one (StateStore.group_points), in any order.
    """
    wanted = set(disks)
    by_tag: dict[bytes, dict[str, RecoveryPoint]] = {}
    app_tags: set[tuple[str, int, int, bytes]] = set()
    for point in points:
        if point.disk_id not in wanted or not point.consistent:
            continue
        if point.kind is PointKind.GROUP and point.group_id == group_id:
            by_tag.setdefault(point.tag_id, {}).setdefault(point.disk_id, point)
        elif point.kind is PointKind.APP:
            app_tags.add((point.disk_id, point.generation, point.seq, point.tag_id))
    common = []
    for tag_id, found in by_tag.items():
        if len(found) != len(wanted):
            continue
        members = tuple(found[disk] for disk in disks)
        app = all((m.disk_id, m.generation, m.seq - 1, tag_id) in app_tags for m in members)
        first = members[0]
        applied_ns = max(m.applied_ns for m in members)
        common.append(
            GroupPoint(group_id, tag_id, first.name, first.capture_ns, applied_ns, app, members)
        )
    common.sort(key=lambda p: (p.members[0].generation, p.members[0].seq))
    return common


def select_group_point(spec: PointSpec, group_id: str, points: Sequence[GroupPoint]) -> GroupPoint:
    """The group point a SPEC names, as :func:`~mastertarget.pointspec.select_point`
    does for one disk.

    ``latest`` and ``latest-processed`` both take the newest: a group point
    exists only once every disk has applied it (the caller drains the inbox
    first for ``latest``). A time is compared with the round's time.

    Args:
        points: the group's points, oldest first (:func:`common_points`).

    Raises:
        PointNotFoundError: none matches; the message names the window.
    """
    match spec.kind:
        case SpecKind.LATEST | SpecKind.LATEST_PROCESSED:
            candidates = list(points)
        case SpecKind.LATEST_APP:
            candidates = [p for p in points if p.app]
        case SpecKind.AT_TIME:
            assert spec.time_ns is not None  # set by every constructor of AT_TIME
            candidates = [p for p in points if p.capture_ns <= spec.time_ns]
        case SpecKind.TAG:
            candidates = [p for p in points if p.name == spec.name]
    if candidates:
        return candidates[-1]
    raise _not_found(spec, group_id, points)


def group_window(points: Sequence[GroupPoint]) -> dict[str, object]:
    """The window of a group's points, shaped as one disk's (pointspec.format_window)."""
    if not points:
        return {"oldest": None, "newest": None, "points": 0, "window_s": 0.0}
    oldest, newest = points[0], points[-1]
    return {
        "oldest": format_time_ns(oldest.capture_ns),
        "newest": format_time_ns(newest.capture_ns),
        "points": len(points),
        "window_s": max(0, newest.capture_ns - oldest.capture_ns) / _NS_PER_S,
    }


def _not_found(spec: PointSpec, group_id: str, points: Sequence[GroupPoint]) -> PointNotFoundError:
    details: dict[str, object] = {
        "spec": str(spec),
        "group": group_id,
        "window": group_window(points),
    }
    if not points:
        return PointNotFoundError(
            f"no group point of {group_id} matches {spec}: the group has no common point yet "
            "(every disk of the group must apply the GROUP tag of one round; are the members "
            "running 'blockrepl agent group', and do the rounds commit?)",
            details=details,
        )
    match spec.kind:
        case SpecKind.LATEST_APP:
            why = "none is app-consistent (no app-consistent group round reached every disk)"
        case SpecKind.AT_TIME:
            earliest = format_time_ns(points[0].capture_ns)
            why = (
                f"the time is before the earliest group point {earliest};"
                " points before it were pruned by retention or never taken"
            )
        case SpecKind.TAG:
            names: list[str] = []
            for point in reversed(points):
                if point.name not in names:
                    names.append(point.name)
            details["tags"] = names = names[:MAX_LISTED_TAGS]
            why = f"no group point is named {spec.name!r}; newest names: {', '.join(names)}"
        case _:  # pragma: no cover - latest matches any point
            why = "no point"
    window = (
        f"{len(points)} group points, oldest {format_time_ns(points[0].capture_ns)}, newest "
        f"{format_time_ns(points[-1].capture_ns)}"
    )
    return PointNotFoundError(
        f"no group point of {group_id} matches {spec}: {why}; available: {window}", details=details
    )
