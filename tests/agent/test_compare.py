"""The comparison's pure parts: the plan of spans, digests, differing chunks, runs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import xxhash

from agent.compare import (
    FIRST_SPAN_REGIONS,
    ComparePlan,
    Granularity,
    Region,
    differing_chunks,
    hash_region,
    runs,
)
from agent.errors import SourceError
from agent.source import READ_PIECE_BYTES, SourceDisk
from protocol.limits import KiB, MiB

REGION = 64 * MiB
CHUNK = 64 * KiB


def _spans(plan: ComparePlan, outcome: bool | None = None) -> list[tuple[str, int]]:
    """Every span of the plan, each region observed as ``outcome`` (None: nothing observed)."""
    seen = []
    while (span := plan.next_span()) is not None:
        seen.append((span.granularity.value, len(span.regions)))
        for _ in span.regions:
            if outcome is not None:
                plan.observe(outcome)
    return seen


def test_a_disk_that_compares_equal_costs_few_requests() -> None:
    size = 2**40  # 1 TiB: 16384 regions
    plan = ComparePlan(0, size, REGION, CHUNK)
    spans = _spans(plan, outcome=False)
    assert {kind for kind, _ in spans} == {"region"}
    assert sum(count for _, count in spans) == size // REGION
    assert len(spans) == 14  # 4, 8, 16, ... 4096, then what is left in two and a bit


def test_a_disk_that_differs_everywhere_is_compared_chunk_by_chunk() -> None:
    plan = ComparePlan(0, 64 * REGION, REGION, CHUNK)
    spans = _spans(plan, outcome=True)
    assert spans[0] == ("region", FIRST_SPAN_REGIONS)
    assert spans[2:] == [("chunk", 4)] * ((64 - spans[0][1] - spans[1][1]) // 4)


def test_the_plan_turns_back_to_regions_when_differences_stop() -> None:
    plan = ComparePlan(0, 400 * REGION, REGION, CHUNK)
    kinds, compared = [], 0
    while (span := plan.next_span()) is not None:
        kinds.append(span.granularity)
        for _ in span.regions:
            plan.observe(compared < 40)  # the first 40 regions differ, the rest are equal
            compared += 1
    assert kinds[0] is Granularity.REGION
    assert Granularity.CHUNK in kinds
    assert kinds[-1] is Granularity.REGION


def test_regions_start_at_the_cursor_and_stop_at_the_end() -> None:
    plan = ComparePlan(3 * CHUNK, 2 * REGION + 5000, REGION, CHUNK)
    span = plan.next_span()
    assert span is not None
    assert [(r.offset, r.length) for r in span.regions] == [
        (3 * CHUNK, REGION),
        (3 * CHUNK + REGION, REGION + 5000 - 3 * CHUNK),
    ]
    assert plan.next_span() is None


@pytest.mark.parametrize("mapped", [True, False], ids=["image-file", "block-device-reads"])
def test_hashing_a_region_matches_the_master_targets_digests(tmp_path: Path, mapped: bool) -> None:
    data = random.Random(1).randbytes(READ_PIECE_BYTES + 3 * CHUNK + 1000)
    path = tmp_path / "s.raw"
    path.write_bytes(data)
    region = Region(CHUNK, len(data) - CHUNK)
    with SourceDisk(path) as source:
        source.mappable = mapped  # a block device is read, never mapped
        digests = hash_region(source, region, CHUNK, bytearray(READ_PIECE_BYTES))
    part = data[CHUNK:]
    assert digests.whole == xxhash.xxh3_128_digest(part)
    assert digests.chunks == b"".join(
        xxhash.xxh3_128_digest(part[i : i + CHUNK]) for i in range(0, len(part), CHUNK)
    )


def test_differing_chunks_and_their_runs() -> None:
    source = b"".join(bytes([n]) * 16 for n in range(10))
    target = bytearray(source)
    for index in (0, 3, 4, 5, 9):
        target[index * 16] ^= 1
    found = differing_chunks(source, bytes(target))
    assert found == [0, 3, 4, 5, 9]
    assert list(runs(found)) == [(0, 1), (3, 3), (9, 1)]
    assert differing_chunks(source, source) == []
    assert list(runs([])) == []
    with pytest.raises(ValueError, match="expected 10 target digests, found 9"):
        differing_chunks(source, source[:-16])


def test_the_first_span_is_a_probe_the_next_waits_for() -> None:
    plan = ComparePlan(0, 64 * REGION, REGION, CHUNK)
    assert plan.decided
    first = plan.next_span()
    assert first is not None
    assert first.granularity is Granularity.REGION
    assert not plan.decided  # the probe's regions are not seen yet
    for _ in range(len(first.regions) - 1):
        plan.observe(True)
    assert not plan.decided
    plan.observe(True)
    assert plan.decided
    second = plan.next_span()
    assert second is not None
    assert second.granularity is Granularity.CHUNK  # every probed region differed
    assert plan.decided  # later spans do not wait


def test_a_source_file_that_shrank_is_not_mapped(tmp_path: Path) -> None:
    path = tmp_path / "s.raw"
    path.write_bytes(bytes(4 * CHUNK))
    with SourceDisk(path) as source:
        os.truncate(path, 2 * CHUNK)
        with pytest.raises(SourceError, match="is now 131072 bytes, expected at least 262144"):
            hash_region(source, Region(0, 4 * CHUNK), CHUNK, bytearray(READ_PIECE_BYTES))
