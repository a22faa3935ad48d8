"""Talking to one process server: the data API of docs/api.md over mutual TLS 1.3.

:class:`ProcessServerClient` makes one exchange with one process server and
turns its answer into a typed result or an error of agent/errors.py:

- a refused connection, a timeout, a reset, a 5xx: ``ProcessServerUnavailableError``
  (a 503 carries its ``Retry-After``) — worth retrying;
- 403, 404, 400, 413: ``RefusedError`` — retrying cannot help;
- 409 answers of POST batches are results, not errors: the stream decides
  (protocol/reaction.py);
- a 200 or 409 whose body breaks docs/api.md (protocol/api.py), or any
  answer longer than :data:`~protocol.api.MAX_ANSWER_BYTES`: a malformed
  answer, counted in ``malformed_answers``, logged (a few lines a minute at
  most) and raised as ``ProcessServerUnavailableError`` — a failed exchange,
  waited out and tried again like any other.

Retrying, backing off and moving to another process server are the pool's
(agent/pool.py).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterable, Callable, Mapping
from typing import Final, TypeVar

from agent.errors import ProcessServerUnavailableError, RefusedError
from agent.fastimport import aiohttp
from protocol.api import (
    MAX_ANSWER_BYTES,
    BatchesAnswer,
    ErrorBody,
    GenerationAnswer,
    GenerationRequest,
    PsDiskState,
)
from protocol.errors import ProtocolError
from protocol.sequencing import StreamPosition
from runtime.answers import read_answer
from runtime.throttle import LogThrottle, held_back_note

log = logging.getLogger("blockrepl.agent.client")

#: Bytes of a digest answer read at a time.
READ_CHUNK: Final = 64 * 1024
DIGEST_BYTES: Final = 16
#: Malformed answers are a peer's bug, worth a warning, but one that answers
#: every request so must not fill the log: 5 lines, then one a minute.
MALFORMED_LOG_BURST: Final = 5
MALFORMED_LOG_EVERY_S: Final = 60.0

T = TypeVar("T")


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
        #: answers that broke docs/api.md (each one a failed exchange)
        self.malformed_answers = 0
        self._malformed_log = LogThrottle(MALFORMED_LOG_BURST, MALFORMED_LOG_EVERY_S)

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
        self,
        disk_id: str,
        body: bytes | AsyncIterable[bytes | memoryview],
        *,
        resume: bool = False,
    ) -> BatchesAnswer:
        """POST one or more batches; the answer says how far the disk is acknowledged,
        or where the process server's stream stands (a 409 refusal).

        Args:
            resume: the stream resumes here, from what the master target is
                known to hold (after a start or a move): the process server
                first takes the master target's position if it is further.

        Raises:
            ProcessServerUnavailableError: no answer, 503 (with Retry-After), or
                a malformed answer.
            RefusedError: 400, 403, 404, 413.
        """
        url = self._disk_url(disk_id, "batches") + ("?resume=1" if resume else "")
        headers = {"Content-Type": "application/octet-stream"}
        what = f"POST {url}"
        status, raw = await self._exchange("POST", url, data=body, headers=headers)
        if status in (200, 409):
            return self._parse(what, status, raw, BatchesAnswer.parse_bytes)
        raise self._refusal(status, raw, what)

    async def state(
        self, disk_id: str, *, until_shipped: int | None = None, wait_s: float = 0.0
    ) -> PsDiskState:
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
        what = f"GET {url}"
        status, raw = await self._exchange("GET", url)
        if status != 200:
            raise self._refusal(status, raw, what)
        return self._parse(what, status, raw, lambda _, body: PsDiskState.parse_bytes(body))

    async def start_generation(self, disk_id: str, generation: int) -> GenerationAnswer:
        """Start ``generation`` of the disk's stream (seq 1 comes next).

        Returns:
            the disk's new position, or ``stale-generation`` naming the
            process server's current one when ``generation`` is not above it.

        Raises:
            ProcessServerUnavailableError, RefusedError: as for :meth:`post_batches`.
        """
        url = self._disk_url(disk_id, "generation")
        what = f"POST {url}"
        request = GenerationRequest(generation).to_json()
        status, raw = await self._exchange("POST", url, json_body=request)
        if status in (200, 409):
            return self._parse(what, status, raw, GenerationAnswer.parse_bytes)
        raise self._refusal(status, raw, what)

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
                    raw = await self._read(f"GET {url}", response)
                    raise self._refusal(response.status, raw, f"GET {url}", response.headers)
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

    async def _exchange(
        self,
        method: str,
        url: str,
        *,
        data: bytes | AsyncIterable[bytes | memoryview] | None = None,
        json_body: object | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One request; its status and whole body. A 5xx is raised as unavailable."""
        what = f"{method} {url}"
        try:
            async with self.session.request(
                method, url, data=data, json=json_body, headers=headers
            ) as response:
                raw = await self._read(what, response)
                if response.status >= 500:
                    raise _busy(self.url, what, response.status, raw, response.headers)
                return response.status, raw
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _unavailable(self.url, what, exc) from exc

    async def _read(self, what: str, response: aiohttp.ClientResponse) -> bytes:
        """The answer's body, read to its end within :data:`~protocol.api.MAX_ANSWER_BYTES`."""
        try:
            return await read_answer(
                response.content, max_bytes=MAX_ANSWER_BYTES, what=f"the answer to {what}"
            )
        except ProtocolError as exc:
            raise self._malformed(what, response.status, exc) from None

    def _parse(self, what: str, status: int, raw: bytes, parse: Callable[[int, bytes], T]) -> T:
        try:
            return parse(status, raw)
        except ProtocolError as exc:
            raise self._malformed(what, status, exc) from None

    def _malformed(
        self, what: str, status: int, exc: ProtocolError
    ) -> ProcessServerUnavailableError:
        """Count and log an answer that breaks docs/api.md; the error to raise for it."""
        self.malformed_answers += 1
        message = f"{self.url} answered {what} with {status} and a body that breaks docs/api.md: "
        message += exc.message
        held = self._malformed_log.take(time.monotonic())
        if held is not None:
            log.warning("%s; taken as a failed exchange%s", message, held_back_note(held))
        return ProcessServerUnavailableError(message)

    def _refusal(
        self, status: int, raw: bytes, what: str, headers: Mapping[str, str] | None = None
    ) -> Exception:
        if status >= 500:
            return _busy(self.url, what, status, raw, headers or {})
        answer = ErrorBody.explain(raw)
        return RefusedError(
            f"{self.url} refused {what}: {status} {answer.error}: {answer.message}",
            status=status,
            server_code=answer.error,
        )


def _busy(
    base: str, what: str, status: int, raw: bytes, headers: Mapping[str, str]
) -> ProcessServerUnavailableError:
    retry = headers.get("Retry-After")
    retry_after: float | None = None
    if status == 503 and isinstance(retry, str) and retry.strip().isdigit():
        retry_after = float(retry.strip())
    answer = ErrorBody.explain(raw)
    return ProcessServerUnavailableError(
        f"{base} answered {what} with {status} {answer.error}: {answer.message}",
        retry_after_s=retry_after,
    )


def _unavailable(base: str, what: str, exc: BaseException) -> ProcessServerUnavailableError:
    reason = str(exc) or type(exc).__name__
    return ProcessServerUnavailableError(f"{base}: {what} failed: {reason}")
