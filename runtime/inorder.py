"""One stream's requests, taken one at a time and in seq order when several are in flight.

A sender may have more than one request of a disk's stream in flight
(docs/api.md, "Several requests in flight"): the agent its batches, the
process server its runs of files. Each goes on a connection of its own, and
the receiver's handlers may start in another order than the sender sent
them — the second request's bytes can be read first. The receiver places
runs strictly after its position (protocol/sequencing.py), so the request
that came ahead of its turn would be refused with a gap that is not one.

:class:`InOrder` is the receiver's side of that. Every request of the stream
is counted from its first byte (:meth:`InOrder.opened`) and places its runs
under one lock (:attr:`InOrder.lock`). A run that finds a gap while another
request of the stream is open gives the lock up until the stream moves
(:meth:`InOrder.wait_for_earlier`) and is placed again: the request ahead of
it takes the lock and places the missing seqs. A wait ends when the stream
moves, when another request ends, or after :data:`REORDER_WAIT_S` with no
move; what is still a gap then is answered as one.

:func:`answer_or` is the senders' side: wait for the oldest answer in
flight, or for something else (more to send) that lets another request go.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from typing import Any, Final, TypeVar

#: How long a run that found a gap waits for the stream to move while another
#: request of it is open. The request ahead of it places a batch (or a file) at
#: a time as its body arrives, and a batch is at most 16 MiB: ten seconds
#: carries one across a link of 15 Mbit/s. Past it, the missing seqs are not
#: coming and the gap is answered as one (the sender sends again from it).
REORDER_WAIT_S: Final = 10.0

T = TypeVar("T")


class InOrder:
    """The requests of one stream: how many are open, the lock that places their runs."""

    def __init__(self) -> None:
        #: held while a request places its runs (and, for a process server,
        #: reads the body they come in)
        self.lock = asyncio.Lock()
        self._open = 0
        self._moved = asyncio.Event()

    @property
    def open(self) -> int:
        """Requests of the stream whose handler is running."""
        return self._open

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """Count a request of the stream for as long as its handler runs; its end wakes
        a request waiting for it."""
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1
            self.moved()

    def moved(self) -> None:
        """The stream's position moved (or a request ended): waiters look again."""
        self._moved.set()
        self._moved = asyncio.Event()

    async def wait_for_earlier(self, timeout_s: float = REORDER_WAIT_S) -> bool:
        """A run found a gap; the caller holds :attr:`lock`. If another request of the
        stream is open, give the lock up until the stream moves, a request ends or
        ``timeout_s`` passes, and take it again.

        Returns:
            True when the caller should place the run again (the stream moved or a
            request ended meanwhile); False when there is nothing to wait for or
            nothing moved: the gap is one.
        """
        if self._open < 2:
            return False
        moved = self._moved
        self.lock.release()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), timeout_s)
        finally:
            await _take_back(self.lock)
        return moved.is_set()


async def _take_back(lock: asyncio.Lock) -> None:
    """Acquire ``lock`` even if cancelled meanwhile (then re-raise): the caller's
    ``async with`` releases it on the way out, as asyncio.Condition.wait does."""
    cancelled = False
    while True:
        try:
            await lock.acquire()
            break
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def answer_or(answer: asyncio.Future[T], other: Awaitable[object]) -> None:
    """Until ``answer`` is done or ``other`` completes, whichever is first; ``other``
    is cancelled if it has not completed (``answer`` never is)."""
    waiting = asyncio.ensure_future(other)
    try:
        either: set[asyncio.Future[Any]] = {answer, waiting}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
