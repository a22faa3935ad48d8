"""Waiting, in a test, for what the code under test does in its own time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

#: How often the condition is looked at: often enough that a test waits
#: little past the moment, seldom enough to leave the loop to the code.
STEP_S: Final = 0.01


async def until(what: str, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Until ``done()`` holds; fails naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not done():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(STEP_S)
