"""Simulated protected disks: what each writes, how fast, and what it saw.

A :class:`Source` is one agent's disk. It POSTs batches (docs/api.md) to a
process server over mutual TLS with its machine's certificate, as an agent's
ordered stream does: an open-throttle source whose batches carry 1 MiB or
more keeps ``in_flight`` of them in flight (the agent's
``in_flight_per_disk``, and its rule that a request goes behind another only
when that one carries :data:`~agent.sender.PIPELINED_MIN_BYTES`), any other
one batch. It takes the process server's answers as an agent does: 200
moves it on, 409 with ``expected_seq`` puts it where the process server
says, 503 waits ``Retry-After``.

What it writes is a :class:`Profile`: the size of each write (4 KiB to
1 MiB), random or sequential offsets, writes per batch, and a rate to keep
or none (open throttle: the next batch as soon as the last is acknowledged).
The data comes from a pool of blocks made once: benchmarks/datagen.py's
disk-like mix, or a tar of files on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import aiohttp

from agent.config import DEFAULT_IN_FLIGHT_PER_DISK
from agent.sender import PIPELINED_MIN_BYTES
from benchmarks.datagen import synthetic_blocks, tar_blocks
from protocol.batch import encode_batch
from protocol.records import Record, Write
from runtime.config import TlsFiles
from runtime.tls import client_context

#: The smallest write a profile takes: one 4 KiB page, what file systems and
#: databases write at the least.
MIN_BLOCK_BYTES: Final = 4 * 2**10
#: The largest: 1 MiB, what an agent's capture coalesces sequential writes
#: into (the protocol itself allows 4 MiB per write).
MAX_BLOCK_BYTES: Final = 2**20
#: Distinct data made once and reused round-robin: enough that batches
#: differ (zstd sees no repeats within a batch), little enough to make in
#: about two seconds.
POOL_BYTES: Final = 32 * 2**20
#: At least this many distinct blocks, whatever their size.
POOL_MIN_BLOCKS: Final = 32
#: Seconds one POST may take before the source counts it as failed.
POST_TIMEOUT_S: Final = 60.0
#: Seconds a source waits after a failed POST (connection refused or reset).
ERROR_BACKOFF_S: Final = 0.5
#: A throttled source spaces its batches by the rate times a random factor
#: in 1 +- this. A fixed period would lock each disk's phase to the master
#: target's RPO evaluations (every 5 s), so a disk's sampled RPO would
#: depend on its phase instead of on the pipeline; a small spread unlocks
#: it and keeps each gap between writes (the idle part of every RPO) near
#: the period, so that disks compare on what the site does to them.
THROTTLE_JITTER: Final = 0.1
#: A throttled source this far behind its schedule (the site could not keep
#: up) starts the schedule again from now instead of sending a burst.
MAX_LAG_S: Final = 1.0

Pattern = Literal["random", "sequential"]


@dataclass(frozen=True)
class Profile:
    """What one simulated disk writes.

    Attributes:
        block_bytes: bytes per write, a power of two from 4 KiB to 1 MiB.
        writes_per_batch: writes sent in one batch.
        pattern: ``random`` slots of the disk, or ``sequential`` ones
            (wrapping at the end).
        disk_bytes: the size of the disk the writes fall in.
        rate_Bps: write data per second to keep, or None for open throttle.
    """

    block_bytes: int
    writes_per_batch: int
    pattern: Pattern
    disk_bytes: int
    rate_Bps: float | None = None

    def __post_init__(self) -> None:
        size = self.block_bytes
        if not MIN_BLOCK_BYTES <= size <= MAX_BLOCK_BYTES or size & (size - 1):
            raise ValueError(
                f"expected a block size that is a power of two from {MIN_BLOCK_BYTES} to "
                f"{MAX_BLOCK_BYTES} bytes, found {size}"
            )
        if self.writes_per_batch < 1:
            raise ValueError(f"expected at least 1 write per batch, found {self.writes_per_batch}")
        if self.disk_bytes < size or self.disk_bytes % size:
            raise ValueError(
                f"expected a disk size that is a multiple of the block size {size}, "
                f"found {self.disk_bytes}"
            )
        if self.rate_Bps is not None and not self.rate_Bps > 0:
            raise ValueError(f"expected a positive rate or none, found {self.rate_Bps}")

    @property
    def batch_bytes(self) -> int:
        return self.block_bytes * self.writes_per_batch


def data_pool(block_bytes: int, *, seed: int, tar_of: Path | None = None) -> list[bytes]:
    """Distinct blocks to write: datagen's disk-like mix, or cut from a tar of ``tar_of``.

    Raises:
        SystemExit: ``tar_of`` holds less than one block of readable files.
    """
    count = max(POOL_MIN_BLOCKS, POOL_BYTES // block_bytes)
    if tar_of is None:
        return synthetic_blocks(count, block_bytes, seed=seed)
    blocks = tar_blocks(tar_of, count, block_bytes)
    if not blocks:
        raise SystemExit(
            f"expected at least {block_bytes} bytes of readable files under {tar_of}, found less"
        )
    return blocks


@dataclass
class Tally:
    """What one source saw: every acknowledgement, refusals, errors, bytes sent."""

    #: (monotonic time of the answer, seconds from POST to 200, write-data bytes)
    acks: list[tuple[float, float, int]] = field(default_factory=list)
    #: (monotonic time of the POST, body bytes): every body sent, answered or not
    sent: list[tuple[float, int]] = field(default_factory=list)
    refusals_503: int = 0
    errors: int = 0

    def acked_bytes(self, since: float = 0.0) -> int:
        return sum(n for t, _, n in self.acks if t >= since)

    def wire_bytes(self, since: float = 0.0) -> int:
        return sum(n for t, n in self.sent if t >= since)

    def latencies_s(self, since: float = 0.0) -> list[float]:
        return [s for t, s, _ in self.acks if t >= since]


@dataclass
class Source:
    """One agent's disk: its stream position, its profile, its machine's certificate."""

    disk: str
    index: int
    blocks: Sequence[bytes]
    profile: Profile
    #: the process server's base URL, ``https://HOST:PORT``
    server: str
    tls: TlsFiles
    generation: int = 1
    next_seq: int = 1
    #: batches in flight at most, as the agent's ``in_flight_per_disk``
    in_flight: int = DEFAULT_IN_FLIGHT_PER_DISK
    _cursor: int = 0
    _last_capture_ns: int = 0

    @property
    def url(self) -> str:
        return f"{self.server}/v1/disks/{self.disk}/batches"

    def body(self) -> bytes:
        """The next batch: the pool's blocks round-robin, at the profile's offsets."""
        profile = self.profile
        size = profile.block_bytes
        slots = profile.disk_bytes // size
        rng = random.Random(self.next_seq * 1000 + self.index)
        start = self.index * 97 + self.next_seq - 1
        records: list[Record] = []
        for i in range(profile.writes_per_batch):
            if profile.pattern == "random":
                slot = rng.randrange(slots)
            else:
                slot, self._cursor = self._cursor, (self._cursor + 1) % slots
            records.append(Write(slot * size, self.blocks[(start + i) % len(self.blocks)]))
        # The writes of a batch happened since the last batch was made.
        now = time.time_ns()
        first, self._last_capture_ns = self._last_capture_ns or now, now
        body = encode_batch(
            disk_id=self.disk, generation=self.generation, first_seq=self.next_seq,
            records=records, first_capture_ns=first, last_capture_ns=now,
        )  # fmt: skip
        self.next_seq += len(records)  # the next batch, sent behind this one, follows it
        return body

    @property
    def pipelined(self) -> int:
        """Batches this source keeps in flight: ``in_flight`` when it sends as fast as it
        is answered and each batch carries :data:`PIPELINED_MIN_BYTES`, else one."""
        big = self.profile.batch_bytes >= PIPELINED_MIN_BYTES
        return self.in_flight if big and self.profile.rate_Bps is None else 1

    async def resume(self, session: aiohttp.ClientSession) -> None:
        """Continue the disk's stream where the process server holds it (a disk that
        was replicated before keeps its generation)."""
        async with session.get(f"{self.server}/v1/disks/{self.disk}/state") as response:
            state = await response.json()
            if response.status != 200:
                raise SystemExit(
                    f"{self.disk}: expected the process server's state of the disk, "
                    f"found HTTP {response.status}: {state}"
                )
        if int(state["generation"]) >= 1:
            self.generation = int(state["generation"])
            self.next_seq = int(state["acked_seq"]) + 1

    async def post_once(self, session: aiohttp.ClientSession, tally: Tally) -> float:
        """Send the next batch; the seconds to wait before the next one (503, errors).
        A batch not taken is sent again: the next one starts at its first seq."""
        first = self.next_seq
        body = self.body()
        started = time.monotonic()
        tally.sent.append((started, len(body)))
        try:
            async with session.post(self.url, data=body) as response:
                answer = await response.json()
                status = response.status
                retry_after = float(response.headers.get("Retry-After", "1"))
        except (aiohttp.ClientError, OSError, TimeoutError):
            tally.errors += 1
            self.next_seq = min(self.next_seq, first)
            return ERROR_BACKOFF_S
        if status == 200:
            now = time.monotonic()
            tally.acks.append((now, now - started, self.profile.batch_bytes))
            self.next_seq = max(self.next_seq, int(answer["acked_seq"]) + 1)
            return 0.0
        if status == 409 and "expected_seq" in answer:
            self.next_seq = int(answer["expected_seq"])
            return 0.0
        if status == 503:
            tally.refusals_503 += 1
            self.next_seq = min(self.next_seq, first)
            return retry_after
        raise SystemExit(f"{self.disk}: expected HTTP 200, 409 or 503, found {status}: {answer}")


async def _run_source(
    source: Source, session: aiohttp.ClientSession, tally: Tally, deadline: float,
    *, stop_on_503: bool,
) -> None:  # fmt: skip
    if source.pipelined > 1:
        # As fast as answered, several batches in flight: each lane sends the
        # next batch (after the one the other lane sent) once its own is answered.
        lanes = [
            _post_until(source, session, tally, deadline, stop_on_503=stop_on_503)
            for _ in range(source.pipelined)
        ]
        await asyncio.gather(*lanes)
        return
    rate = source.profile.rate_Bps
    interval = source.profile.batch_bytes / rate if rate else 0.0
    jitter = random.Random(source.index)
    # Throttled disks start at random points of their period, not all at once.
    next_at = time.monotonic() + interval * jitter.random()
    while True:
        now = time.monotonic()
        if interval:
            if next_at < now - MAX_LAG_S:
                next_at = now
            await asyncio.sleep(max(0.0, min(next_at, deadline) - now))
        if time.monotonic() >= deadline:
            return
        wait = await source.post_once(session, tally)
        if wait and stop_on_503 and tally.refusals_503:
            return
        if wait:
            await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        next_at += interval * jitter.uniform(1 - THROTTLE_JITTER, 1 + THROTTLE_JITTER)


async def _post_until(
    source: Source, session: aiohttp.ClientSession, tally: Tally, deadline: float,
    *, stop_on_503: bool,
) -> None:  # fmt: skip
    while time.monotonic() < deadline:
        wait = await source.post_once(session, tally)
        if wait and stop_on_503 and tally.refusals_503:
            return
        if wait:
            await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))


@contextlib.asynccontextmanager
async def connected(sources: Sequence[Source]) -> AsyncIterator[list[aiohttp.ClientSession]]:
    """A session per source with its machine's certificate, each source placed where
    the process server holds its disk's stream; closed on the way out."""
    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(s.tls)), timeout=timeout
        )
        for s in sources
    ]
    try:
        await asyncio.gather(*(s.resume(c) for s, c in zip(sources, sessions, strict=True)))
        yield sessions
    finally:
        for session in sessions:
            await session.close()


async def run_sources(
    sources: Sequence[Source], sessions: Sequence[aiohttp.ClientSession], tallies: list[Tally],
    seconds: float, *, stop_on_503: bool = False,
) -> float:  # fmt: skip
    """Run every source for ``seconds`` (or, with ``stop_on_503``, until each got a
    503), filling its tally; the seconds they ran."""
    started = time.monotonic()
    await asyncio.gather(
        *(
            _run_source(s, session, t, started + seconds, stop_on_503=stop_on_503)
            for s, session, t in zip(sources, sessions, tallies, strict=True)
        )
    )
    return time.monotonic() - started


async def drive(
    sources: Sequence[Source], seconds: float, *, stop_on_503: bool = False
) -> tuple[list[Tally], float]:
    """Connect every source and run it for ``seconds``: :func:`connected`, then
    :func:`run_sources`. Returns each source's tally, and the seconds they ran."""
    tallies = [Tally() for _ in sources]
    async with connected(sources) as sessions:
        elapsed = await run_sources(sources, sessions, tallies, seconds, stop_on_503=stop_on_503)
    return tallies, elapsed
