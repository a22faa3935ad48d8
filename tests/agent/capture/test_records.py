"""Requests into records and batches, ranges into chunks (agent/capture/records.py), and
the ranges plan of a capture resync (agent/compare.py)."""

from __future__ import annotations

import pytest

from agent.capture.plugin import wire
from agent.capture.records import Request, chunk_ranges, pack, records_of
from agent.compare import ComparePlan, Granularity, RangesPlan
from protocol.limits import MAX_RECORDS_PER_BATCH, MAX_WRITE_BYTES
from protocol.records import Write, Zero, encoded_size

MiB = 2**20
KiB = 1024


def _write(offset: int, data: bytes) -> Request:
    return Request(wire.Frame(wire.FrameType.WRITE, 0, 1, offset, len(data), data), 0)


def test_a_large_write_is_cut_at_the_write_limit_and_zeros_travel_without_data() -> None:
    data = bytes(range(256)) * (9 * MiB // 256)
    records = list(records_of(_write(MiB, data)))
    assert [(r.offset, r.length) for r in records] == [
        (MiB, MAX_WRITE_BYTES), (5 * MiB, MAX_WRITE_BYTES), (9 * MiB, MiB),
    ]  # fmt: skip
    assert all(isinstance(r, Write) for r in records)
    assert list(records_of(_write(0, bytes(64 * KiB)))) == [Zero(0, 64 * KiB)]
    zero = Request(wire.Frame(wire.FrameType.ZERO, wire.WriteFlags.TRIM, 2, 4096, 8192), 0)
    assert list(records_of(zero)) == [Zero(4096, 8192)]


def test_batches_stay_under_the_payload_and_the_record_count() -> None:
    writes = [Write(n * 4096, b"x" * 4096) for n in range(100)]
    batches = list(pack(writes, 10 * encoded_size(writes[0])))
    assert [len(b) for b in batches] == [10] * 10
    big = Write(0, b"y" * MAX_WRITE_BYTES)
    assert [len(b) for b in pack([big, big], 1024)] == [1, 1]  # one record always fits
    zeros = [Zero(n, 1) for n in range(MAX_RECORDS_PER_BATCH + 1)]
    assert [len(b) for b in pack(zeros, 2**40)] == [MAX_RECORDS_PER_BATCH, 1]


def test_dirty_ranges_are_widened_to_chunks_and_merged() -> None:
    chunk = 4 * MiB
    ranges = [(MiB, MiB), (3 * MiB, MiB), (9 * MiB, MiB), (30 * MiB, MiB)]
    assert chunk_ranges(ranges, chunk, 31 * MiB) == [(0, 4 * MiB), (8 * MiB, 4 * MiB),
                                                     (28 * MiB, 3 * MiB)]  # fmt: skip
    assert chunk_ranges([(0, MiB)], 64 * KiB, 10 * MiB) == [(0, MiB)]


def test_a_short_range_is_asked_chunk_by_chunk_in_one_span() -> None:
    plan = RangesPlan([(2 * MiB, 3 * MiB), (40 * MiB, MiB)], 2 * MiB, 64 * KiB)
    first = plan.next_span()
    assert first is not None
    assert first.granularity is Granularity.CHUNK
    assert [(r.offset, r.length) for r in first.regions] == [(2 * MiB, 2 * MiB),
                                                             (4 * MiB, MiB)]  # fmt: skip
    second = plan.next_span()
    assert second is not None
    assert [(r.offset, r.length) for r in second.regions] == [(40 * MiB, MiB)]
    assert plan.next_span() is None


def test_a_long_range_is_planned_as_the_whole_disk_comparison_is() -> None:
    whole = 64 * MiB
    plan = RangesPlan([(0, whole)], MiB, 64 * KiB)
    reference = ComparePlan(0, whole, MiB, 64 * KiB)
    span, expected = plan.next_span(), reference.next_span()
    assert span == expected
    assert span is not None
    assert span.granularity is Granularity.REGION  # sparse first: a probe
    assert not plan.decided  # the next span waits for the probe's regions
    for _ in span.regions:
        plan.observe(False)
    assert plan.decided
    covered = span.length
    while (span := plan.next_span()) is not None:
        covered += span.length
    assert covered == whole


@pytest.mark.parametrize("size", [MiB, 3 * MiB + 4096])
def test_the_plan_covers_exactly_the_ranges(size: int) -> None:
    plan = RangesPlan([(0, size)], MiB, 4096)
    spans = []
    while (span := plan.next_span()) is not None:
        spans.append(span)
    assert sum(s.length for s in spans) == size
