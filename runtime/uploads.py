"""A request body handed to the HTTP client in pieces small enough not to hold the event loop.

asyncio's TLS layer encrypts each write on the event loop in one go: a body
written whole (an HRL file of tens of MiB, a journal part of 16 MiB) holds
the loop for over 100 ms, and every connection the process waits on waits
with it. Handed over in :data:`PIECE_BYTES` pieces, each write is a few
milliseconds; the pieces are views, never copies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Final

from protocol.records import Buffer

#: Bytes handed to the HTTP client at a time: a few milliseconds of AES-GCM,
#: and few enough writes that their own cost does not count.
PIECE_BYTES: Final = 2**20


async def in_pieces(buffers: Iterable[Buffer]) -> AsyncIterator[memoryview]:
    """``buffers`` back to back, as views of at most :data:`PIECE_BYTES`."""
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        for at in range(0, view.nbytes, PIECE_BYTES):
            yield view[at : at + PIECE_BYTES]
