"""Shipping cached HRL files to the master target.

One task per disk takes the disk's cached files oldest first and PUTs them
to the master target (docs/api.md), a bounded number at a time over all
disks. A file is deleted only after the master target's 200 (DESIGN.md
invariant 1). On a refusal the master target's answer decides, as
protocol/reaction.py says:

- ``gap`` / ``overlap``: the master target expects an earlier seq. If it
  expects a seq this cache still holds, shipping goes on from there; if the
  seqs it needs are gone, the disk is ``resync_required``;
- a seq the master target already holds (its ``received_seq`` is past the
  file): the file is dropped as shipped;
- ``stale-generation``: the master target is on a newer generation; files of
  older generations are dropped;
- ``failed-over``: the disk takes no more data; shipping stops;
- 503 or no answer: back-off with jitter, doubling from 0.5 s to 30 s;
- an answer that breaks docs/api.md (protocol/api.py), or is longer than
  any answer may be: counted in ``malformed_answers_total{call="put-hrl"}``
  and ``ship_retries_total``, logged, and backed off like a 503.

A reload with new client TLS files (:meth:`Shipper.replace_tls`) opens a new
session for new transfers; transfers in flight finish on the old one, which
closes once no transfer can still use it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from dataclasses import replace
from typing import TYPE_CHECKING, Final

import aiohttp

from processserver.cache import CachedFile
from processserver.config import MasterTargetLink
from processserver.ingest import DiskIngest
from protocol.api import CONFLICT, MAX_ANSWER_BYTES, OK, ErrorBody, HrlAnswer
from protocol.errors import ProtocolError
from protocol.reaction import ShipAction, ShipDecision, react_to_hrl
from runtime.answers import read_answer
from runtime.service import vital

if TYPE_CHECKING:
    from processserver.daemon import ProcessServer

log = logging.getLogger("blockrepl.processserver.ship")

#: Back-off after a failed transfer: quick after a blip, gentle on a master
#: target that is down; the jitter keeps many disks from retrying in step.
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0


class Shipper:
    """Ships every disk's cached files to the master target."""

    def __init__(self, ps: ProcessServer, tls: ssl.SSLContext) -> None:
        self._ps = ps
        self._base = ps.config.master_target.url.rstrip("/")
        self._slots = asyncio.Semaphore(ps.config.max_in_flight)
        self._session = _new_session(tls, ps.config.master_target)
        self._retiring: set[asyncio.Task[None]] = set()
        self._tasks = [
            vital(asyncio.create_task(self._ship_disk(disk), name=f"ship-{disk.disk_id}"))
            for disk in ps.disks.values()
        ]
        self._stopping = False

    @property
    def session(self) -> aiohttp.ClientSession:
        """The mutual-TLS session to the master target (also for pass-through requests)."""
        return self._session

    @property
    def base_url(self) -> str:
        return self._base

    def replace_tls(self, tls: ssl.SSLContext) -> None:
        """Make new connections to the master target with ``tls`` (a reload).

        Requests in flight keep their connection; the old session closes
        after the transfer timeout, when no request on it can still run.
        """
        old, self._session = self._session, _new_session(tls, self._ps.config.master_target)
        task = asyncio.create_task(self._retire(old), name="retire-session")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, session: aiohttp.ClientSession) -> None:
        try:
            await asyncio.sleep(self._ps.config.master_target.transfer_timeout_s)
        finally:
            await session.close()

    async def close(self) -> None:
        self._stopping = True
        for task in (*self._tasks, *self._retiring):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._retiring, return_exceptions=True)
        await self._session.close()

    async def _ship_disk(self, disk: DiskIngest) -> None:
        backoff = BACKOFF_FIRST_S
        while not self._stopping:
            if not disk.cached or (disk.position.resync_required and not disk.cached):
                disk.wake.clear()
                await disk.wake.wait()
                continue
            if self._ps.failed_over(disk.disk_id):
                disk.wake.clear()
                await disk.wake.wait()
                continue
            head = disk.cached[0]
            async with self._slots:
                outcome = await self._send(disk, head)
            if outcome:
                backoff = BACKOFF_FIRST_S
            else:
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _send(self, disk: DiskIngest, head: CachedFile) -> bool:
        """Send one file and carry out what its answer decides; False when the
        caller should back off."""
        ps = self._ps
        loop = asyncio.get_running_loop()
        url = f"{self._base}/v1/disks/{disk.disk_id}/hrl/{head.generation}/{head.first_seq}"
        status = 0
        try:
            data = await loop.run_in_executor(ps.executor, head.path.read_bytes)
            started = loop.time()
            async with self._session.put(url, data=data) as response:
                status = response.status
                raw = await read_answer(response.content, max_bytes=MAX_ANSWER_BYTES,
                                        what=f"the answer to {head.path.name}")  # fmt: skip
            ps.metrics.ship_seconds.observe(loop.time() - started)
            answer = HrlAnswer.parse_bytes(status, raw) if status in (OK, CONFLICT) else None
        except ProtocolError as exc:
            ps.metrics.malformed_answers.labels("put-hrl").inc()
            ps.metrics.ship_retries.labels(disk.disk_id).inc()
            log.warning("disk %s: the master target answered %s with %d and a body that breaks "
                        "docs/api.md: %s", disk.disk_id, head.path.name, status,
                        exc.message)  # fmt: skip
            return False
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            ps.metrics.ship_retries.labels(disk.disk_id).inc()
            log.debug("disk %s: shipping %s failed: %s", disk.disk_id, head.path.name, exc)
            return False
        if answer is None:
            ps.metrics.ship_retries.labels(disk.disk_id).inc()
            log.warning("disk %s: the master target answered %d to %s: %s", disk.disk_id, status,
                        head.path.name, ErrorBody.explain(raw).to_json())  # fmt: skip
            return False
        return await self._carry_out(disk, head, len(data), react_to_hrl(answer, disk.cached))

    async def _carry_out(
        self, disk: DiskIngest, head: CachedFile, size: int, decision: ShipDecision
    ) -> bool:
        """Do what protocol/reaction.py decided; False when the caller should back off."""
        if decision.action is ShipAction.SHIPPED:
            await self._shipped(disk, head, size)
            return True
        if decision.action is ShipAction.STOP:
            log.warning("disk %s: %s; shipping stops", disk.disk_id, decision.reason)
            self._ps.mark_failed_over(disk.disk_id)
            return True
        await self._drop(disk, decision.held)  # the master target holds these already
        if decision.resync:
            log.error("disk %s: %s; the disk needs a resync", disk.disk_id, decision.reason)
            await self._ps.require_resync(disk)
        await self._drop(disk, decision.older)  # of generations that can never be whole
        if decision.action is ShipAction.BACK_OFF:
            # A refusal with no way forward: sending the same file again at once would loop.
            log.debug("disk %s: %s; backing off", disk.disk_id, decision.reason)
            return False
        return True

    async def _shipped(self, disk: DiskIngest, head: CachedFile, size: int) -> None:
        ps = self._ps
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(ps.executor, ps.cache.remove, head)
        if disk.cached and disk.cached[0] is head:
            disk.cached.popleft()
        disk.position = replace(disk.position, shipped_seq=head.last_seq)
        ps.metrics.bytes_out.labels(disk.disk_id).inc(size)
        ps.metrics.files_out.labels(disk.disk_id).inc()

    async def _drop(self, disk: DiskIngest, count: int) -> None:
        """Drop ``count`` files from the head of the disk's cache, as shipped."""
        for _ in range(count):
            await self._shipped(disk, disk.cached[0], 0)


def _new_session(tls: ssl.SSLContext, link: MasterTargetLink) -> aiohttp.ClientSession:
    """A session to the master target: mutual TLS, each transfer bounded in time."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls),
        timeout=aiohttp.ClientTimeout(
            total=link.transfer_timeout_s,
            sock_connect=link.connect_timeout_s,
            sock_read=link.read_timeout_s,
        ),
    )
