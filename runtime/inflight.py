"""The requests a data API is handling, and how a graceful stop lets them finish.

aiohttp's own graceful shutdown (``AppRunner.cleanup``) marks every
connection closing before it waits for the handlers, and a closing
connection drops the bytes it receives: a request whose body is still
arriving (a 32 MiB batch from an agent over a slow link) can then never
finish, waits out the whole timeout and is cancelled. :meth:`InFlight.drain`
stops in the right order instead:

1. the listeners close: a new connection is refused, and a client tries again
   later or elsewhere;
2. every answer from now on carries ``Connection: close``, so a client does
   not start a new request on a connection it already has;
3. the requests in flight go on receiving their bodies and finish, for up to
   the grace period; their acknowledgements mean what they always do;
4. only then does ``AppRunner.cleanup`` close the connections left, which
   are idle, and cancel any handler still running past the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Gauge

log = logging.getLogger("blockrepl.service")

#: Seconds ``AppRunner.cleanup`` waits for a handler still running after the
#: drain's grace period, before and after cancelling it: such a handler is
#: stuck (a client that stopped sending), so waiting longer only delays the stop.
CANCEL_TIMEOUT_S: Final = 2.0


class InFlight:
    """Counts a data API's requests and drains them on stop.

    Args:
        gauge: the daemon's ``requests_in_flight`` gauge, kept equal to the count.
    """

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def count(self) -> int:
        """Requests whose handler is running."""
        return self._count

    def install(self, app: web.Application) -> None:
        """Count ``app``'s requests, and close connections after each answer while draining."""
        app.middlewares.insert(0, self._middleware)
        app.on_response_prepare.append(self._on_response_prepare)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._count += 1
        self._gauge.inc()
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self._count -= 1
            self._gauge.dec()
            if self._count == 0:
                self._idle.set()

    async def _on_response_prepare(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        if self.draining:
            response.force_close()

    async def drain(self, runner: web.AppRunner, grace_s: float) -> None:
        """Stop listening, let the requests in flight finish (``grace_s`` at most), clean up.

        Args:
            runner: the data API's runner; built with ``shutdown_timeout``
                :data:`CANCEL_TIMEOUT_S`, as the grace period is spent here.
            grace_s: how long requests in flight may take to finish.
        """
        self.draining = True
        for site in list(runner.sites):
            await site.stop()
        if self._count:
            log.info("waiting up to %.0f s for the requests in flight (%d)", grace_s, self._count)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
            if self._count:
                log.warning(
                    "requests still in flight after %.0f s (%d) are cancelled (not acknowledged: "
                    "their senders send them again)",
                    grace_s,
                    self._count,
                )
        await runner.cleanup()
