"""The process server's client of the master target: one mutual-TLS session at a time.

The shipper PUTs files through it, the data API passes checksum requests
through it, and a gap at ingest asks through it where the master target's
stream stands (:meth:`MasterTargetClient.received_position`). A reload with
new client TLS files (:meth:`MasterTargetClient.replace_tls`) opens a new
session for new requests; requests in flight finish on the old one, which
closes once no transfer can still use it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from types import TracebackType
from typing import Final

import aiohttp

from processserver.config import MasterTargetLink
from processserver.metrics import ProcessServerMetrics
from protocol.api import MAX_ANSWER_BYTES, ErrorBody, MtDiskState
from protocol.errors import ProtocolError
from protocol.sequencing import StreamPosition
from runtime.answers import read_answer

log = logging.getLogger("blockrepl.processserver")

#: Seconds to wait for the master target's position of a disk: the agent's
#: request waits meanwhile.
POSITION_TIMEOUT_S: Final = 10.0


class MasterTargetClient:
    """Requests to the master target at ``link.url`` as this process server.

    Args:
        link: the master target's URL and the transfer timeouts.
        tls: the client context: the deployment CA and this process server's
            own certificate.
        metrics: where malformed answers are counted.
    """

    def __init__(
        self, link: MasterTargetLink, tls: ssl.SSLContext, metrics: ProcessServerMetrics
    ) -> None:
        self._link = link
        self._metrics = metrics
        self.base_url = link.url.rstrip("/")
        self._session = _new_session(tls, link)
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session new requests go on."""
        return self._session

    def replace_tls(self, tls: ssl.SSLContext) -> None:
        """Make new connections to the master target with ``tls`` (a reload).

        Requests in flight keep their connection; the old session closes
        after the transfer timeout, when no request on it can still run.
        """
        old, self._session = self._session, _new_session(tls, self._link)
        task = asyncio.create_task(self._retire(old), name="retire-session")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, session: aiohttp.ClientSession) -> None:
        try:
            await asyncio.sleep(self._link.transfer_timeout_s)
        finally:
            await session.close()

    async def close(self) -> None:
        """Close every session, the retiring ones at once."""
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await self._session.close()

    async def __aenter__(self) -> MasterTargetClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def received_position(
        self, disk_id: str, *, timeout_s: float = POSITION_TIMEOUT_S
    ) -> StreamPosition | None:
        """Where the master target's stream of ``disk_id`` stands: the last seq it
        received durably, or None if it did not say (no answer, a refusal, or
        an answer that breaks docs/api.md, which is counted)."""
        url = f"{self.base_url}/v1/disks/{disk_id}/state"
        try:
            async with self._session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                raw = await read_answer(
                    response.content,
                    max_bytes=MAX_ANSWER_BYTES,
                    what="the master target's disk state",
                )
                if response.status != 200:
                    log.debug(
                        "disk %s: the master target answered %d to %s: %s",
                        disk_id,
                        response.status,
                        url,
                        ErrorBody.explain(raw).to_json(),
                    )
                    return None
            state = MtDiskState.parse_bytes(raw)
        except ProtocolError as exc:
            self._metrics.malformed_answers.labels("state").inc()
            log.warning(
                "disk %s: the master target's answer to %s breaks docs/api.md: %s; the gap stands",
                disk_id,
                url,
                exc.message,
            )
            return None
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        return StreamPosition(state.position.generation, state.position.received_seq)


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
