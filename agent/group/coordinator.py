"""The coordinator's rounds: one member of a group runs them for every member.

A round (docs/groups.md):

1. **connect** to every other member on the group port (mutual TLS with the
   group certificates; the member must present its own machine id as CN),
   within ``connect_timeout_s``. This machine takes part in-process, with
   the same steps (agent/group/member.py), not over the network;
2. **prepare** every member: each reaches its disks' captures, and in an
   app-consistent round runs its quiesce commands (bounded by the
   coordinator's ``tags.freeze_max_s``, else ``connect_timeout_s``);
3. **hold** every member: the barrier. From the first hold request, every
   disk of every member must be held, and then tagged, within
   ``barrier_max_s``;
4. **tag** every member: one GROUP tag, one tag id, on every disk;
5. **resume** every member, telling it the outcome: *committed* when every
   disk of every member was tagged, else *aborted*.

Writes are never held past the bound, whatever fails: a member that cannot
be told to resume releases by itself, when its connection ends, when its
barrier timer fires, and in each capture (the hold's own ``max_s``), even if
its agent is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Final, Protocol

from agent.config import AgentConfig, GroupMember, GroupSettings, parse_address
from agent.errors import GroupRefusalError, GroupRoundAbortedError
from agent.group.member import MemberRound
from agent.group.messages import MAX_LINE_BYTES, Request, RoundSpec, decode, encode
from agent.group.metrics import GroupMetrics
from agent.group.server import run_step
from agent.tags import TaggedDisk, answer_int
from protocol.errors import BlockreplError
from runtime.crashpoints import crash_point
from runtime.errors import ConfigError, PeerIdentityError
from runtime.tls import client_context, peer_identity

log = logging.getLogger("blockrepl.agent.group")

#: Seconds each member has to answer the resume: it releases by itself on
#: the bound anyway, so waiting longer only delays the report.
RESUME_TIMEOUT_S: Final = 1.0
#: Seconds a member's answer may take outside the barrier (prepare, resume).
CLOSE_TIMEOUT_S: Final = 1.0


@dataclass(frozen=True)
class GroupRoundReport:
    """What a committed round did; ``--json`` prints it."""

    group: str
    name: str
    kind: str
    tag_id: str
    time_ns: int
    #: each member's tagged disks
    members: dict[str, list[TaggedDisk]] = field(default_factory=dict)
    #: seconds from the first hold request to the last member's resume answer
    barrier_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class _Participant(Protocol):
    machine: str
    #: a step was cut off or failed: its state is unknown, so no resume is sent
    broken: bool

    async def step(self, request: Request, message: dict[str, object]) -> dict[str, object]:
        """Run one step; its answer, or raise GroupRefusalError / _MemberLostError."""
        ...

    async def finish(self, outcome: str) -> None:
        """Resume (unless broken) and close; bounded, never raises."""
        ...


class _MemberLostError(Exception):
    """The connection to a member ended, or it answered what no member would."""


class _Local:
    """This machine's part of the round, run in the coordinator's process."""

    def __init__(self, config: AgentConfig, spec: RoundSpec, held: Callable[[float], None]) -> None:
        assert config.group is not None
        self.machine = config.group.machine
        self.broken = False
        self._member = MemberRound(config, spec, held)

    async def step(self, request: Request, message: dict[str, object]) -> dict[str, object]:
        return _checked(self.machine, await run_step(self._member, request))

    async def finish(self, outcome: str) -> None:
        if not self.broken:
            with contextlib.suppress(BlockreplError):
                await self._member.resume()
        await self._member.finish()


class _Remote:
    """A member over the group port."""

    def __init__(
        self, machine: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.machine = machine
        self.broken = False
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(
        cls, member: GroupMember, context: ssl.SSLContext, timeout_s: float
    ) -> _Remote:
        """Reach ``member`` and check it is who the config says.

        Raises:
            GroupRoundAbortedError: ``unreachable`` or ``refused`` (another CN).
        """
        host, port = parse_address("address", member.address)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=context, server_hostname="", limit=MAX_LINE_BYTES
                ),
                timeout_s,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            raise GroupRoundAbortedError(
                f"member {member.machine} at {member.address} cannot be reached: {why}",
                reason="unreachable",
            ) from None
        try:
            found = peer_identity(writer.get_extra_info("ssl_object"))
        except PeerIdentityError as exc:
            found = f"(unnamed: {exc.message})"
        if found != member.machine:
            writer.close()
            raise GroupRoundAbortedError(
                f"the group port at {member.address} is {found}, not member {member.machine}",
                reason="refused",
            )
        return cls(member.machine, reader, writer)

    async def step(self, request: Request, message: dict[str, object]) -> dict[str, object]:
        try:
            self._writer.write(encode(message))
            await self._writer.drain()
            line = await self._reader.readline()
        except (OSError, ValueError) as exc:
            raise _MemberLostError(f"member {self.machine}: the connection failed: {exc}") from None
        if not line:
            raise _MemberLostError(f"member {self.machine} closed the connection")
        try:
            answer = decode(line)
        except BlockreplError as exc:
            raise _MemberLostError(f"member {self.machine}: {exc.message}") from None
        return _checked(self.machine, answer)

    async def finish(self, outcome: str) -> None:
        if not self.broken:
            resume: dict[str, object] = {"op": "resume", "outcome": outcome}
            with contextlib.suppress(_MemberLostError, GroupRefusalError, TimeoutError):
                await asyncio.wait_for(
                    self.step(Request("resume", outcome=outcome), resume), RESUME_TIMEOUT_S
                )
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT_S)


def _checked(machine: str, answer: dict[str, object]) -> dict[str, object]:
    if answer.get("ok") is not True:
        code = str(answer.get("error", "unknown"))
        raise GroupRefusalError(f"member {machine}: {answer.get('message', '')}", wire_code=code)
    return answer


class GroupCoordinator:
    """Runs the rounds of this machine's group; it must be the group's coordinator.

    Args:
        config: the agent config, with a ``[group]`` whose coordinator is
            this machine.
        metrics: where rounds are counted (None: nowhere).

    Raises:
        ConfigError: this machine is not the group's coordinator.
    """

    def __init__(self, config: AgentConfig, metrics: GroupMetrics | None = None) -> None:
        group = config.group
        if group is None or not group.is_coordinator:
            coordinator = group.coordinator if group is not None else "(no [group])"
            raise ConfigError(f"only the group's coordinator runs rounds; it is {coordinator}")
        self.config = config
        self.group: GroupSettings = group
        self.metrics = metrics
        self._context = client_context(group.tls, check_hostname=False)

    async def round(self, name: str, *, app: bool) -> GroupRoundReport:
        """One round: see the module's docstring.

        Raises:
            GroupRoundAbortedError: the round aborted (its ``reason`` and
                message say why); every member resumed.
        """
        group = self.group
        spec = RoundSpec(
            group.id,
            "app" if app else "crash",
            name,
            secrets.token_hex(16),
            time.time_ns(),
            group.barrier_max_s,
        )
        self._count(lambda m: m.started.labels(group.id).inc())
        participants: list[_Participant] = []
        outcome = "aborted"
        barrier_s = 0.0
        try:
            participants = await self._connect(spec)
            timeout = self.config.tags.freeze_max_s if app else group.connect_timeout_s
            await _phase(
                participants,
                Request("prepare", spec=spec),
                spec.prepare(),
                timeout,
                "prepare-timeout",
            )
            started = time.monotonic()
            deadline = started + group.barrier_max_s
            await _phase(
                participants,
                Request("hold"),
                {"op": "hold"},
                deadline - time.monotonic(),
                "barrier-timeout",
            )
            crash_point("group-held")
            tagged = await _phase(
                participants,
                Request("tag"),
                {"op": "tag"},
                deadline - time.monotonic(),
                "tag-timeout",
            )
            outcome = "committed"
        except GroupRoundAbortedError as exc:
            reason = exc.reason
            self._count(lambda m: m.aborts.labels(group.id, reason).inc())
            log.warning("group %s round %s aborted (%s): %s", group.id, name, reason, exc.message)
            raise GroupRoundAbortedError(
                f"group {group.id} round {name!r} aborted ({reason}): {exc.message}; every "
                "member resumed its writes",
                reason=reason,
            ) from None
        finally:
            await asyncio.gather(*(p.finish(outcome) for p in participants))
            if outcome == "committed":
                barrier_s = time.monotonic() - started
            self._count(lambda m: m.rounds.labels(group.id, outcome).inc())
        report = GroupRoundReport(
            group.id,
            name,
            spec.kind,
            spec.tag_id,
            spec.time_ns,
            {machine: [_tagged(d) for d in _disks(answer)] for machine, answer in tagged.items()},
            barrier_s,
        )
        log.info(
            "group %s: %s round %s committed on %s (barrier %.3f s)",
            group.id,
            spec.kind,
            name,
            ", ".join(f"{m} ({len(d)} disks)" for m, d in report.members.items()),
            barrier_s,
        )
        return report

    async def _connect(self, spec: RoundSpec) -> list[_Participant]:
        """This machine and every other member, reached; or abort (closing what was)."""
        held = self._observe_hold
        connects = [
            _Remote.connect(member, self._context, self.group.connect_timeout_s)
            for member in self.group.remote_members
        ]
        results = await asyncio.gather(*connects, return_exceptions=True)
        reached: list[_Participant] = [r for r in results if isinstance(r, _Remote)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for remote in reached:
                remote.broken = True  # nothing was asked of it yet: closing is enough
                await remote.finish("aborted")
            raise failures[0]
        return [_Local(self.config, spec, held), *reached]

    def _observe_hold(self, seconds: float) -> None:
        self._count(lambda m: m.held.labels(self.group.id).observe(seconds))

    def _count(self, update: Callable[[GroupMetrics], None]) -> None:
        if self.metrics is not None:
            update(self.metrics)


async def _phase(
    participants: list[_Participant],
    request: Request,
    message: dict[str, object],
    timeout_s: float,
    timeout_reason: str,
) -> dict[str, dict[str, object]]:
    """One step on every participant at once, every answer within ``timeout_s``.

    Raises:
        GroupRoundAbortedError: a member refused, was lost, or was late; the
            steps still running are cut off (their participants are broken).
    """
    tasks = {p.machine: asyncio.ensure_future(p.step(request, message)) for p in participants}
    done, pending = await asyncio.wait(
        tasks.values(), timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_EXCEPTION
    )
    for participant in participants:
        task = tasks[participant.machine]
        if task in pending or (task.done() and task.exception() is not None):
            participant.broken = task in pending or isinstance(task.exception(), _MemberLostError)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    failed = [(m, t.exception()) for m, t in tasks.items() if t in done and t.exception()]
    if failed:
        _, exc = failed[0]
        if isinstance(exc, GroupRefusalError):
            reason = "quiesce-failed" if exc.wire_code == "quiesce-failed" else "refused"
            raise GroupRoundAbortedError(f"{request.op}: {exc.message}", reason=reason)
        if isinstance(exc, _MemberLostError):
            raise GroupRoundAbortedError(f"{request.op}: {exc}", reason="member-lost")
        assert exc is not None
        raise exc
    if pending:
        late = ", ".join(m for m, t in tasks.items() if t in pending)
        raise GroupRoundAbortedError(
            f"{late} did not answer {request.op} within {max(0.0, timeout_s):.3f} s",
            reason=timeout_reason,
        )
    return {machine: task.result() for machine, task in tasks.items()}


def _disks(answer: dict[str, object]) -> list[dict[str, object]]:
    disks = answer.get("disks")
    return [d for d in disks if isinstance(d, dict)] if isinstance(disks, list) else []


def _tagged(disk: dict[str, object]) -> TaggedDisk:
    return TaggedDisk(
        str(disk.get("disk", "")),
        answer_int(disk, "generation"),
        answer_int(disk, "seq"),
        disk.get("consistent") is True,
    )
