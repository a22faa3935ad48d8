"""Where a run of records fits in a disk's stream: the ordering rule of
docs/design.md invariant 2, as one pure function both daemons use.

A disk's stream is totally ordered by ``(generation, seq)``. A receiver knows
its position: the generation it is in and the last seq it holds durably.
A run of records ``first_seq .. last_seq`` of some generation is then exactly
one of:

- **next**: it starts right after the position (or starts a newer generation
  at seq 1) — store it;
- **duplicate**: it ends at or before the position — acknowledge, drop;
- **gap**: it starts after the next expected seq — refuse, naming the seq
  expected; nothing is ever skipped over;
- **overlap**: it starts inside what is held and ends past it — refuse, naming
  the seq expected (the sender re-cuts its runs from there);
- **stale**: its generation is older than the receiver's — refuse, naming the
  current generation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class StreamPosition:
    """The last record a receiver holds durably: ``seq`` 0 means none yet in ``generation``."""

    generation: int
    seq: int

    @property
    def next_seq(self) -> int:
        return self.seq + 1


class Fit(enum.Enum):
    NEXT = "next"
    DUPLICATE = "duplicate"
    GAP = "gap"
    OVERLAP = "overlap"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict on one run: how it fits, and the seq and generation to name in an answer."""

    fit: Fit
    expected_seq: int
    generation: int


def admit(position: StreamPosition, generation: int, first_seq: int, last_seq: int) -> Admission:
    """How the run ``first_seq .. last_seq`` of ``generation`` fits after ``position``.

    A newer generation always starts at seq 1: anything else in it is a gap.
    """
    if generation < position.generation:
        return Admission(Fit.STALE, position.next_seq, position.generation)
    if generation > position.generation:
        fit = Fit.NEXT if first_seq == 1 else Fit.GAP
        return Admission(fit, 1, generation)
    if last_seq <= position.seq:
        return Admission(Fit.DUPLICATE, position.next_seq, generation)
    if first_seq == position.next_seq:
        return Admission(Fit.NEXT, position.next_seq, generation)
    if first_seq > position.next_seq:
        return Admission(Fit.GAP, position.next_seq, generation)
    return Admission(Fit.OVERLAP, position.next_seq, generation)
