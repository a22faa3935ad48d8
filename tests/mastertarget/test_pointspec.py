"""Point SPECs: parsing every accepted form, refusing the rest, and choosing points."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mastertarget.errors import PointNotFoundError, PointSpecError
from mastertarget.points import PointKind, RecoveryPoint
from mastertarget.pointspec import (
    MAX_LISTED_TAGS,
    PointSpec,
    SpecKind,
    format_time_ns,
    format_window,
    parse_spec,
    select_point,
)

S = 1_000_000_000
#: 2026-11-22T03:15:00Z
T0 = int(datetime(2026, 11, 22, 3, 15, tzinfo=UTC).timestamp()) * S


# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("latest", PointSpec(SpecKind.LATEST)),
        ("LATEST", PointSpec(SpecKind.LATEST)),
        (" latest-app ", PointSpec(SpecKind.LATEST_APP)),
        ("latest-processed", PointSpec(SpecKind.LATEST_PROCESSED)),
        ("tag:before-upgrade", PointSpec(SpecKind.TAG, name="before-upgrade")),
        ("TAG:Nightly", PointSpec(SpecKind.TAG, name="Nightly")),
        ("tag:a:b", PointSpec(SpecKind.TAG, name="a:b")),
        ("tag:latest", PointSpec(SpecKind.TAG, name="latest")),
        ("2026-11-22T03:15:00Z", PointSpec(SpecKind.AT_TIME, time_ns=T0)),
        ("2026-11-22t03:15:00z", PointSpec(SpecKind.AT_TIME, time_ns=T0)),
        ("2026-11-22T03:15Z", PointSpec(SpecKind.AT_TIME, time_ns=T0)),
        ("2026-11-22T04:15:00+01:00", PointSpec(SpecKind.AT_TIME, time_ns=T0)),
        ("2026-11-22T04:15:00+0100", PointSpec(SpecKind.AT_TIME, time_ns=T0)),
        ("2026-11-21T21:45:00-05:30", PointSpec(SpecKind.AT_TIME, time_ns=T0)),
        ("2026-11-22T03:15:00+00:00", PointSpec(SpecKind.AT_TIME, time_ns=T0)),
        ("2026-11-22T03:15:00.5Z", PointSpec(SpecKind.AT_TIME, time_ns=T0 + S // 2)),
        ("2026-11-22T03:15:00,25Z", PointSpec(SpecKind.AT_TIME, time_ns=T0 + S // 4)),
        ("2026-11-22T03:15:00.000000001Z", PointSpec(SpecKind.AT_TIME, time_ns=T0 + 1)),
        ("2026-11-22T03:15:00.123456789Z", PointSpec(SpecKind.AT_TIME, time_ns=T0 + 123456789)),
        ("1969-12-31T23:59:59Z", PointSpec(SpecKind.AT_TIME, time_ns=-S)),
    ],
)
def test_parse_accepts(text: str, expected: PointSpec) -> None:
    assert parse_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "none of the accepted forms"),
        ("newest", "none of the accepted forms"),
        ("latest_app", "none of the accepted forms"),
        ("tag:", "tag name after 'tag:' is empty"),
        ("tag:" + "x" * 129, "at most 128"),
        ("tag:" + "é" * 65, "130 bytes of UTF-8, at most 128"),
        ("2026-11-22T03:15:00", "has no zone; add Z for UTC"),
        ("2026-11-22T03:15", "has no zone"),
        ("2026-11-22", "YYYY-MM-DDTHH:MM"),
        ("2026-11-22 03:15:00Z", "YYYY-MM-DDTHH:MM"),
        ("2026-11-22T03:15:00 UTC", "YYYY-MM-DDTHH:MM"),
        ("20261122T031500Z", "none of the accepted forms"),
        ("2026-02-30T00:00:00Z", "not a real date and time (day is out of range"),
        ("2026-11-22T24:00:00Z", "hour must be in 0..23"),
        ("2026-11-22T03:15:60Z", "second must be in 0..59"),
        ("2026-11-22T03:15:00+24:00", "offset +24:00 is not between -23:59 and +23:59"),
        ("2026-11-22T03:15:00+01:60", "offset +01:60"),
        ("2026-11-22T03:15:00.1234567890Z", "10 digits, at most 9 (nanoseconds)"),
        ("x" * 1000, "1000 characters long, at most 264"),
    ],
)
def test_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(PointSpecError) as info:
        parse_spec(text)
    error = info.value
    assert message in error.message
    # Every refusal lists what would have been accepted.
    assert "latest, latest-app, latest-processed" in error.message
    assert "tag:NAME" in error.message
    assert (error.code, error.http_status, error.exit_code) == ("point-spec", 400, 64)


def test_refusal_quotes_a_long_spec_only_in_part() -> None:
    with pytest.raises(PointSpecError) as info:
        parse_spec("y" * 1000)
    assert "y" * 80 + "..." in info.value.message
    assert "y" * 81 not in info.value.message


@pytest.mark.parametrize(
    "text",
    ["latest", "latest-app", "tag:x y", "2026-11-22T03:15:00Z", "2026-11-22T03:15:00.00012Z"],
)
def test_canonical_text_parses_back(text: str) -> None:
    spec = parse_spec(text)
    assert str(spec) == text
    assert parse_spec(str(spec)) == spec


@given(st.integers(min_value=-(10**18), max_value=2**62))
def test_printed_times_select_exactly(time_ns: int) -> None:
    """A time printed by format_time_ns parses back to the same nanosecond."""
    assert parse_spec(format_time_ns(time_ns)).time_ns == time_ns


# --- selection -------------------------------------------------------------------------


def point(
    seq: int,
    capture_s: float,
    *,
    generation: int = 1,
    kind: PointKind = PointKind.CRASH,
    name: str = "",
    consistent: bool = True,
) -> RecoveryPoint:
    capture_ns = T0 + int(capture_s * S)
    return RecoveryPoint(
        disk_id="d1", generation=generation, seq=seq, capture_ns=capture_ns,
        applied_ns=capture_ns + S, kind=kind, name=name, consistent=consistent,
    )  # fmt: skip


#: A disk's catalog, deliberately out of order: generation 2 started after a
#: resync whose inner points are inconsistent.
POINTS = [
    point(30, 300, kind=PointKind.APP, name="nightly"),
    point(10, 100),
    point(20, 200, kind=PointKind.CRASH, name="before-upgrade"),
    point(40, 400, kind=PointKind.GROUP, name="g", consistent=True),
    point(50, 500, kind=PointKind.APP, name="nightly"),
    point(60, 600),
    # generation 2: a resync; its first points are not consistent.
    point(1, 700, generation=2, kind=PointKind.APP, name="during-resync", consistent=False),
    point(2, 800, generation=2, kind=PointKind.APP, name="nightly", consistent=False),
    point(3, 900, generation=2, consistent=True),
    point(4, 1000, generation=2, consistent=False),
]


def pick(text: str, points: list[RecoveryPoint] = POINTS, **kw: object) -> tuple[int, int]:
    chosen = select_point(parse_spec(text), points, **kw)  # type: ignore[arg-type]
    assert chosen.consistent
    return chosen.generation, chosen.seq


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The newest consistent point, never the inconsistent (2, 4) after it.
        ("latest", (2, 3)),
        ("latest-processed", (2, 3)),
        # APP only: not the newer GROUP (1, 40), not the inconsistent APP (2, 1), (2, 2).
        ("latest-app", (1, 50)),
        # Repeated name: the newest consistent one; (2, 2) is inconsistent.
        ("tag:nightly", (1, 50)),
        ("tag:before-upgrade", (1, 20)),
        ("tag:g", (1, 40)),
        # Time exactly at a point's capture time picks it.
        ("2026-11-22T03:20:00Z", (1, 30)),  # T0 + 300 s
        # Between two points: the earlier one.
        ("2026-11-22T03:20:00.5Z", (1, 30)),
        ("2026-11-22T03:24:59.999999999Z", (1, 50)),  # just before (1, 60)
        # The same instant written in another zone.
        ("2026-11-22T04:20:00+01:00", (1, 30)),
        # At an inconsistent point's time: the consistent one before it.
        ("2026-11-22T03:26:40Z", (1, 60)),  # T0 + 700 s: (2, 1) is inconsistent
        ("2026-11-22T03:30:00Z", (2, 3)),
        ("2026-11-22T03:31:40Z", (2, 3)),  # T0 + 1000 s: (2, 4) is inconsistent
        ("2099-01-01T00:00:00Z", (2, 3)),
        # The first point, exactly.
        ("2026-11-22T03:16:40Z", (1, 10)),
    ],
)
def test_select(text: str, expected: tuple[int, int]) -> None:
    assert pick(text) == expected


@pytest.mark.parametrize(
    ("processed", "expected"),
    [
        ((2, 3), (2, 3)),
        ((2, 2), (1, 60)),  # (2, 1), (2, 2) are inconsistent
        ((1, 59), (1, 50)),
        ((1, 50), (1, 50)),
        ((1, 10), (1, 10)),
        ((9, 0), (2, 3)),
    ],
)
def test_latest_processed_stops_at_the_processed_position(
    processed: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert pick("latest-processed", processed_seq=processed) == expected
    # "latest" is not limited by it: its callers drain the inbox first.
    assert pick("latest", processed_seq=processed) == (2, 3)


def test_newest_is_by_stream_position_not_by_clock() -> None:
    """A source clock stepped back gives a newer point an older capture time."""
    points = [point(1, 500), point(2, 100)]
    assert pick("latest", points) == (1, 2)
    assert pick("2026-11-22T03:25:00Z", points) == (1, 2)  # T0 + 600 s: both qualify


def not_found(text: str, points: list[RecoveryPoint] = POINTS, **kw: object) -> PointNotFoundError:
    with pytest.raises(PointNotFoundError) as info:
        select_point(parse_spec(text), points, **kw)  # type: ignore[arg-type]
    error = info.value
    assert (error.code, error.http_status, error.exit_code) == ("point-not-found", 404, 66)
    return error


def test_not_found_names_the_window() -> None:
    error = not_found("2026-11-22T03:16:39Z")
    assert error.message.startswith("no recovery point matches 2026-11-22T03:16:39Z:")
    assert "before the earliest capture time 2026-11-22T03:16:40Z" in error.message
    assert "pruned by retention or never taken" in error.message
    assert "7 consistent of 10 points" in error.message
    assert "oldest 2026-11-22T03:16:40Z (generation 1 seq 10)" in error.message
    assert "newest 2026-11-22T03:30:00Z (generation 2 seq 3)" in error.message
    assert error.details["window"] == format_window(POINTS)
    assert error.details["oldest_position"] == [1, 10]
    assert error.details["newest_position"] == [2, 3]
    assert error.details["points"] == 10
    assert error.details["consistent_points"] == 7


def test_not_found_for_an_unknown_tag_lists_known_names() -> None:
    error = not_found("tag:nigthly")
    assert "no tag 'nigthly'; newest known tag names: nightly, g, before-upgrade" in error.message
    assert error.details["tags"] == ["nightly", "g", "before-upgrade"]
    assert "during-resync" not in error.message


def test_not_found_lists_at_most_five_tag_names() -> None:
    points = [point(i, i, name=f"t{i}") for i in range(1, 9)]
    error = not_found("tag:nope", points)
    assert "newest known tag names: t8, t7, t6, t5, t4 (8 in all)" in error.message
    assert len(error.details["tags"]) == MAX_LISTED_TAGS  # type: ignore[arg-type]


def test_a_tag_only_on_inconsistent_points_is_not_offered() -> None:
    error = not_found("tag:during-resync")
    assert "only on points taken during a resync" in error.message


def test_not_found_without_app_points() -> None:
    error = not_found("latest-app", [point(1, 1), point(2, 2, kind=PointKind.GROUP)])
    assert "none is app-consistent" in error.message


def test_not_found_before_the_processed_position() -> None:
    error = not_found("latest-processed", POINTS, processed_seq=(1, 9))
    assert "at or before the processed position generation 1 seq 9" in error.message


def test_not_found_on_an_empty_catalog() -> None:
    for text in ("latest", "latest-app", "latest-processed", "tag:x", "2026-11-22T03:15:00Z"):
        error = not_found(text, [])
        assert "the disk has no recovery points yet" in error.message
        assert error.details["points"] == 0
        assert error.details["window"] == format_window([])


def test_not_found_when_every_point_is_inconsistent() -> None:
    error = not_found("latest", [point(1, 1, consistent=False), point(2, 2, consistent=False)])
    assert "none of its 2 points is consistent" in error.message
    assert "resync" in error.message


# --- window ----------------------------------------------------------------------------


def test_format_window() -> None:
    assert format_window(POINTS) == {
        "oldest": "2026-11-22T03:16:40Z",
        "newest": "2026-11-22T03:30:00Z",
        "points": 7,
        "window_s": 800.0,
    }
    assert format_window([]) == {"oldest": None, "newest": None, "points": 0, "window_s": 0.0}
    assert format_window([point(1, 1, consistent=False)])["points"] == 0
    # A clock stepped back never gives a negative window.
    assert format_window([point(1, 500), point(2, 100)])["window_s"] == 0.0


def test_format_time_ns() -> None:
    assert format_time_ns(T0) == "2026-11-22T03:15:00Z"
    assert format_time_ns(T0 + 1) == "2026-11-22T03:15:00.000000001Z"
    assert format_time_ns(T0 + S // 2) == "2026-11-22T03:15:00.5Z"
    assert format_time_ns(-1) == "1969-12-31T23:59:59.999999999Z"


# --- property: a time SPEC picks the newest consistent point at or before it -------------

points_strategy = st.lists(
    st.builds(
        RecoveryPoint,
        disk_id=st.just("d1"),
        generation=st.integers(1, 3),
        seq=st.integers(0, 50),
        capture_ns=st.integers(0, 100),
        applied_ns=st.integers(0, 100),
        kind=st.sampled_from(PointKind),
        name=st.sampled_from(["", "a", "b"]),
        consistent=st.booleans(),
    ),
    max_size=30,
)


@given(points_strategy, st.integers(-10, 110))
def test_time_spec_picks_newest_at_or_before(points: list[RecoveryPoint], t: int) -> None:
    spec = PointSpec(SpecKind.AT_TIME, time_ns=t)
    eligible = [p for p in points if p.consistent and p.capture_ns <= t]
    if not eligible:
        with pytest.raises(PointNotFoundError):
            select_point(spec, points)
        return
    chosen = select_point(spec, points)
    assert chosen.consistent
    assert chosen.capture_ns <= t
    assert not any((p.generation, p.seq) > (chosen.generation, chosen.seq) for p in eligible)


@given(points_strategy, st.sampled_from(["latest", "latest-app", "tag:a", "tag:b"]))
def test_any_spec_picks_only_consistent_points(points: list[RecoveryPoint], text: str) -> None:
    try:
        chosen = select_point(parse_spec(text), points)
    except PointNotFoundError:
        assert not any(p.consistent for p in points) or text != "latest"
        return
    assert chosen.consistent
    assert chosen in points
