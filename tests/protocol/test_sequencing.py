"""The ordering rule, checked exhaustively on small numbers and against a model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.sequencing import Fit, StreamPosition, admit

P = StreamPosition(generation=3, seq=10)


@pytest.mark.parametrize(
    ("gen", "first", "last", "fit", "expected", "answer_gen"),
    [
        (3, 11, 11, Fit.NEXT, 11, 3),
        (3, 11, 40, Fit.NEXT, 11, 3),
        (3, 5, 10, Fit.DUPLICATE, 11, 3),
        (3, 10, 10, Fit.DUPLICATE, 11, 3),
        (3, 12, 20, Fit.GAP, 11, 3),
        (3, 8, 12, Fit.OVERLAP, 11, 3),
        (2, 11, 11, Fit.STALE, 11, 3),
        (4, 1, 5, Fit.NEXT, 1, 4),
        (4, 2, 5, Fit.GAP, 1, 4),
    ],
)
def test_table(gen: int, first: int, last: int, fit: Fit, expected: int, answer_gen: int) -> None:
    verdict = admit(P, gen, first, last)
    assert (verdict.fit, verdict.expected_seq, verdict.generation) == (fit, expected, answer_gen)


def test_empty_position_takes_seq_one() -> None:
    assert admit(StreamPosition(1, 0), 1, 1, 1).fit is Fit.NEXT
    assert admit(StreamPosition(1, 0), 1, 2, 2).fit is Fit.GAP


@given(
    runs=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 30), st.integers(0, 5)), max_size=60)
)
def test_a_receiver_following_the_verdicts_holds_one_gapless_stream(
    runs: list[tuple[int, int, int]],
) -> None:
    """Whatever arrives, storing only NEXT runs keeps exactly the records
    1..seq of the current generation, each once, in order."""
    position = StreamPosition(1, 0)
    held: dict[int, list[int]] = {}
    for gen, first, extra in runs:
        last = first + extra
        verdict = admit(position, gen, first, last)
        if verdict.fit is Fit.NEXT:
            held.setdefault(gen, []).extend(range(first, last + 1))
            position = StreamPosition(gen, last)
        else:
            assert verdict.fit is not Fit.STALE or gen < position.generation
    assert held.get(position.generation, []) == list(range(1, position.seq + 1))
    assert list(held) == sorted(held)
