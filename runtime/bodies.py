"""Reading HTTP request bodies as they arrive, without joining pieces.

aiohttp's ``read(n)`` and ``readany()`` join every piece buffered at the time
of the call into one new ``bytes``: a copy of each body byte that the decoders
(protocol/chunks.py) would then make again. ``readchunk()`` hands out the
pieces as the connection delivered them (one socket read each), and flow
control still bounds how many wait in memory.

Every way a body can end is an end here, and every loop over a body makes
progress or waits for the peer (docs/reliability.md, "Empty and tiny bodies"):

- a request with no body at all (``Content-Length: 0``, no length, an
  HTTP/1.0 request without one) gets aiohttp's one shared empty reader,
  whose ``readchunk()`` says "end" once per *process* and "empty chunk
  boundary" forever after; the end is told by ``at_eof()``, not by that flag;
- broken framing inside the body (a bad chunk size, fewer bytes than
  ``Content-Length`` before the peer closed) surfaces from aiohttp as its own
  exceptions: they become :class:`~protocol.errors.MalformedError` and
  :class:`~protocol.errors.TruncatedError`, answered 400 like any bad body
  instead of escaping the handler as a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final, Protocol

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from protocol.errors import LimitExceededError, MalformedError, TruncatedError
from runtime.errors import BodyTimeoutError

#: Empty chunk boundaries in a row that a body may show before it is refused.
#: aiohttp's parser reports one boundary per HTTP chunk and a chunk is never
#: empty (a zero size ends the body), so a real body shows at most one or
#: two in a row; this bounds the loop whatever a future reader does.
MAX_EMPTY_PIECES: Final = 16


async def body_pieces(content: StreamReader, *, timeout_s: float) -> AsyncIterator[bytes]:
    """Each piece of a body as it arrived, never empty, until the body ends.

    Raises:
        BodyTimeoutError: no piece came for ``timeout_s`` seconds.
        MalformedError: the body's HTTP framing is broken (chunked encoding).
        TruncatedError: the peer closed the connection inside the body.
    """
    received = 0
    empty_in_a_row = 0
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                piece, end_of_http_chunk = await content.readchunk()
        except TimeoutError:
            raise BodyTimeoutError(
                f"expected the next piece of the request body within {timeout_s:g} s, "
                f"found none after {received} bytes"
            ) from None
        except HttpProcessingError as exc:
            raise MalformedError(
                f"expected a well-framed request body, found broken framing after "
                f"{received} bytes: {exc.message}"
            ) from None
        except ConnectionError:
            raise TruncatedError(
                f"the connection was lost after {received} bytes of the request body"
            ) from None
        if piece:
            empty_in_a_row = 0
            received += len(piece)
            yield piece
            continue
        if not end_of_http_chunk or content.at_eof():  # the end (see the module's doc)
            return
        empty_in_a_row += 1
        if empty_in_a_row > MAX_EMPTY_PIECES:
            raise MalformedError(
                f"expected data or the end of the request body, found {empty_in_a_row} "
                f"empty pieces in a row after {received} bytes"
            )


class Decoder(Protocol):
    """What takes a body in pieces: protocol/'s incremental decoders."""

    def feed(self, data: bytes) -> None: ...

    def feed_eof(self) -> None: ...


async def feed_body(
    content: StreamReader, sink: Decoder, *, timeout_s: float
) -> AsyncIterator[None]:
    """Feed ``sink`` each piece of a body as it arrives, then the body's end.

    Yields after each feed, so the caller takes what the piece completed
    (its decoder's events) before the next one is read; the last yield
    follows ``feed_eof()``.

    Raises:
        BodyTimeoutError, MalformedError, TruncatedError: as for :func:`body_pieces`.
    """
    async for piece in body_pieces(content, timeout_s=timeout_s):
        sink.feed(piece)
        yield
    sink.feed_eof()
    yield


async def small_body(request: web.Request, *, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body of a request that carries a small document (a JSON object).

    The length must be declared: a body of unknown length (chunked) or over
    ``max_bytes`` is refused before a byte of it is read.

    Raises:
        MalformedError: no Content-Length, or broken framing.
        LimitExceededError: a Content-Length over ``max_bytes``.
        TruncatedError, BodyTimeoutError: as for :func:`body_pieces`.
    """
    length = request.content_length
    if length is None:
        raise MalformedError(
            f"expected a body of at most {max_bytes} bytes with a Content-Length, found none"
        )
    if length > max_bytes:
        raise LimitExceededError(
            f"expected a body of at most {max_bytes} bytes, found Content-Length {length}"
        )
    body = bytearray()
    async for piece in body_pieces(request.content, timeout_s=timeout_s):
        body += piece
    return bytes(body)
