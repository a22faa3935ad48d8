"""Reading a peer's answer whole, within a bound.

Every answer a daemon or the agent reads from a peer (a process server's
state, a master target's acknowledgement, an admin answer) is small and
bounded by the API (protocol/api.py); a peer that sends more is broken and
is not buffered without end. One ``read(n)`` returns what has arrived,
which may be only the first piece of the answer (TLS records, HTTP chunks, a
slow link): the pieces are read until the end or the bound.

This module does not import aiohttp: the agent imports aiohttp its own way
(agent/fastimport.py), and any reader with aiohttp's ``read(n)`` will do.
"""

from __future__ import annotations

from typing import Protocol

from protocol.errors import LimitExceededError


class AnswerBody(Protocol):
    """What ``aiohttp.ClientResponse.content`` offers here."""

    async def read(self, n: int = -1) -> bytes: ...


async def read_answer(content: AnswerBody, *, max_bytes: int, what: str) -> bytes:
    """The whole body, read in the pieces it arrives in.

    Args:
        max_bytes: the longest body taken.
        what: the answer's name for the message.

    Raises:
        LimitExceededError: the body is longer than ``max_bytes``; it is read
            no further than one byte past the bound.
    """
    body = bytearray()
    while piece := await content.read(max_bytes + 1 - len(body)):
        body += piece
        if len(body) > max_bytes:
            raise LimitExceededError(
                f"expected {what} of at most {max_bytes} bytes, found a longer one"
            )
    return bytes(body)
