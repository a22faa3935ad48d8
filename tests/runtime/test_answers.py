"""A peer's answer is read to its end however it arrives, and no further than the bound."""

from __future__ import annotations

import pytest

from protocol.errors import LimitExceededError
from runtime.answers import read_answer


class Trickle:
    """A body that hands out at most ``piece`` bytes per read, as a slow link does."""

    def __init__(self, body: bytes, piece: int) -> None:
        self.body = body
        self.piece = piece
        self.read_bytes = 0

    async def read(self, n: int = -1) -> bytes:
        size = min(self.piece, len(self.body) - self.read_bytes, n if n >= 0 else self.piece)
        out = self.body[self.read_bytes : self.read_bytes + size]
        self.read_bytes += size
        return out


@pytest.mark.parametrize("piece", [1, 7, 100, 10_000])
async def test_an_answer_in_pieces_is_read_whole(piece: int) -> None:
    body = b'{"disk": "vm01-d0", "generation": 3, "acked_seq": 1200}'
    assert await read_answer(Trickle(body, piece), max_bytes=1000, what="x") == body


async def test_an_empty_answer_is_empty() -> None:
    assert await read_answer(Trickle(b"", 10), max_bytes=1000, what="x") == b""


async def test_an_answer_of_the_bound_is_taken() -> None:
    assert len(await read_answer(Trickle(b"a" * 1000, 64), max_bytes=1000, what="x")) == 1000


@pytest.mark.parametrize("piece", [1, 64, 1 << 20])
async def test_a_longer_answer_is_refused_after_one_byte_past_the_bound(piece: int) -> None:
    body = Trickle(b"a" * (10 << 20), piece)
    with pytest.raises(LimitExceededError, match="at most 1000 bytes"):
        await read_answer(body, max_bytes=1000, what="the state answer")
    assert body.read_bytes == 1001
