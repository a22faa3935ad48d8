"""The chunk queue: what goes in comes out, in order, whatever the piece sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.chunks import ChunkQueue


@given(
    pieces=st.lists(st.binary(max_size=64), max_size=20),
    takes=st.lists(st.integers(min_value=0, max_value=100), max_size=20),
    kinds=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_takes_return_the_stream_in_order(
    pieces: list[bytes], takes: list[int], kinds: type
) -> None:
    queue, model = ChunkQueue(), bytearray()
    for piece in pieces:
        queue.append(kinds(piece))
        model += piece
    assert len(queue) == len(model)
    for size in takes:
        assert queue.peek(size) == bytes(model[:size])
        if size > len(model):
            with pytest.raises(ValueError, match=f"cannot take {size} bytes"):
                queue.take(size)
            continue
        assert queue.take(size) == bytes(model[:size])
        del model[:size]
        assert len(queue) == len(model)


def test_a_unit_that_is_one_whole_piece_is_not_copied() -> None:
    queue = ChunkQueue()
    piece = bytes(range(200))
    queue.append(piece)
    assert queue.take(200) is piece


def test_a_reused_caller_buffer_does_not_change_what_was_queued() -> None:
    queue, buffer = ChunkQueue(), bytearray(b"abcd")
    queue.append(buffer)
    buffer[:] = b"wxyz"
    assert queue.take(4) == b"abcd"
