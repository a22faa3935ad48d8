"""runtime/inorder.py: requests of one stream placed in seq order however they arrive."""

from __future__ import annotations

import asyncio

import pytest

from runtime.inorder import InOrder


class Stream:
    """A receiver's position and what it placed, with the request handler's steps."""

    def __init__(self) -> None:
        self.turns = InOrder()
        self.position = 0
        self.placed: list[int] = []

    def place(self, first: int, last: int) -> bool:
        if first != self.position + 1:
            return False
        self.position = last
        self.placed.append(first)
        self.turns.moved()
        return True

    async def request(
        self, first: int, last: int, *, body: asyncio.Event | None = None, timeout_s: float = 5.0
    ) -> str:
        """A handler: counted from its start, holds the lock while its body arrives."""
        with self.turns.opened():
            async with self.turns.lock:
                if body is not None:
                    await body.wait()
                while not self.place(first, last):
                    if not await self.turns.wait_for_earlier(timeout_s):
                        return "gap"
        return "ok"

    async def open_until(self, end: asyncio.Event) -> None:
        """A request of the stream that stays open, placing nothing, until ``end``."""
        with self.turns.opened():
            await end.wait()


async def test_a_request_ahead_of_its_turn_waits_for_the_one_before() -> None:
    stream = Stream()
    later_body = asyncio.Event()
    later = asyncio.create_task(stream.request(11, 20, body=later_body))
    await asyncio.sleep(0)  # the later one holds the lock, its body not yet in
    earlier = asyncio.create_task(stream.request(1, 10))
    await asyncio.sleep(0)
    later_body.set()
    assert await asyncio.gather(later, earlier) == ["ok", "ok"]
    assert stream.placed == [1, 11]
    assert stream.turns.open == 0
    assert not stream.turns.lock.locked()


async def test_a_gap_with_no_other_request_open_is_a_gap_at_once() -> None:
    stream = Stream()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await stream.request(11, 20, timeout_s=30.0) == "gap"
    assert loop.time() - started < 1.0
    assert stream.placed == []


async def test_a_wait_ends_when_the_request_it_waited_for_ends_without_the_seqs() -> None:
    """The request ahead was cut short (a dead link): the one that waited answers a gap."""
    stream = Stream()
    cut = asyncio.Event()
    later_body = asyncio.Event()

    async def cut_short() -> str:
        with stream.turns.opened():
            await cut.wait()
        return "cut"

    other = asyncio.create_task(cut_short())
    later = asyncio.create_task(stream.request(11, 20, body=later_body, timeout_s=30.0))
    await asyncio.sleep(0)
    later_body.set()
    await asyncio.sleep(0.05)
    assert not later.done(), "it waits while the other request is open"
    cut.set()
    assert await asyncio.wait_for(asyncio.gather(other, later), 5.0) == ["cut", "gap"]


async def test_nothing_moving_ends_the_wait_after_its_bound() -> None:
    stream = Stream()
    stalled = asyncio.Event()
    other = asyncio.create_task(stream.open_until(stalled))
    await asyncio.sleep(0)
    assert await stream.request(11, 20, timeout_s=0.1) == "gap"
    stalled.set()
    await other


async def test_a_request_cancelled_while_it_waits_leaves_the_lock_free() -> None:
    stream = Stream()
    stalled = asyncio.Event()
    other = asyncio.create_task(stream.open_until(stalled))
    later = asyncio.create_task(stream.request(11, 20, timeout_s=30.0))
    await asyncio.sleep(0.05)
    later.cancel()
    with pytest.raises(asyncio.CancelledError):
        await later
    assert not stream.turns.lock.locked()
    assert await stream.request(1, 10) == "ok"
    stalled.set()
    await other
