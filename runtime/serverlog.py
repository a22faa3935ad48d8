"""What aiohttp's server says about requests that never reach a handler.

A request whose line, headers or body framing do not parse (a bad or doubled
Content-Length, a header over the size limit, chunked garbage, a broken
request line) is answered 400 by aiohttp itself, which by default logs it at
ERROR with a full traceback: any client that reaches a port could fill the
log. Each daemon hands aiohttp a :class:`ServerLog` per listener instead:

- a malformed request is counted in ``<prefix>_malformed_requests_total``
  (by listener and reason) and logged as one WARNING line naming the peer,
  the listener and the reason — at most :data:`MALFORMED_BURST` lines at
  once and one every :data:`MALFORMED_EVERY_S` after, however fast they come;
- an exception that escaped a handler is a bug: it keeps its ERROR line and
  traceback, within a bound of its own (:data:`ERROR_BURST`, :data:`ERROR_EVERY_S`);
- aiohttp's debug lines pass through as they are.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final

from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import Counter
from prometheus_client.registry import CollectorRegistry

from runtime.throttle import LogThrottle, held_back_note

#: Malformed-request lines a daemon writes back to back, then one every
#: MALFORMED_EVERY_S: a few lines show an operator what arrives and from
#: where; the metric counts every one.
MALFORMED_BURST: Final = 5
MALFORMED_EVERY_S: Final = 1.0
#: Handler failures (bugs) keep their tracebacks, bounded the same way but
#: slower: one traceback says what a thousand would.
ERROR_BURST: Final = 5
ERROR_EVERY_S: Final = 10.0
#: Characters of aiohttp's reason kept in a log line: its message may quote
#: the offending bytes, which a peer chooses.
MAX_REASON_CHARS: Final = 200

log = logging.getLogger("blockrepl.http")


def reason_label(exc: HttpProcessingError) -> str:
    """The metric label of a parse failure: aiohttp's exception class, kebab-cased.

    A bounded set (aiohttp's ``http_exceptions``), never the peer's bytes.
    """
    name = type(exc).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower() or "http"


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """The logger aiohttp's server uses for one listener (``AppRunner(logger=...)``).

    Args:
        listener: the listener's name in lines and labels (``data``, ``admin``, ``metrics``).
        count: counts one malformed request by listener and reason.
        malformed, errors: the daemon's throttles, shared by its listeners.
    """

    def __init__(
        self,
        listener: str,
        count: Callable[[str, str], None],
        malformed: LogThrottle,
        errors: LogThrottle,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(log, {"listener": listener})
        self.listener = listener
        self._count = count
        self._malformed = malformed
        self._errors = errors
        self._clock = clock

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        """Lines pass with the listener's name as an ``extra`` field (JSON logs)."""
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return msg, kwargs

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        """Sort one line of aiohttp's: malformed request, handler failure, or other."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self._malformed_request(exc, args[0] if args else "an unknown peer")
            return
        if level >= logging.ERROR:
            held = self._errors.take(self._clock())
            if held is None:
                return
            msg = f"{msg}{held_back_note(held)}"
        super().log(level, msg, *args, **kwargs)

    def _malformed_request(self, exc: HttpProcessingError, peer: object) -> None:
        reason = reason_label(exc)
        self._count(self.listener, reason)
        held = self._malformed.take(self._clock())
        if held is None:
            return
        detail = str(exc.message or exc)[:MAX_REASON_CHARS]
        super().log(
            logging.WARNING,
            "malformed request from %s on the %s listener, answered %d: %s: %r%s",
            peer,
            self.listener,
            exc.code or 400,
            reason,
            detail,
            held_back_note(held),
        )


class RequestLogs:
    """A daemon's malformed-request counter and log throttles, and a logger per listener.

    Args:
        registry: the daemon's own registry.
        prefix: the daemon's metric prefix (``blockrepl_processserver``).
    """

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.malformed = Counter(
            f"{prefix}_malformed_requests",
            "Requests aiohttp refused (400) before any handler ran: a request line, header or "
            "body framing that does not parse; by listener and reason.",
            ["listener", "reason"],
            registry=registry,
        )
        self._malformed_throttle = LogThrottle(MALFORMED_BURST, MALFORMED_EVERY_S)
        self._error_throttle = LogThrottle(ERROR_BURST, ERROR_EVERY_S)

    def for_listener(self, listener: str) -> ServerLog:
        """The logger to give the listener's ``web.AppRunner(logger=...)``."""
        return ServerLog(listener, self._count, self._malformed_throttle, self._error_throttle)

    def _count(self, listener: str, reason: str) -> None:
        self.malformed.labels(listener, reason).inc()
