"""Consistency tags across the disks of this machine.

A *round* puts one TAG record, with one tag id, time and name, into the
stream of every disk of the machine (``[tags] disks``, by default all of
them), at a point where the disks are consistent with each other:

1. connect to each disk's capture (its control socket);
2. for an app-consistent tag, run the quiesce commands (``fsfreeze -f``);
3. *hold* every disk: each capture stops taking writes into its stream
   (the writes wait; none completes), so no write that depends on a
   completed write of another disk can come before the tag;
4. append the tag on every disk;
5. release every disk, and run the unquiesce commands — whatever happened.

It is bounded: holding and tagging must be done within ``round_timeout_s``,
and for an app-consistent tag quiescing and the round within
``freeze_max_s``; a round that runs out of time is abandoned (each disk
is released, nothing is tagged), and a capture releases a hold by itself
after its ``capture.hold_max_s`` if the coordinator dies. The master target
turns each TAG into a recovery point (``tag:NAME``, ``latest-app``).

:class:`TagScheduler` runs rounds at ``crash_interval_s`` and
``app_interval_s``; ``blockrepl agent tag`` runs one on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from agent.capture.control import control_path
from agent.config import AgentConfig
from agent.control_client import ControlClient, ControlError
from agent.errors import TagError

log = logging.getLogger("blockrepl.agent.tags")

T = TypeVar("T")

#: Seconds an unquiesce command may take: it must run even after a failed
#: round, and a thaw that hangs is worth an error, not a hang.
UNQUIESCE_TIMEOUT_S: Final = 30.0
#: Bytes of a failed command's output kept for the message.
OUTPUT_KEPT_BYTES: Final = 2000


@dataclass(frozen=True)
class TaggedDisk:
    disk: str
    generation: int
    seq: int
    #: False if the disk was inside a resync window: the master target keeps
    #: the tag, but offers no point there until the resync ends
    consistent: bool


@dataclass(frozen=True)
class RoundReport:
    """What a round did; ``--json`` prints it."""

    name: str
    kind: str
    tag_id: str
    time_ns: int
    disks: list[TaggedDisk] = field(default_factory=list)
    #: seconds from the first hold to the last release
    held_s: float = 0.0
    #: seconds from the first quiesce command to the first unquiesce one (app tags)
    frozen_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def auto_name(kind: str, now_ns: int | None = None) -> str:
    """The name of a scheduled tag: ``crash-20261122T031500Z``."""
    moment = datetime.fromtimestamp((now_ns or time.time_ns()) / 1e9, UTC)
    return f"{kind}-{moment:%Y%m%dT%H%M%SZ}"


async def tag_round(config: AgentConfig, name: str, *, app: bool) -> RoundReport:
    """Tag every disk of the machine as ``name``: see the module's docstring.

    Raises:
        TagError: the round was abandoned (a disk not running or not answering
            in time, a quiesce command that failed); nothing was tagged, or
            ``details["tagged"]`` names the disks that were.
        ControlError: a capture refused the tag itself (a bad name).
    """
    settings = config.tags
    kind = "app" if app else "crash"
    report = RoundReport(name, kind, secrets.token_hex(16), time.time_ns())
    clients = await connect_disks(config)
    try:
        if not app:
            return await _hold_and_tag(clients, report, settings.round_timeout_s)
        deadline = time.monotonic() + settings.freeze_max_s
        frozen_at = time.monotonic()
        try:
            await run_commands(settings.quiesce, deadline, "quiesce")
            remaining = min(settings.round_timeout_s, deadline - time.monotonic())
            if remaining <= 0:
                raise TagError(
                    f"quiescing took longer than freeze_max_s ({settings.freeze_max_s:g} s); "
                    "the tag was abandoned"
                )
            report = await _hold_and_tag(clients, report, remaining)
        finally:
            frozen_s = time.monotonic() - frozen_at
            await unquiesce(settings.unquiesce)
        return dataclasses.replace(report, frozen_s=frozen_s)
    finally:
        for client in clients:
            await client.close()


async def connect_disks(config: AgentConfig) -> list[ControlClient]:
    clients: list[ControlClient] = []
    try:
        for disk in config.tagged_disks:
            clients.append(await ControlClient.connect(disk, control_path(config.state_dir, disk)))
    except ControlError as exc:
        for client in clients:
            await client.close()
        raise TagError(f"no tag: {exc.message}") from exc
    return clients


async def _hold_and_tag(
    clients: list[ControlClient], report: RoundReport, timeout_s: float
) -> RoundReport:
    """Hold every disk, tag every disk, release every disk; within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    tagged: list[TaggedDisk] = []
    try:
        await gather_answers(
            [client.call({"op": "hold", "timeout_s": timeout_s}) for client in clients],
            deadline,
            "hold the writes of every disk",
        )
        request = {"op": "tag", "kind": report.kind, "name": report.name,
                   "tag_id": report.tag_id, "time_ns": report.time_ns}  # fmt: skip
        answers = await gather_answers(
            [client.call(request) for client in clients],
            deadline,
            "tag every disk",
            disks=[client.disk_id for client in clients],
        )
        tagged = [
            TaggedDisk(
                client.disk_id,
                answer_int(answer, "generation"),
                answer_int(answer, "seq"),
                answer.get("consistent") is True,
            )
            for client, answer in zip(clients, answers, strict=True)
        ]
    finally:
        releases = [client.call({"op": "release"}) for client in clients]
        results = await asyncio.gather(*releases, return_exceptions=True)
        for client, result in zip(clients, results, strict=True):
            if isinstance(result, BaseException):
                # A capture releases by itself when the connection closes.
                log.warning("disk %s: the release was not answered: %s", client.disk_id, result)
    held = time.monotonic() - started
    return RoundReport(report.name, report.kind, report.tag_id, report.time_ns, tagged, held)


async def gather_answers(
    calls: list[Awaitable[dict[str, object]]],
    deadline: float,
    what: str,
    *,
    disks: list[str] | None = None,
) -> list[dict[str, object]]:
    """Every call's answer, by ``deadline``; else TagError (cancelling the rest)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        done = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), max(0.0, deadline - time.monotonic())
        )
    except TimeoutError:
        raise TagError(f"could not {what} in time; the tag was abandoned") from None
    failures = [result for result in done if isinstance(result, BaseException)]
    if failures:
        first = failures[0]
        message = first.message if isinstance(first, ControlError) else repr(first)
        details: dict[str, object] = {}
        if disks is not None:
            details["tagged"] = [
                disk
                for disk, result in zip(disks, done, strict=True)
                if not isinstance(result, BaseException)
            ]
        raise TagError(f"could not {what}: {message}; the tag was abandoned", details=details)
    return [result for result in done if not isinstance(result, BaseException)]


def answer_int(answer: dict[str, object], key: str) -> int:
    value = answer.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def run_commands(commands: tuple[str, ...], deadline: float, what: str) -> None:
    """Run ``commands`` in order, each done by ``deadline``.

    Raises:
        TagError: one failed or ran out of time (it is killed).
    """
    for command in commands:
        await _run(command, max(0.0, deadline - time.monotonic()), what)


async def unquiesce(commands: tuple[str, ...]) -> None:
    """Run every unquiesce command, each bounded; a failure is logged, never raised."""
    for command in commands:
        try:
            await _run(command, UNQUIESCE_TIMEOUT_S, "unquiesce")
        except TagError as exc:
            log.error("%s", exc.message)


async def _run(command: str, timeout_s: float, what: str) -> None:
    try:
        process = await asyncio.create_subprocess_exec(
            *shlex.split(command),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise TagError(f"the {what} command {command!r} cannot run: {exc}") from None
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise TagError(
            f"the {what} command {command!r} did not finish within {timeout_s:.1f} s; killed"
        ) from None
    if process.returncode != 0:
        text = output[-OUTPUT_KEPT_BYTES:].decode("utf-8", "replace").strip()
        raise TagError(
            f"the {what} command {command!r} exited with status {process.returncode}: {text}"
        )


class IntervalRounds:
    """Runs a round of each kind at its interval, one round at a time.

    Args:
        intervals: seconds between rounds of each kind (``"app"``,
            ``"crash"``); 0 leaves a kind out. When two are due, ``app``
            goes first.
        run: runs one round of a kind; it must bound itself and not raise.
    """

    def __init__(
        self, intervals: dict[str, float], run: Callable[[str], Coroutine[Any, Any, None]]
    ) -> None:
        self.intervals = intervals
        self._run_round = run
        self._task: asyncio.Task[None] | None = None
        self._round_task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self, name: str) -> None:
        self._task = asyncio.create_task(self._run(), name=name)

    async def close(self) -> None:
        """Stop; a round under way finishes first (it is bounded by its own
        timeouts), so a stop never leaves a tag on some disks and not others."""
        self._stopping = True
        if self._round_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._round_task)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        intervals = self.intervals
        now = time.monotonic()
        due = {kind: now + interval for kind, interval in intervals.items() if interval}
        while due:
            kind = min(due, key=lambda k: (due[k], k))  # "app" first when both are due
            await asyncio.sleep(max(0.0, due[kind] - time.monotonic()))
            if self._stopping:
                return
            self._round_task = asyncio.create_task(self._run_round(kind), name=f"{kind}-round")
            try:
                await asyncio.shield(self._round_task)
            finally:
                self._round_task = None
            now = time.monotonic()
            for every, at in due.items():  # a round due meanwhile is one round, not a burst
                missed = max(0, int((now - at) // intervals[every]) + 1)
                due[every] = at + missed * intervals[every]


class TagScheduler:
    """Runs crash-consistent and app-consistent rounds at the configured intervals."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.rounds: list[RoundReport] = []
        self.failures = 0
        settings = config.tags
        intervals = {"app": settings.app_interval_s, "crash": settings.crash_interval_s}
        self._rounds = IntervalRounds(intervals, self._round)

    async def start(self) -> TagScheduler:
        intervals = (self.config.tags.crash_interval_s, self.config.tags.app_interval_s)
        if not any(intervals):
            log.warning("tags.crash_interval_s and tags.app_interval_s are both 0: no tags")
        self._rounds.start("tag-rounds")
        log.info(
            "tagging %s: crash-consistent every %g s, app-consistent every %g s (0: never)",
            ", ".join(self.config.tagged_disks),
            *intervals,
        )
        return self

    async def close(self) -> None:
        """Stop; a round under way finishes first (see :meth:`IntervalRounds.close`)."""
        await self._rounds.close()

    async def _round(self, kind: str) -> None:
        name = auto_name(kind)
        try:
            report = await tag_round(self.config, name, app=kind == "app")
        except (TagError, ControlError) as exc:
            self.failures += 1
            log.warning("%s tag %s abandoned: %s", kind, name, exc.message)
            return
        self.rounds.append(report)
        del self.rounds[:-100]
        log.info(
            "%s tag %s on %s (writes held %.3f s)",
            kind,
            name,
            ", ".join(f"{d.disk}@{d.generation}/{d.seq}" for d in report.disks),
            report.held_s,
        )
