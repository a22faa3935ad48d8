"""Comparing the source with the target by digests, hierarchically.

The disk is cut into *regions* (64 MiB by default) and regions into
*chunks* (64 KiB). The target's digests come from the master target's
checksums endpoint (XXH3-128 per chunk, docs/api.md), the source's from
reading it here. The comparison asks for digests in *spans* of consecutive
regions, one request per span, at one of two granularities:

- **sparse**: one digest per region; only a region whose digest differs is
  asked for again, chunk by chunk. A 1 TiB disk with a few differences costs
  a few requests and about 256 KiB of digests, not 16 Mi chunk digests.
- **dense**: chunk digests straight away. When most regions differ (an
  initial sync onto an empty target, a disk rewritten since), the region
  digests would only cost the master target a second read of each region.

:class:`ComparePlan` decides the spans from what the last regions showed
(pure logic, no I/O): sparse spans double in length while few regions
differ, the plan turns dense when most of the recent regions differed and
back to sparse when few did. The digests of a chunk are compared, never the
data: a chunk is sent when its XXH3-128 differs from the target's.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import xxhash

from agent.source import READ_PIECE_BYTES, SourceDisk

DIGEST_BYTES: Final = 16
#: Regions in the first sparse span, and after a turn back from dense: a few
#: round trips early on tell the plan which way the disk leans.
FIRST_SPAN_REGIONS: Final = 4
#: Most regions in one sparse span: 4096 digests of 64 MiB regions cover
#: 256 GiB with one request, and a lost connection repeats at most that.
MAX_SPAN_REGIONS: Final = 4096
#: Regions in one dense span: 4 x 1024 chunk digests (64 KiB of answer) keep
#: a request short enough to pipeline with the reading of the source.
DENSE_SPAN_REGIONS: Final = 4
#: How many of the latest regions the plan looks at, and the shares of them
#: that differ above which it turns dense and below which it turns sparse.
RECENT_REGIONS: Final = 8
DENSE_ABOVE: Final = 0.75
SPARSE_BELOW: Final = 0.25


class Granularity(enum.Enum):
    REGION = "region"
    CHUNK = "chunk"


@dataclass(frozen=True, slots=True)
class Region:
    """``length`` bytes of the disk from ``offset``, compared as a unit."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Span:
    """Consecutive regions whose digests are asked for in one request."""

    regions: tuple[Region, ...]
    granularity: Granularity

    @property
    def offset(self) -> int:
        return self.regions[0].offset

    @property
    def length(self) -> int:
        return self.regions[-1].end - self.regions[0].offset


@dataclass
class ComparePlan:
    """Which spans to ask for, from ``start`` to ``size``.

    Args:
        start: the first byte to compare (a multiple of ``chunk_bytes``).
        size: the disk size.
        region_bytes, chunk_bytes: as in the sync settings.
    """

    start: int
    size: int
    region_bytes: int
    chunk_bytes: int
    _next: int = field(init=False)
    _span_regions: int = field(init=False, default=FIRST_SPAN_REGIONS)
    _dense: bool = field(init=False, default=False)
    _recent: collections.deque[bool] = field(
        init=False, default_factory=lambda: collections.deque(maxlen=RECENT_REGIONS)
    )
    _observed: int = field(init=False, default=0)
    _spans: int = field(init=False, default=0)
    _first_span_regions: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._next = self.start

    @property
    def dense(self) -> bool:
        return self._dense

    def observe(self, differed: bool) -> None:
        """A region was compared; ``differed`` says whether any chunk differed."""
        self._recent.append(differed)
        self._observed += 1

    @property
    def decided(self) -> bool:
        """Whether the next span can be planned on evidence: the first span is a
        probe, and the one after it waits for the probe's regions to be seen."""
        return self._spans != 1 or self._observed >= self._first_span_regions

    def next_span(self) -> Span | None:
        """The next span to ask for, or None at the end of the disk."""
        if self._next >= self.size:
            return None
        # The share of recent regions that differed; None until enough were seen.
        share = sum(self._recent) / len(self._recent) if len(self._recent) >= 4 else None
        if share is not None and not self._dense and share >= DENSE_ABOVE:
            self._dense = True
        elif share is not None and self._dense and share <= SPARSE_BELOW:
            self._dense, self._span_regions = False, FIRST_SPAN_REGIONS
        count = DENSE_SPAN_REGIONS if self._dense else self._span_regions
        if not self._dense:
            # Longer spans only on evidence that regions compare equal.
            quiet = share is not None and share <= SPARSE_BELOW
            grown = min(self._span_regions * 2, MAX_SPAN_REGIONS)
            self._span_regions = grown if quiet else FIRST_SPAN_REGIONS
        regions: list[Region] = []
        while len(regions) < count and self._next < self.size:
            end = min(self.size, self._next + self.region_bytes)
            regions.append(Region(self._next, end - self._next))
            self._next = end
        granularity = Granularity.CHUNK if self._dense else Granularity.REGION
        self._spans += 1
        if self._spans == 1:
            self._first_span_regions = len(regions)
        return Span(tuple(regions), granularity)


@dataclass(frozen=True, slots=True)
class SourceDigests:
    """A region of the source: the digest of all of it, and of each chunk."""

    region: Region
    whole: bytes
    chunks: bytes


def hash_region(
    source: SourceDisk, region: Region, chunk: int, buffer: bytearray, *, whole: bool = True
) -> SourceDigests:
    """Read ``region`` once and hash it chunk by chunk, and whole (runs on a thread).

    Args:
        buffer: at least :data:`~agent.source.READ_PIECE_BYTES` bytes to read into.
        whole: also hash the whole region (for a sparse span); ``SourceDigests.whole``
            is empty otherwise.

    Raises:
        SourceError: the source cannot be read.
    """
    whole_digest = xxhash.xxh3_128() if whole else None
    chunks = bytearray()
    with source.mapped(region.offset, region.length) as mapped:
        if mapped is not None:
            if whole_digest is not None:
                whole_digest.update(mapped)
            for start in range(0, region.length, chunk):
                chunks += xxhash.xxh3_128_digest(mapped[start : start + chunk])
            return SourceDigests(
                region, whole_digest.digest() if whole_digest is not None else b"", bytes(chunks)
            )
    view = memoryview(buffer)
    position = region.offset
    while position < region.end:
        length = min(READ_PIECE_BYTES, region.end - position)
        piece = view[:length]
        source.read_into(position, piece)
        if whole_digest is not None:
            whole_digest.update(piece)
        for start in range(0, length, chunk):
            chunks += xxhash.xxh3_128_digest(piece[start : start + chunk])
        position += length
    return SourceDigests(
        region, whole_digest.digest() if whole_digest is not None else b"", bytes(chunks)
    )


def differing_chunks(source: bytes, target: bytes) -> list[int]:
    """Indexes of the chunks whose digests differ.

    Raises:
        ValueError: the two do not hold the same number of digests.
    """
    if len(source) != len(target):
        raise ValueError(
            f"expected {len(source) // DIGEST_BYTES} target digests, found "
            f"{len(target) // DIGEST_BYTES}"
        )
    if source == target:
        return []
    return [
        index
        for index, at in enumerate(range(0, len(source), DIGEST_BYTES))
        if source[at : at + DIGEST_BYTES] != target[at : at + DIGEST_BYTES]
    ]


def runs(indexes: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs of sorted indexes, as ``(first, count)``."""
    first = previous = -2
    for index in indexes:
        if index != previous + 1:
            if previous >= 0:
                yield first, previous - first + 1
            first = index
        previous = index
    if previous >= 0:
        yield first, previous - first + 1
