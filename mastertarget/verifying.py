"""Verifying a disk's received files ahead of its applier, on executor threads.

While one group of files is written to the target, the next files are
decrypted and checked on other threads (protocol/hrl.py ``open_hrl``, then
mastertarget/apply.py ``check_file``): :data:`PREFETCH_FILES` and
:data:`PREFETCH_BYTES` at most. Files whose verification is done when a
group starts are applied together, with one flush and one marker commit:
under load the fsyncs per file fall below one, idle the latency stays one
file. Nothing unverified is ever applied (docs/design.md invariant 4).

Threads: the verifications in flight (their futures) are owned by the event
loop. Each verification runs on an executor thread with the file's entry,
the key ring and the target's size, which never change, and hands back the
verified file or the error that refused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mastertarget.apply import check_file
from mastertarget.inbox import InboxEntry
from protocol.errors import ProtocolError
from protocol.hrl import HrlFile, open_hrl
from protocol.keyring import KeyRing
from protocol.sequencing import Fit, StreamPosition, admit

#: Bytes of inbox files verified ahead of the one being applied: enough to
#: keep a second core decrypting while the first writes, and small, because
#: a verified file is held in memory: with a wider window every buffer is
#: fresh memory and page faults cost more than the overlap gains (measured
#: with benchmarks/mt_apply_bench.py: 1 MiB 70 %, 4 MiB 74 %, 16 MiB 72 %,
#: 64 MiB 53 % of the limit).
PREFETCH_BYTES: Final = 4 * 2**20
#: Files verified at once: on two cores, three in flight keep one core
#: decrypting while the other writes; more only contend for the GIL and the
#: cores (measured against the limit: 1 file 59 %, 2 files 71 %, 3 files
#: 74 %, about ten 70 % with more spread between runs).
PREFETCH_FILES: Final = 3
#: Most files applied under one flush and one marker commit, and most bytes:
#: a group is re-applied whole after a crash, so it stays small.
MAX_GROUP_FILES: Final = 32
MAX_GROUP_BYTES: Final = 64 * 2**20

#: Files to apply together, each with its verified content, in stream order.
Group = list[tuple[InboxEntry, HrlFile]]


@dataclass(frozen=True, slots=True)
class BadHead:
    """The file to apply next failed verification: it is quarantined, later files wait."""

    entry: InboxEntry
    error: ProtocolError


class VerifiedAhead:
    """The verifications in flight for one disk.

    Args:
        disk_id: the disk every file must belong to.
        keyring: opens the files.
        target_size: every record must lie inside the target.
        executor: where files are verified.
    """

    def __init__(
        self, disk_id: str, *, keyring: KeyRing, target_size: int, executor: Executor
    ) -> None:
        self._disk_id = disk_id
        self._keyring = keyring
        self._target_size = target_size
        self._executor = executor
        self._opened: dict[Path, asyncio.Future[HrlFile]] = {}

    def start(self, queued: Iterable[InboxEntry]) -> None:
        """Start verifying the first of the waiting files that are not under way yet."""
        loop = asyncio.get_running_loop()
        wanted = set()
        budget = PREFETCH_BYTES
        for entry in queued:
            wanted.add(entry.path)
            if entry.path not in self._opened:
                self._opened[entry.path] = loop.run_in_executor(
                    self._executor, functools.partial(self._open, entry)
                )
            budget -= entry.size
            if budget <= 0 or len(wanted) >= PREFETCH_FILES:
                break
        for path in [p for p in self._opened if p not in wanted and self._opened[p].done()]:
            del self._opened[path]  # superseded or quarantined meanwhile

    async def group(self, queued: Iterable[InboxEntry], applied: StreamPosition) -> Group | BadHead:
        """The file that continues ``applied``, verified, and the files after it
        whose verification is done; empty if the first is not under way."""
        group: Group = []
        position = applied
        size = 0
        for entry in list(queued)[:MAX_GROUP_FILES]:
            fit = admit(position, entry.generation, entry.first_seq, entry.last_seq).fit
            future = self._opened.get(entry.path)
            if fit is not Fit.NEXT or future is None or (group and not future.done()):
                break
            try:
                hrl = await future
            except ProtocolError as exc:
                self._opened.pop(entry.path, None)
                if not group:
                    return BadHead(entry, exc)
                break
            group.append((entry, hrl))
            position = entry.end
            size += hrl.header.plaintext_len
            if size >= MAX_GROUP_BYTES:
                break
        return group

    def forget(self, entries: Iterable[InboxEntry]) -> None:
        """Files applied: their verified content is no longer needed."""
        for entry in entries:
            self._opened.pop(entry.path, None)

    async def drain(self) -> None:
        """Wait for every verification under way (before the files close)."""
        for future in self._opened.values():
            with contextlib.suppress(Exception):
                await future

    def _open(self, entry: InboxEntry) -> HrlFile:
        """Read and verify one inbox file whole (blocking; on an executor thread)."""
        hrl = open_hrl(entry.path.read_bytes(), self._keyring)
        check_file(
            hrl,
            entry.path.name,
            disk_id=self._disk_id,
            place=entry.place,
            target_size=self._target_size,
        )
        return hrl
