"""Talking to process servers: the data API of docs/api.md over mutual TLS 1.3.

:class:`ProcessServerClient` makes one exchange with one process server and
turns its answer into a typed result or an error of agent/errors.py:

- a refused connection, a timeout, a reset, a 5xx: ``ProcessServerUnavailableError``
  (a 503 carries its ``Retry-After``) — worth retrying;
- 403, 404, 400, 413: ``RefusedError`` — retrying cannot help;
- 409 answers of POST batches are results, not errors: the stream decides.

:class:`ProcessServerPool` holds every configured process server and the
policy for failures: back off (doubling, with jitter), honour Retry-After,
move to the next process server after :data:`FAILOVER_AFTER_FAILURES`
failures in a row. A command gives up when no exchange has succeeded on any
of them for ``give_up_after_s``; a service (the capture) never does: it goes
on at the slowest back-off and says so in one warning a minute at most. No
failure is answered at once: each waits at least half of :data:`BACKOFF_FIRST_S`
(a ``Retry-After: 0`` the whole of it), so no outage, however long, makes a
loop spin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from agent.errors import ProcessServerUnavailableError, RefusedError
from agent.fastimport import aiohttp
from protocol.sequencing import StreamPosition
from runtime.throttle import LogThrottle, held_back_note

log = logging.getLogger("blockrepl.agent.client")

T = TypeVar("T")

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
#: Bytes of a digest answer read at a time.
READ_CHUNK: Final = 64 * 1024
#: Bytes of an error answer kept for the message.
MAX_ERROR_BODY: Final = 64 * 1024
DIGEST_BYTES: Final = 16


@dataclass(frozen=True, slots=True)
class DiskState:
    """A disk's stream at a process server (``GET /v1/disks/{disk}/state``)."""

    generation: int
    acked_seq: int
    #: the last seq the master target acknowledged to this process server
    shipped_seq: int
    backlog_bytes: int
    resync_required: bool


@dataclass(frozen=True, slots=True)
class PostAnswer:
    """What a process server did with a request of batches.

    ``fit`` is ``acked`` (every batch stored or a duplicate), ``gap`` or
    ``overlap`` (send from ``expected_seq``), or ``stale-generation`` (the
    process server is on ``current_generation``). ``generation`` and
    ``acked_seq`` are the disk's acknowledged position there.
    """

    fit: Literal["acked", "gap", "overlap", "stale-generation"]
    generation: int
    acked_seq: int
    expected_seq: int | None = None
    current_generation: int | None = None


class ProcessServerClient:
    """One process server, reached at ``url`` with this machine's certificate."""

    def __init__(
        self, url: str, tls: ssl.SSLContext, *, request_timeout_s: float, connect_timeout_s: float
    ) -> None:
        self.url = url.rstrip("/")
        self._tls = tls
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=request_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def _disk_url(self, disk_id: str, what: str) -> str:
        return f"{self.url}/v1/disks/{disk_id}/{what}"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls), timeout=self._timeout
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post_batches(
        self, disk_id: str, body: bytes | AsyncIterable[bytes | memoryview]
    ) -> PostAnswer:
        """POST one or more batches; the answer says how far the disk is acknowledged.

        Raises:
            ProcessServerUnavailableError: no answer, or 503 (with Retry-After).
            RefusedError: 400, 403, 404, 413.
        """
        url = self._disk_url(disk_id, "batches")
        headers = {"Content-Type": "application/octet-stream"}
        status, answer = await self._json_exchange("POST", url, data=body, headers=headers)
        if status == 200:
            return PostAnswer("acked", _int(answer, "generation"), _int(answer, "acked_seq"))
        error = answer.get("error")
        if status == 409 and error in ("gap", "overlap"):
            return PostAnswer(
                "gap" if error == "gap" else "overlap", _int(answer, "generation"),
                _int(answer, "acked_seq"), expected_seq=_int(answer, "expected_seq"),
            )  # fmt: skip
        if status == 409 and error == "stale-generation":
            return PostAnswer(
                "stale-generation", _int(answer, "generation"), _int(answer, "acked_seq"),
                current_generation=_int(answer, "current_generation"),
            )  # fmt: skip
        raise self._refusal(status, answer, f"POST {url}")

    async def state(
        self, disk_id: str, *, until_shipped: int | None = None, wait_s: float = 0.0
    ) -> DiskState:
        """The disk's stream at this process server.

        Args:
            until_shipped: answer once the master target holds this seq of
                the current generation, or after ``wait_s`` (a long poll).

        Raises:
            ProcessServerUnavailableError, RefusedError: as for :meth:`post_batches`.
        """
        url = self._disk_url(disk_id, "state")
        if until_shipped is not None:
            url += f"?shipped={until_shipped}&wait_s={wait_s:g}"
        status, answer = await self._json_exchange("GET", url)
        if status != 200:
            raise self._refusal(status, answer, f"GET {url}")
        return DiskState(
            generation=_int(answer, "generation"),
            acked_seq=_int(answer, "acked_seq"),
            shipped_seq=_int(answer, "shipped_seq"),
            backlog_bytes=_int(answer, "backlog_bytes"),
            resync_required=answer.get("resync_required") is True,
        )

    async def start_generation(self, disk_id: str, generation: int) -> PostAnswer:
        """Start ``generation`` of the disk's stream (seq 1 comes next).

        Returns:
            ``acked`` with the new generation, or ``stale-generation`` naming
            the process server's current one when ``generation`` is not above it.

        Raises:
            ProcessServerUnavailableError, RefusedError: as for :meth:`post_batches`.
        """
        url = self._disk_url(disk_id, "generation")
        status, answer = await self._json_exchange(
            "POST", url, json_body={"generation": generation}
        )
        if status == 200:
            return PostAnswer("acked", _int(answer, "generation"), _int(answer, "acked_seq"))
        if status == 409 and answer.get("error") == "stale-generation":
            current = _int(answer, "current_generation")
            return PostAnswer("stale-generation", current, 0, current_generation=current)
        raise self._refusal(status, answer, f"POST {url}")

    async def checksums(
        self,
        disk_id: str,
        *,
        offset: int,
        length: int,
        chunk: int,
        sink: Callable[[StreamPosition, bytes], None],
    ) -> int:
        """The target's XXH3-128 digests of ``chunk``-byte chunks, as they arrive.

        ``sink(applied, digests)`` gets whole digests in order, as the master
        target computes them; ``applied`` is the target's applied position the
        digests were taken at (docs/api.md).

        Returns:
            The bytes of digests received.

        Raises:
            ProcessServerUnavailableError: no answer, a 503, or an answer cut short.
            RefusedError: 400 (for instance a range outside the target), 403, 404.
        """
        url = self._disk_url(disk_id, "checksums")
        params = {"offset": str(offset), "length": str(length), "chunk": str(chunk)}
        expected = -(-length // chunk) * DIGEST_BYTES
        received = 0
        try:
            async with self.session.get(url, params=params) as response:
                if response.status != 200:
                    answer = await _read_json(response)
                    raise self._refusal(response.status, answer, f"GET {url}", response.headers)
                applied = StreamPosition(
                    int(response.headers.get("X-Blockrepl-Applied-Generation", "0")),
                    int(response.headers.get("X-Blockrepl-Applied-Seq", "0")),
                )
                pending = b""
                async for piece in response.content.iter_chunked(READ_CHUNK):
                    pending += piece
                    whole = len(pending) - len(pending) % DIGEST_BYTES
                    if whole:
                        received += whole
                        if received > expected:
                            break
                        sink(applied, pending[:whole])
                        pending = pending[whole:]
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise _unavailable(self.url, f"GET {url}", exc) from exc
        if received != expected:
            raise ProcessServerUnavailableError(
                f"{self.url}: the digest answer for {length} bytes from byte {offset} must be "
                f"{expected} bytes, found {received}"
            )
        return received

    async def _json_exchange(
        self,
        method: str,
        url: str,
        *,
        data: bytes | AsyncIterable[bytes | memoryview] | None = None,
        json_body: object | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, object]]:
        try:
            async with self.session.request(
                method, url, data=data, json=json_body, headers=headers
            ) as response:
                answer = await _read_json(response)
                if response.status == 503 or response.status >= 500:
                    raise _busy(
                        self.url, f"{method} {url}", response.status, answer, response.headers
                    )
                return response.status, answer
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _unavailable(self.url, f"{method} {url}", exc) from exc

    def _refusal(
        self,
        status: int,
        answer: dict[str, object],
        what: str,
        headers: Mapping[str, str] | None = None,
    ) -> Exception:
        if status >= 500:
            return _busy(self.url, what, status, answer, headers or {})
        code = str(answer.get("error", "unknown"))
        message = str(answer.get("message", "no message"))
        return RefusedError(
            f"{self.url} refused {what}: {status} {code}: {message}",
            status=status, server_code=code,
        )  # fmt: skip


class ProcessServerPool:
    """Every configured process server, the one in use, and the failure policy.

    ``epoch`` grows by one at every move to another process server: a sender
    that sees it change sends again from what the master target holds.

    Args:
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
    ) -> None:
        self.clients = [
            ProcessServerClient(
                url, tls, request_timeout_s=request_timeout_s, connect_timeout_s=connect_timeout_s
            )
            for url in urls
        ]
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
                self.current.url, self.failing_s,
            )  # fmt: skip
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
                    "still trying every %g s at most: %s%s", failing, self._give_up_after_s,
                    BACKOFF_MAX_S, self._errors(), held_back_note(held),
                )  # fmt: skip
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
            "moving from process server %s to %s", before, self.current.url,
        )  # fmt: skip

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


async def _read_json(response: aiohttp.ClientResponse) -> dict[str, object]:
    """The answer's JSON object, read to its end (:data:`MAX_ERROR_BODY` at most).

    One ``read(n)`` returns what has arrived, which may be the first piece of
    the answer only: the pieces are read until the end or the bound.
    """
    raw = b""
    while len(raw) < MAX_ERROR_BODY and (
        piece := await response.content.read(MAX_ERROR_BODY - len(raw))
    ):
        raw += piece
    try:
        answer = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json parses
        answer = {"error": "not-json", "message": raw[:200].decode("utf-8", "replace")}
    return answer if isinstance(answer, dict) else {"error": "not-json", "message": str(answer)}


def _int(answer: dict[str, object], key: str) -> int:
    value = answer.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProcessServerUnavailableError(
            f"expected an integer {key} in the answer, found {value!r}"
        )
    return value


def _busy(
    base: str, what: str, status: int, answer: dict[str, object], headers: Mapping[str, str]
) -> ProcessServerUnavailableError:
    retry = headers.get("Retry-After")
    retry_after: float | None = None
    if status == 503 and isinstance(retry, str) and retry.strip().isdigit():
        retry_after = float(retry.strip())
    return ProcessServerUnavailableError(
        f"{base} answered {what} with {status} {answer.get('error', '')}: "
        f"{answer.get('message', '')}",
        retry_after_s=retry_after,
    )


def _unavailable(base: str, what: str, exc: BaseException) -> ProcessServerUnavailableError:
    reason = str(exc) or type(exc).__name__
    return ProcessServerUnavailableError(f"{base}: {what} failed: {reason}")
