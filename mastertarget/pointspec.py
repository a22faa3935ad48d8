"""Point SPECs: how an operator names a recovery point, and which point that picks.

``mastertarget points/recover/failover --point SPEC`` takes one of (docs/design.md):

==================  ==========================================================
``latest``          the newest consistent point. Callers drain the inbox
                    first, so every pending file is applied: the lowest RPO
                    (the seeds' "Latest").
``latest-processed`` the newest consistent point already applied, without
                    waiting for the inbox: the lowest RTO (the seeds' "Latest
                    processed").
``latest-app``      the newest consistent app-consistent (APP) point.
ISO-8601 time       the newest consistent point captured at or before it,
                    e.g. ``2026-11-22T03:15:00Z``, ``2026-11-22T04:15:00+01:00``,
                    ``2026-11-22T03:15:00.250Z``.
``tag:NAME``        the newest consistent point tagged NAME (names may repeat).
==================  ==========================================================

Only consistent points are ever chosen (docs/design.md invariant 6). "Newest" is
the largest ``(generation, seq)``: the stream order is the truth, clocks are
not. Times are compared with ``capture_ns``, the source's clock, because an
operator names the moment on the protected machine ("just before the bad
upgrade at 03:15").

A time without a zone is refused rather than read as UTC or as local time:
the same command gives a different point on a host in another zone, and an
operator recovering at 3 a.m. must not get a point an hour off without being
told. Writing ``Z`` or an offset costs one character.

This module is pure: no I/O and no clock reads.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

from mastertarget.errors import PointNotFoundError, PointSpecError
from mastertarget.points import PointKind, RecoveryPoint
from protocol.limits import MAX_TAG_NAME_BYTES

#: What every error about a SPEC lists, so the operator sees the fix.
ACCEPTED_FORMS: Final = (
    "latest, latest-app, latest-processed, an ISO-8601 time with a zone"
    " (2026-11-22T03:15:00Z, 2026-11-22T04:15:00+01:00) or tag:NAME"
)

#: Tag names listed in a "no such tag" error: enough to spot a typo, short
#: enough for one log line.
MAX_LISTED_TAGS: Final = 5

#: Longest SPEC read at all: twice the longest valid one ("tag:" and a name of
#: MAX_TAG_NAME_BYTES), so a name a little too long still gets the precise
#: message, while a pasted blob is refused before any parsing.
MAX_SPEC_CHARS: Final = 2 * (len("tag:") + MAX_TAG_NAME_BYTES)

#: Largest hour of a zone offset: what a datetime timezone can hold (under
#: 24 h); real zones stay within -12 and +14.
MAX_OFFSET_HOURS: Final = 23

#: How much of a bad SPEC an error message quotes.
MAX_QUOTED_CHARS: Final = 80

#: Digits of a fractional second: nanoseconds, the resolution of capture_ns,
#: so a time copied from ``points --json`` selects exactly that point.
MAX_FRACTION_DIGITS: Final = 9

_NS_PER_S: Final = 1_000_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# YYYY-MM-DDTHH:MM[:SS[.fffffffff]] then Z, ±HH:MM or ±HHMM. Extended format
# only: it is what every tool prints, and one form is one less surprise.
_TIME_RE: Final = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt](?P<hour>\d{2}):(?P<minute>\d{2})"
    r"(?::(?P<second>\d{2})(?:[.,](?P<fraction>\d+))?)?"
    r"(?P<zone>[Zz]|[+-]\d{2}:?\d{2})?"
)
_DATE_RE: Final = re.compile(r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})")


class SpecKind(enum.StrEnum):
    """What a SPEC asks for."""

    LATEST = "latest"
    LATEST_APP = "latest-app"
    LATEST_PROCESSED = "latest-processed"
    AT_TIME = "time"
    TAG = "tag"


_KEYWORDS: Final = {
    "latest": SpecKind.LATEST,
    "latest-app": SpecKind.LATEST_APP,
    "latest-processed": SpecKind.LATEST_PROCESSED,
}


@dataclass(frozen=True, slots=True)
class PointSpec:
    """A parsed SPEC.

    Attributes:
        kind: what is asked for.
        time_ns: for AT_TIME, the time in nanoseconds since the epoch (UTC).
        name: for TAG, the tag name.
    """

    kind: SpecKind
    time_ns: int | None = None
    name: str = ""

    def __str__(self) -> str:
        """The SPEC in canonical form (times in UTC), as it can be given again."""
        if self.kind is SpecKind.AT_TIME:
            assert self.time_ns is not None  # set by every constructor of AT_TIME
            return format_time_ns(self.time_ns)
        if self.kind is SpecKind.TAG:
            return f"tag:{self.name}"
        return self.kind.value


def parse_spec(text: str) -> PointSpec:
    """Parse a SPEC given on the command line or in an API request.

    Keywords are matched without regard to case; tag names are exact.

    Args:
        text: the SPEC, e.g. ``latest``, ``tag:before-upgrade`` or
            ``2026-11-22T03:15:00Z``.

    Returns:
        The parsed SPEC.

    Raises:
        PointSpecError: ``text`` is none of the accepted forms, a time has no
            zone or is not a real date and time, or a tag name is empty or
            too long.
    """
    if len(text) > MAX_SPEC_CHARS:
        raise _spec_error(text, f"it is {len(text)} characters long, at most {MAX_SPEC_CHARS}")
    stripped = text.strip()
    keyword = _KEYWORDS.get(stripped.lower())
    if keyword is not None:
        return PointSpec(keyword)
    if stripped[:4].lower() == "tag:":
        return PointSpec(SpecKind.TAG, name=_parse_tag_name(text, stripped[4:]))
    if _DATE_RE.match(stripped):
        return PointSpec(SpecKind.AT_TIME, time_ns=_parse_time(text, stripped))
    raise _spec_error(text, "it is none of the accepted forms")


def _parse_tag_name(text: str, name: str) -> str:
    if not name:
        raise _spec_error(text, "the tag name after 'tag:' is empty")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_TAG_NAME_BYTES:
        raise _spec_error(
            text, f"the tag name is {size} bytes of UTF-8, at most {MAX_TAG_NAME_BYTES}"
        )
    return name


def _parse_time(text: str, stripped: str) -> int:
    """An ISO-8601 date-time with a zone -> nanoseconds since the epoch."""
    match = _TIME_RE.fullmatch(stripped)
    if match is None:
        raise _spec_error(
            text,
            "it starts like a date but is not YYYY-MM-DDTHH:MM[:SS[.fraction]] followed by"
            " Z or an offset such as +01:00",
        )
    zone = match["zone"]
    if zone is None:
        raise _spec_error(
            text,
            "the time has no zone; add Z for UTC or the offset it was written in"
            f" (e.g. {stripped}Z or {stripped}+01:00), so that no point is picked in the"
            " wrong time zone",
        )
    fraction = match["fraction"] or ""
    if len(fraction) > MAX_FRACTION_DIGITS:
        raise _spec_error(
            text,
            f"the fraction of a second has {len(fraction)} digits, at most"
            f" {MAX_FRACTION_DIGITS} (nanoseconds)",
        )
    date = _DATE_RE.fullmatch(match["date"])
    assert date is not None  # _TIME_RE only matches this date form
    try:
        tz = _parse_zone(zone)
        moment = datetime(
            int(date["year"]),
            int(date["month"]),
            int(date["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"] or 0),
            tzinfo=tz,
        )
    except ValueError as exc:
        raise _spec_error(text, f"it is not a real date and time ({exc})") from None
    whole_seconds = (moment - _EPOCH) // timedelta(seconds=1)
    return whole_seconds * _NS_PER_S + int(fraction.ljust(MAX_FRACTION_DIGITS, "0"))


def _parse_zone(zone: str) -> timezone:
    if zone in ("Z", "z"):
        return UTC
    digits = zone[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > MAX_OFFSET_HOURS or minutes >= 60:
        raise ValueError(
            f"offset {zone} is not between -{MAX_OFFSET_HOURS}:59 and +{MAX_OFFSET_HOURS}:59"
        )
    offset = timedelta(hours=hours, minutes=minutes)
    return timezone(-offset if zone[0] == "-" else offset)


def _spec_error(text: str, why: str) -> PointSpecError:
    quoted = text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."
    return PointSpecError(
        f"point SPEC {quoted!r} is not valid: {why}; accepted forms: {ACCEPTED_FORMS}",
        details={"spec": quoted, "accepted": ACCEPTED_FORMS},
    )


def format_time_ns(time_ns: int) -> str:
    """A time in nanoseconds since the epoch as ISO-8601 UTC, e.g. ``2026-11-22T03:15:00.25Z``.

    The fraction keeps every significant digit down to the nanosecond, so the
    text given back as a SPEC selects the very point it was printed for.
    """
    seconds, nanos = divmod(time_ns, _NS_PER_S)
    text = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


def _position(point: RecoveryPoint) -> tuple[int, int]:
    return (point.generation, point.seq)


def select_point(
    spec: PointSpec,
    points: Sequence[RecoveryPoint],
    *,
    processed_seq: tuple[int, int] | None = None,
) -> RecoveryPoint:
    """The recovery point a SPEC names among one disk's points.

    Args:
        spec: a parsed SPEC.
        points: the disk's points in any order, consistent or not.
        processed_seq: for ``latest-processed``, the ``(generation, seq)``
            applied so far; None means everything listed is processed, and
            the SPEC then picks the same point as ``latest``.

    Returns:
        The newest (largest ``(generation, seq)``) consistent point that
        matches.

    Raises:
        PointNotFoundError: no consistent point matches; the message names
            the SPEC and the window of points that is available.
    """
    consistent = [p for p in points if p.consistent]
    candidates: list[RecoveryPoint]
    match spec.kind:
        case SpecKind.LATEST:
            candidates = consistent
        case SpecKind.LATEST_PROCESSED:
            candidates = (
                consistent
                if processed_seq is None
                else [p for p in consistent if _position(p) <= processed_seq]
            )
        case SpecKind.LATEST_APP:
            # Only APP tags mean applications were quiesced; a GROUP tag is
            # crash-consistent across disks, not app-consistent.
            candidates = [p for p in consistent if p.kind is PointKind.APP]
        case SpecKind.AT_TIME:
            assert spec.time_ns is not None  # set by every constructor of AT_TIME
            candidates = [p for p in consistent if p.capture_ns <= spec.time_ns]
        case SpecKind.TAG:
            candidates = [p for p in consistent if p.name == spec.name]
    if candidates:
        return max(candidates, key=_position)
    raise _not_found(spec, points, consistent, processed_seq)


def format_window(points: Sequence[RecoveryPoint]) -> dict[str, object]:
    """The retention window of one disk's offered points, for JSON answers.

    Only consistent points count, as only they can be chosen. The oldest and
    newest are by stream position; their times are capture times in UTC.

    Returns:
        ``{"oldest": ISO | None, "newest": ISO | None, "points": N,
        "window_s": float}``; ``window_s`` is 0.0 with fewer than two points.
    """
    consistent = [p for p in points if p.consistent]
    if not consistent:
        return {"oldest": None, "newest": None, "points": 0, "window_s": 0.0}
    oldest = min(consistent, key=_position)
    newest = max(consistent, key=_position)
    # A source clock stepped backwards can make the newest capture time the
    # smaller one; a window is never negative.
    window_ns = max(0, newest.capture_ns - oldest.capture_ns)
    return {
        "oldest": format_time_ns(oldest.capture_ns),
        "newest": format_time_ns(newest.capture_ns),
        "points": len(consistent),
        "window_s": window_ns / _NS_PER_S,
    }


def _describe(point: RecoveryPoint) -> str:
    return f"{format_time_ns(point.capture_ns)} (generation {point.generation} seq {point.seq})"


def _not_found(
    spec: PointSpec,
    points: Sequence[RecoveryPoint],
    consistent: list[RecoveryPoint],
    processed_seq: tuple[int, int] | None,
) -> PointNotFoundError:
    details: dict[str, object] = {
        "spec": str(spec),
        "points": len(points),
        "consistent_points": len(consistent),
        "window": format_window(points),
    }
    if not consistent:
        why = (
            "the disk has no recovery points yet"
            if not points
            else f"none of its {len(points)} points is consistent"
            " (they were taken during a resync, which must finish first)"
        )
        return PointNotFoundError(f"no recovery point matches {spec}: {why}", details=details)
    oldest = min(consistent, key=_position)
    newest = max(consistent, key=_position)
    window = (
        f"{len(consistent)} consistent of {len(points)} points, oldest {_describe(oldest)},"
        f" newest {_describe(newest)}"
    )
    why = _why_no_match(spec, points, consistent, processed_seq)
    if spec.kind is SpecKind.TAG:
        details["tags"] = _tag_names(consistent)
    details["oldest_position"] = list(_position(oldest))
    details["newest_position"] = list(_position(newest))
    return PointNotFoundError(
        f"no recovery point matches {spec}: {why}; available: {window}", details=details
    )


def _why_no_match(
    spec: PointSpec,
    points: Sequence[RecoveryPoint],
    consistent: list[RecoveryPoint],
    processed_seq: tuple[int, int] | None,
) -> str:
    match spec.kind:
        case SpecKind.LATEST_PROCESSED:
            assert processed_seq is not None  # without it every point matches
            generation, seq = processed_seq
            return f"none is at or before the processed position generation {generation} seq {seq}"
        case SpecKind.LATEST_APP:
            return "none is app-consistent (no APP tag has been applied, or it was pruned)"
        case SpecKind.AT_TIME:
            earliest = min(p.capture_ns for p in consistent)
            return (
                f"the time is before the earliest capture time {format_time_ns(earliest)};"
                " points before it were pruned by retention or never taken"
            )
        case SpecKind.TAG:
            return _why_no_tag(spec.name, points, consistent)
        case SpecKind.LATEST:  # pragma: no cover - any consistent point matches
            return "no consistent point"


def _why_no_tag(name: str, points: Sequence[RecoveryPoint], consistent: list[RecoveryPoint]) -> str:
    if any(p.name == name for p in points):
        return (
            f"tag {name!r} is only on points taken during a resync, which are not offered"
            " (docs/design.md invariant 6)"
        )
    names = _tag_names(consistent)
    if not names:
        return f"no tag {name!r}; no consistent point has a tag name"
    known = len({p.name for p in consistent if p.name})
    more = f" ({known} in all)" if known > len(names) else ""
    return f"no tag {name!r}; newest known tag names: {', '.join(names)}{more}"


def _tag_names(consistent: list[RecoveryPoint]) -> list[str]:
    """Up to MAX_LISTED_TAGS distinct tag names, newest first."""
    names: list[str] = []
    for point in sorted(consistent, key=_position, reverse=True):
        if point.name and point.name not in names:
            names.append(point.name)
            if len(names) == MAX_LISTED_TAGS:
                break
    return names
