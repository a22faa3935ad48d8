"""Where the records of a sync pass go.

:class:`PassOutput` is what a pass (agent/sync.py) needs of its output;
:class:`SyncOutput` is that of ``agent sync``, and the capture's resync has
its own (agent/capture/resync.py).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, Protocol

from agent.journal import EntryKind
from agent.source import SourceDisk
from agent.state import AgentState, SyncProgress
from agent.stream import ReplicationStream
from protocol.records import StreamFlags, Write, Zero

RESYNC: Final = StreamFlags.RESYNC
RESYNC_END: Final = StreamFlags.RESYNC | StreamFlags.RESYNC_END


class PassOutput(Protocol):
    """Where a pass's records go, and how it reads what it sends."""

    async def read(self, pieces: list[tuple[int, int]]) -> list[bytearray]:
        """The source's bytes of each ``(offset, length)``, to be sent."""

    async def append(
        self, records: list[Write | Zero], *, final: bool, capture_ns: tuple[int, int]
    ) -> None:
        """Journal and send ``records``; ``final`` for the pass's last batch."""

    async def save(self, progress: SyncProgress) -> None:
        """Keep the pass's progress (its cursor, whether its window is open)."""

    async def finish(self) -> None:
        """The pass is over: its progress is no longer needed."""


@dataclass
class SyncOutput:
    """The output of ``agent sync``: batches journaled by reference to the source
    (``.brs``), flagged RESYNC and, the last, RESYNC_END; progress kept in the
    state database so that an interrupted pass goes on where it stopped."""

    disk_id: str
    source: SourceDisk
    stream: ReplicationStream
    state: AgentState
    executor: ThreadPoolExecutor

    async def read(self, pieces: list[tuple[int, int]]) -> list[bytearray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _read_pieces, self.source, pieces)

    async def append(
        self, records: list[Write | Zero], *, final: bool, capture_ns: tuple[int, int]
    ) -> None:
        await self.stream.append(
            records,
            flags=RESYNC_END if final else RESYNC,
            first_capture_ns=capture_ns[0],
            last_capture_ns=capture_ns[1],
            kind=EntryKind.SOURCE,
        )

    async def save(self, progress: SyncProgress) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.state.put_sync, self.disk_id, progress)

    async def finish(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.state.delete_sync, self.disk_id)


def _read_pieces(source: SourceDisk, pieces: list[tuple[int, int]]) -> list[bytearray]:
    return [source.read(offset, length) for offset, length in pieces]
