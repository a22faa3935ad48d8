"""A member's listener on the group port: the coordinator's rounds, one at a time.

Mutual TLS 1.3 with the deployment CA and this machine's group certificate
(``blockrepl certs issue --group``). Only the group's coordinator, known by
its certificate's CN, may run a round; anyone else is answered ``forbidden``
and the connection closed before a byte of a request is read. One round
runs at a time: a second coordinator connection meanwhile is answered
``busy``. When the connection ends at any step, the disks are released and
the applications thawed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Final

from agent.config import AgentConfig, GroupSettings
from agent.errors import GroupRefusalError
from agent.group.member import MemberRound
from agent.group.messages import MAX_LINE_BYTES, Request, encode, parse_request, refusal
from protocol.errors import BlockreplError
from runtime.crashpoints import crash_point
from runtime.errors import ConfigError, PeerIdentityError
from runtime.throttle import LogThrottle, held_back_note
from runtime.tls import peer_identity, server_context

log = logging.getLogger("blockrepl.agent.group")

#: Seconds a member waits for the coordinator's next request of a round:
#: every step of a round is bounded by seconds (the connect, the quiesce,
#: the barrier), so a longer silence is a coordinator gone or stuck. The
#: disks are released long before (the barrier bound); this frees the slot.
REQUEST_WAIT_S: Final = 60.0
#: Refused connections (a machine that is not the coordinator, a connection
#: that ends before a round) logged back to back, then one every
#: REFUSAL_LOG_EVERY_S: a peer that keeps knocking cannot fill the log.
REFUSAL_LOG_BURST: Final = 5
REFUSAL_LOG_EVERY_S: Final = 10.0

#: (outcome, seconds held) of each round a member took part in.
RoundDone = Callable[[str, float], None]


class GroupMemberServer:
    """Serves this machine's part of its group's rounds.

    Args:
        config: the agent config, with a ``[group]`` table.
        held: called with the seconds writes were held in each round.
        done: called with each round's outcome (``committed`` or
            ``aborted``, as the coordinator said, or ``aborted`` when it
            went away) and the seconds held.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        held: Callable[[float], None] | None = None,
        done: RoundDone | None = None,
    ) -> None:
        assert config.group is not None
        self.config = config
        self.group: GroupSettings = config.group
        self._held = held
        self._done = done
        self._busy = False
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._refusals = LogThrottle(REFUSAL_LOG_BURST, REFUSAL_LOG_EVERY_S)

    async def start(self, port: int | None = None) -> None:
        """Listen on the group's address (``port`` instead of its port: tests).

        Raises:
            ConfigError: the address cannot be bound.
            TlsSetupError: the group's TLS files are not usable.
        """
        host, configured = self.group.listen_address
        context = server_context(self.group.tls)
        bind = configured if port is None else port
        try:
            self._server = await asyncio.start_server(
                self._serve,
                host,
                bind,
                ssl=context,
                limit=MAX_LINE_BYTES,
                ssl_handshake_timeout=self.group.connect_timeout_s,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for the group's coordinator on {host}:{bind}: {exc.strerror or exc}"
            ) from exc
        log.info(
            "group %s: member %s listening on %s:%d for coordinator %s",
            self.group.id,
            self.group.machine,
            host,
            self.port,
            self.group.coordinator,
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening; a round under way is ended (its disks released)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._session(reader, writer)
        except (ConnectionError, ssl.SSLError, ValueError) as exc:  # a peer gone, a long line
            self._log(logging.INFO, "a coordinator connection ended: %s", exc)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = peer_identity(writer.get_extra_info("ssl_object"))
        except PeerIdentityError as exc:
            peer = f"(unnamed: {exc.message})"
        if peer != self.group.coordinator:
            self._log(
                logging.WARNING,
                "refused %s: only the coordinator %s runs rounds",
                peer,
                self.group.coordinator,
            )
            await _send(writer, refusal("forbidden", f"{peer} is not the group's coordinator"))
            return
        if self._busy:
            await _send(writer, refusal("busy", "a round of the group is under way here"))
            return
        self._busy = True
        try:
            await self._round(reader, writer)
        finally:
            self._busy = False

    def _log(self, level: int, message: str, *args: object) -> None:
        """A line about a refused or broken connection, within the refusal throttle."""
        held = self._refusals.take(time.monotonic())
        if held is not None:
            log.log(level, f"group %s: {message}%s", self.group.id, *args, held_back_note(held))

    async def _round(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One round: prepare, hold, tag, resume, in that order; any other end aborts."""
        member: MemberRound | None = None
        outcome = "aborted"
        try:
            for expected in ("prepare", "hold", "tag", "resume"):
                request = await self._next(reader, writer, expected)
                if request is None:
                    return
                if request.spec is not None:
                    if request.spec.group != self.group.id:
                        await _send(
                            writer,
                            refusal(
                                "wrong-group",
                                f"this machine is in group {self.group.id}, "
                                f"not {request.spec.group}",
                            ),
                        )
                        return
                    member = MemberRound(self.config, request.spec, self._held)
                assert member is not None
                answer = await run_step(member, request)
                if request.op == "hold":
                    crash_point("member-held")
                await _send(writer, answer)
                if answer.get("ok") is not True:
                    return
                if request.op == "resume":
                    outcome = request.outcome
        finally:
            if member is not None:
                await member.finish()
                log.info(
                    "group %s round %s %s here (writes held %.3f s)",
                    self.group.id,
                    member.spec.name,
                    outcome,
                    member.held_s,
                )
                if self._done is not None:
                    self._done(outcome, member.held_s)

    async def _next(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, expected: str
    ) -> Request | None:
        """The next request, if it is ``expected``; None (answered or not) otherwise."""
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_WAIT_S)
        except TimeoutError:
            log.warning(
                "group %s: the coordinator sent nothing for %g s", self.group.id, REQUEST_WAIT_S
            )
            return None
        if not line:
            return None
        try:
            request = parse_request(line)
        except BlockreplError as exc:
            await _send(writer, refusal("malformed", exc.message))
            return None
        if request.op != expected:
            await _send(writer, refusal("out-of-order", f"expected {expected}, found {request.op}"))
            return None
        return request


async def run_step(member: MemberRound, request: Request) -> dict[str, object]:
    """Run one step; its answer (a refusal on failure)."""
    try:
        if request.op == "prepare":
            return {"ok": True, "machine": member.machine, "disks": await member.prepare()}
        if request.op == "hold":
            await member.hold()
            return {"ok": True}
        if request.op == "tag":
            return {"ok": True, "disks": [asdict(d) for d in await member.tag()]}
        return {"ok": True, "held_s": round(await member.resume(), 6)}
    except GroupRefusalError as exc:
        return refusal(exc.wire_code, exc.message)


async def _send(writer: asyncio.StreamWriter, message: dict[str, object]) -> None:
    writer.write(encode(message))
    await writer.drain()
