"""Taking batches into the cache: per-disk ordering, sealing, group commit.

For each verified batch of a disk (protocol/batch.py) the ingest places it
in the disk's stream (protocol/sequencing.py): a duplicate is acknowledged
and dropped, a gap or an overlap is refused naming the seq expected, an older
generation is refused naming the current one. A batch that comes next is
sealed into an HRL file on the executor (zstd and AES-GCM release the GIL;
one sealer per thread) and made durable by the group committer; only then
does the disk's position move and the batch count as acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, replace

from processserver.cache import CachedFile
from processserver.committer import GroupCommitter
from processserver.positions import DiskPosition
from protocol.batch import Batch
from protocol.hrl import HrlSealer, SealedHrl
from protocol.keyring import KeyRing
from protocol.sequencing import Admission, Fit, StreamPosition, admit


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one batch."""

    admission: Admission
    #: the disk's acknowledged position afterwards
    acked: StreamPosition


class Sealers:
    """One HrlSealer per executor thread: a zstd context is not thread-safe."""

    def __init__(self, keyring: KeyRing, zstd_level: int) -> None:
        self._keyring = keyring
        self._level = zstd_level
        self._local = threading.local()

    def set_level(self, zstd_level: int) -> None:
        """Seal with this zstd level from now on (a reload); each thread makes a new sealer."""
        self._level = zstd_level

    def seal(self, batch: Batch, receive_ns: int) -> SealedHrl:
        sealer: HrlSealer | None = getattr(self._local, "sealer", None)
        if sealer is None or getattr(self._local, "level", None) != self._level:
            level = self._level
            sealer = self._local.sealer = HrlSealer(self._keyring, zstd_level=level)
            self._local.level = level
        h = batch.header
        return sealer.seal(
            disk_id=h.disk_id, generation=h.generation, first_seq=h.first_seq,
            record_count=h.record_count, first_capture_ns=h.first_capture_ns,
            last_capture_ns=h.last_capture_ns, receive_ns=receive_ns, plaintext=batch.payload,
            data_len=h.data_len, salt=os.urandom(32), flags=h.flags,
            plaintext_xxh3_128=h.payload_xxh3_128,
        )  # fmt: skip


class DiskIngest:
    """The ingest side of one disk: its position and the lock that orders its batches."""

    def __init__(
        self,
        disk_id: str,
        position: DiskPosition,
        *,
        sealers: Sealers,
        committer: GroupCommitter,
        executor: Executor,
    ) -> None:
        self.disk_id = disk_id
        self._position = position
        #: set (and replaced) whenever the position changes: wakes long polls
        self._moved = asyncio.Event()
        #: one request of this disk at a time: admission and commit must not interleave
        self.lock = asyncio.Lock()
        self._sealers = sealers
        self._committer = committer
        self._executor = executor
        #: files cached and not yet shipped, oldest first (the shipper's queue)
        self.cached: collections.deque[CachedFile] = collections.deque()
        #: bytes of HRL files written for this disk (the compression ratio's divisor)
        self.sealed_bytes = 0
        #: set when a file joins ``cached``: wakes the disk's shipper
        self.wake = asyncio.Event()

    @property
    def position(self) -> DiskPosition:
        """The disk's acknowledged and shipped position."""
        return self._position

    @position.setter
    def position(self, value: DiskPosition) -> None:
        self._position = value
        self._moved.set()
        self._moved = asyncio.Event()

    async def wait_shipped(self, seq: int, timeout_s: float) -> None:
        """Until the master target holds ``seq`` of the current generation, the
        generation changes, a resync is required, or ``timeout_s`` passed."""
        generation = self._position.acked.generation
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (
            self._position.acked.generation == generation
            and self._position.shipped_seq < seq
            and not self._position.resync_required
        ):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._moved.wait(), remaining)
            except TimeoutError:
                return

    async def take(self, batch: Batch) -> Verdict:
        """Place one batch; the caller holds :attr:`lock`.

        Raises:
            DurabilityError: the group it was in failed; it is not acknowledged.
        """
        h = batch.header
        verdict = admit(self.position.acked, h.generation, h.first_seq, h.last_seq)
        if verdict.fit is not Fit.NEXT:
            return Verdict(verdict, self.position.acked)
        loop = asyncio.get_running_loop()
        sealed = await loop.run_in_executor(
            self._executor, self._sealers.seal, batch, time.time_ns()
        )
        moved = replace(self.position, acked=StreamPosition(h.generation, h.last_seq))
        cached = await self._committer.commit(sealed, moved)
        self.cached.append(cached)
        self.sealed_bytes += cached.size
        self.wake.set()
        # The shipper may have moved shipped_seq while the group was written.
        self.position = replace(moved, shipped_seq=self.position.shipped_seq)
        return Verdict(verdict, moved.acked)
