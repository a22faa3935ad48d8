"""The target's digests of one span of regions, fetched in one request.

A pass asks the master target (through the process server) for the digests
of a whole span at once (agent/compare.py plans the spans); the answer
streams, and each region's digests are handed out as soon as they arrived,
so the comparison of the first regions does not wait for the last.

A digest answer counts only if the master target had applied everything
sent before the pass (the *baseline*, agent/sync.py): one taken earlier is
asked for again shortly.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from agent.client import ProcessServerClient
from agent.compare import DIGEST_BYTES, Granularity, Span
from agent.errors import ProcessServerUnavailableError
from agent.pool import ProcessServerPool
from protocol.sequencing import StreamPosition

#: Seconds to wait before asking again for digests that the master target
#: took before it applied what was sent ahead of the pass.
TARGET_BEHIND_WAIT_S: Final = 0.2


class DigestCounts(Protocol):
    """Where a fetch counts what it received: the pass's stats."""

    hash_bytes: int
    hash_requests: int


class SpanDigests:
    """The target's digests of one span, fetched in one request and handed out by region.

    The request streams: region ``i``'s digests are available as soon as they
    arrive. A failed request is made again from the first region not yet
    handed out, through the pool's failure policy.
    """

    def __init__(
        self,
        span: Span,
        *,
        disk_id: str,
        pool: ProcessServerPool,
        chunk_bytes: int,
        region_bytes: int,
        baseline: StreamPosition,
        stats: DigestCounts,
    ) -> None:
        self.span = span
        self._disk_id = disk_id
        self._pool = pool
        self._chunk = chunk_bytes if span.granularity is Granularity.CHUNK else region_bytes
        self._baseline = baseline
        self._stats = stats
        loop = asyncio.get_running_loop()
        self._futures: list[asyncio.Future[bytes]] = [loop.create_future() for _ in span.regions]
        for future in self._futures:  # an abandoned span must not warn about its error
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._task = asyncio.create_task(self._run(), name="span-digests")

    async def digests(self, index: int) -> bytes:
        """The digests of region ``index`` of the span."""
        return await self._futures[index]

    @property
    def done(self) -> bool:
        """Every digest of the span arrived, or the request failed for good."""
        return self._task.done()

    def cancel(self) -> None:
        self._task.cancel()
        for future in self._futures:
            future.cancel()

    def _need(self, index: int) -> int:
        return -(-self.span.regions[index].length // self._chunk) * DIGEST_BYTES

    async def _run(self) -> None:
        try:
            await self._pool.call(self._fetch_rest)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the regions' awaiters get it
            for future in self._futures:
                if not future.done():
                    future.set_exception(exc)

    async def _fetch_rest(self, client: ProcessServerClient) -> None:
        first = next(i for i, f in enumerate(self._futures) if not f.done())
        pending = bytearray()
        current = first

        def sink(applied: StreamPosition, digests: bytes) -> None:
            nonlocal current
            if applied < self._baseline:
                raise ProcessServerUnavailableError(
                    f"the target's digests were taken at {applied.generation}/{applied.seq}, "
                    f"before what was sent ahead of the pass ({self._baseline.generation}/"
                    f"{self._baseline.seq}) was applied",
                    retry_after_s=TARGET_BEHIND_WAIT_S,
                )
            self._stats.hash_bytes += len(digests)
            pending.extend(digests)
            while current < len(self._futures) and len(pending) >= self._need(current):
                need = self._need(current)
                self._futures[current].set_result(bytes(pending[:need]))
                del pending[:need]
                current += 1

        offset = self.span.regions[first].offset
        await client.checksums(
            self._disk_id,
            offset=offset,
            length=self.span.regions[-1].end - offset,
            chunk=self._chunk,
            sink=sink,
        )
        self._stats.hash_requests += 1
