"""Reading HTTP request bodies as they arrive, without joining pieces.

aiohttp's ``read(n)`` and ``readany()`` join every piece buffered at the time
of the call into one new ``bytes``: a copy of each body byte that the decoders
(protocol/chunks.py) would then make again. ``readchunk()`` hands out the
pieces as the connection delivered them (one socket read each), and flow
control still bounds how many wait in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import StreamReader


async def body_pieces(content: StreamReader) -> AsyncIterator[bytes]:
    """Each piece of a body as it arrived, never empty, until the body ends."""
    while True:
        piece, end_of_http_chunk = await content.readchunk()
        if piece:
            yield piece
        elif not end_of_http_chunk:  # b"" without a chunk boundary: the end
            return
