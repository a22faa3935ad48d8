"""Reading HTTP request bodies as they arrive, without joining pieces.

aiohttp's ``read(n)`` and ``readany()`` join every piece buffered at the time
of the call into one new ``bytes``: a copy of each body byte that the decoders
(protocol/chunks.py) would then make again. ``readchunk()`` hands out the
pieces as the connection delivered them (one socket read each), and flow
control still bounds how many wait in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import StreamReader

from runtime.errors import BodyTimeoutError


async def body_pieces(content: StreamReader, *, timeout_s: float) -> AsyncIterator[bytes]:
    """Each piece of a body as it arrived, never empty, until the body ends.

    Raises:
        BodyTimeoutError: no piece came for ``timeout_s`` seconds.
    """
    received = 0
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                piece, end_of_http_chunk = await content.readchunk()
        except TimeoutError:
            raise BodyTimeoutError(
                f"expected the next piece of the request body within {timeout_s:g} s, "
                f"found none after {received} bytes"
            ) from None
        received += len(piece)
        if piece:
            yield piece
        elif not end_of_http_chunk:  # b"" without a chunk boundary: the end
            return
