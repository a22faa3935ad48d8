"""Every configured process server, the one in use, and the policy for failures.

:class:`ProcessServerPool` holds a client (agent/client.py) per process
server and decides what a failed exchange costs: back off (doubling, with
jitter), honour Retry-After, move to the next process server after
:data:`FAILOVER_AFTER_FAILURES` failures in a row. A command gives up when no
exchange has succeeded on any of them for ``give_up_after_s``; a service
(the capture) never does: it goes on at the slowest back-off and says so in
one warning a minute at most. No failure is answered at once: each waits at
least half of :data:`BACKOFF_FIRST_S` (a ``Retry-After: 0`` the whole of
it), so no outage, however long, makes a loop spin.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from agent.client import ProcessServerClient
from agent.config import DEFAULT_IN_FLIGHT_PER_DISK
from agent.errors import ProcessServerUnavailableError
from runtime.throttle import LogThrottle, held_back_note

#: The client's logger: operators filter on it, and docs/operations.md quotes
#: the outage warning under this name.
log = logging.getLogger("blockrepl.agent.client")

#: Failures in a row after which the agent moves to the next process server:
#: one failure may be a blip (a restart takes a second), three in a row over
#: about two seconds of back-off mean it is down or unreachable.
FAILOVER_AFTER_FAILURES: Final = 3
#: Back-off after a failure: quick after a blip, doubling to a pace that
#: does not hammer a server that is restarting.
BACKOFF_FIRST_S: Final = 0.25
BACKOFF_MAX_S: Final = 10.0
#: The longest Retry-After honoured as given: a server asking for more is
#: asked again after this long (its cache may drain sooner). A shorter one
#: than BACKOFF_FIRST_S (0, say) waits BACKOFF_FIRST_S.
RETRY_AFTER_MAX_S: Final = 30.0
#: A service riding out an outage past give_up_after_s says so this often at
#: most: enough to see it in the log, not enough to fill it.
OUTAGE_REPORT_EVERY_S: Final = 60.0

T = TypeVar("T")


class ProcessServerPool:
    """Every configured process server, the one in use, and the failure policy.

    ``epoch`` grows by one at every move to another process server: a sender
    that sees it change sends again from what the master target holds.

    Args:
        in_flight_per_disk: requests of one disk's stream in flight at once
            (agent/sender.py).
        gives_up: whether :meth:`failed` raises once ``give_up_after_s`` passed
            without progress (a command), or goes on trying (a service).
    """

    def __init__(
        self,
        urls: tuple[str, ...],
        tls: ssl.SSLContext,
        *,
        request_timeout_s: float,
        connect_timeout_s: float,
        give_up_after_s: float,
        gives_up: bool = True,
        in_flight_per_disk: int = DEFAULT_IN_FLIGHT_PER_DISK,
    ) -> None:
        self.clients = [
            ProcessServerClient(
                url, tls, request_timeout_s=request_timeout_s, connect_timeout_s=connect_timeout_s
            )
            for url in urls
        ]
        #: requests of one disk's stream a sender keeps in flight at once
        self.in_flight_per_disk = in_flight_per_disk
        self._index = 0
        self.epoch = 0
        self.failovers = 0
        #: failures in a row on the current process server (when to move on)
        self._failures = 0
        #: failures in a row on any (how long to wait: a move does not start it again)
        self._failures_since_progress = 0
        self._give_up_after_s = give_up_after_s
        self._gives_up = gives_up
        #: when the failures in a row began (None: the last exchange went through)
        self._failing_since: float | None = None
        self._last_errors: dict[str, str] = {}
        self._outage_reports = LogThrottle(1, OUTAGE_REPORT_EVERY_S)

    @property
    def current(self) -> ProcessServerClient:
        return self.clients[self._index]

    @property
    def failing_s(self) -> float:
        """Seconds since the first of the failures in a row; 0 when the last
        exchange went through (however long ago: a quiet disk sends nothing)."""
        return 0.0 if self._failing_since is None else time.monotonic() - self._failing_since

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    def succeeded(self) -> None:
        """An exchange with the current process server went through."""
        if self.failing_s > self._give_up_after_s:
            log.warning(
                "%s answered again after %.0f s without progress on any process server",
                self.current.url,
                self.failing_s,
            )
        self._failures = 0
        self._failures_since_progress = 0
        self._failing_since = None

    async def failed(self, exc: ProcessServerUnavailableError) -> None:
        """An exchange failed: wait as the policy says, maybe move on; give up when due.

        Raises:
            ProcessServerUnavailableError: no progress on any process server
                for ``give_up_after_s`` (only with ``gives_up``); the message
                names each one's last error.
        """
        self._last_errors[self.current.url] = exc.message
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        failing = self.failing_s
        if failing > self._give_up_after_s:
            if self._gives_up:
                raise ProcessServerUnavailableError(
                    f"no process server made progress for {failing:.0f} s (the limit is "
                    f"give_up_after_s = {self._give_up_after_s:g}): {self._errors()}"
                )
            held = self._outage_reports.take(time.monotonic())
            if held is not None:
                log.warning(
                    "no process server made progress for %.0f s (give_up_after_s = %g); "
                    "still trying every %g s at most: %s%s",
                    failing,
                    self._give_up_after_s,
                    BACKOFF_MAX_S,
                    self._errors(),
                    held_back_note(held),
                )
        if exc.retry_after_s is not None:  # alive but busy: it said when to come back
            await asyncio.sleep(max(BACKOFF_FIRST_S, min(exc.retry_after_s, RETRY_AFTER_MAX_S)))
            return
        self._failures += 1
        self._failures_since_progress += 1
        log.debug("%s (failure %d in a row)", exc.message, self._failures)
        if self._failures >= FAILOVER_AFTER_FAILURES and len(self.clients) > 1:
            self._move_on()  # the next one is tried at once: it may well be up
            return
        exponent = min(self._failures_since_progress - 1, 16)
        delay = min(BACKOFF_FIRST_S * 2**exponent, BACKOFF_MAX_S)
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter

    def _errors(self) -> str:
        return "; ".join(
            text if text.startswith(url) else f"{url}: {text}"
            for url, text in self._last_errors.items()
        )

    def _move_on(self) -> None:
        before = self.current.url
        self._index = (self._index + 1) % len(self.clients)
        self._failures = 0
        self.epoch += 1
        self.failovers += 1
        # Once every one was tried, a move is no news: the outage report says it.
        tried_all = self._failures_since_progress > FAILOVER_AFTER_FAILURES * len(self.clients)
        log.log(
            logging.DEBUG if tried_all else logging.WARNING,
            "moving from process server %s to %s",
            before,
            self.current.url,
        )

    async def call(self, op: Callable[[ProcessServerClient], Awaitable[T]]) -> T:
        """Run ``op`` on the current process server until it succeeds, per the policy.

        Raises:
            ProcessServerUnavailableError: given up (see :meth:`failed`).
            RefusedError: whatever ``op`` raises that retrying cannot fix.
        """
        while True:
            try:
                result = await op(self.current)
            except ProcessServerUnavailableError as exc:
                await self.failed(exc)
                continue
            self.succeeded()
            return result
