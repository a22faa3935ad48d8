"""A machine's part of a consistency group round, on its disks' captures.

The steps are the machine round's (agent/tags.py): each disk's capture
control socket, hold, tag, release, and the ``[tags]`` quiesce and unquiesce
commands for an app-consistent round. What a group adds:

- each step is one request of the coordinator (agent/group/messages.py);
- the writes are held at most the round's ``barrier_max_s``, counted from
  when this machine starts holding, in two places: a timer here, which
  releases every disk when the bound passes, and each hold's own ``max_s``
  in the capture process, which holds even when this process is stopped or
  killed;
- the tag is a GROUP tag of the group, after an APP tag with the same id in
  an app-consistent round (the master target reads the pair as an
  app-consistent group point, docs/groups.md);
- an app-consistent round's applications stay quiesced at most this
  machine's ``tags.freeze_max_s``: then the disks are released and the
  unquiesce commands run, whatever the coordinator does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

from agent.config import AgentConfig
from agent.control_client import ControlClient
from agent.errors import GroupRefusalError, TagError
from agent.group.messages import RoundSpec
from agent.tags import (
    TaggedDisk,
    answer_int,
    connect_disks,
    gather_answers,
    run_commands,
    unquiesce,
)

log = logging.getLogger("blockrepl.agent.group")

#: Seconds the captures have to answer a release: they answer at once; a
#: release that is not answered is done by closing the connection instead.
RELEASE_TIMEOUT_S: Final = 1.0


class MemberRound:
    """This machine's part of one round; its steps are called in order.

    Args:
        config: this machine's agent config (its disks, its quiesce commands).
        spec: the round, as the coordinator announced it.
        held: called with the seconds the writes were held, once released.
    """

    def __init__(
        self, config: AgentConfig, spec: RoundSpec, held: Callable[[float], None] | None = None
    ) -> None:
        assert config.group is not None
        self.config = config
        self.spec = spec
        self._group = config.group.id
        self._on_held = held
        self._clients: list[ControlClient] = []
        self._held_at: float | None = None
        self.held_s = 0.0
        #: the disks were released (resumed, the bound passed, or aborted)
        self.released = False
        self._why_released = ""
        self._frozen = False
        self._timers: list[asyncio.TimerHandle] = []
        self._thaw_task: asyncio.Task[None] | None = None

    @property
    def machine(self) -> str:
        assert self.config.group is not None
        return self.config.group.machine

    @property
    def disks(self) -> list[str]:
        return [client.disk_id for client in self._clients]

    async def prepare(self) -> list[str]:
        """Reach every disk's capture; for an app round, quiesce the applications.

        Raises:
            GroupRefusalError: ``not-ready`` (a capture is not running) or
                ``quiesce-failed``.
        """
        try:
            self._clients = await connect_disks(self.config)
        except TagError as exc:
            raise GroupRefusalError(exc.message, wire_code="not-ready") from None
        if self.spec.app:
            settings = self.config.tags
            loop = asyncio.get_running_loop()
            self._frozen = True
            self._timers.append(loop.call_later(settings.freeze_max_s, self._freeze_bound))
            try:
                deadline = time.monotonic() + settings.freeze_max_s
                await run_commands(settings.quiesce, deadline, "quiesce")
            except TagError as exc:
                raise GroupRefusalError(exc.message, wire_code="quiesce-failed") from None
        return self.disks

    async def hold(self) -> None:
        """Hold the writes of every disk, each for at most the round's barrier.

        Raises:
            GroupRefusalError: ``expired`` (released already) or ``hold-failed``.
        """
        self._check_live()
        bound = self.spec.barrier_max_s
        self._held_at = time.monotonic()
        self._timers.append(asyncio.get_running_loop().call_later(bound, self._barrier_bound))
        request = {"op": "hold", "timeout_s": bound, "max_s": bound}
        try:
            await gather_answers(
                [client.call(request) for client in self._clients],
                self._held_at + bound,
                "hold the writes of every disk",
            )
        except TagError as exc:
            raise GroupRefusalError(self._why(exc.message), wire_code="hold-failed") from None

    async def tag(self) -> list[TaggedDisk]:
        """Put the round's GROUP tag (after an APP tag, for an app round) on every disk.

        Raises:
            GroupRefusalError: ``expired`` (the bound passed) or ``tag-failed``.
        """
        self._check_live()
        assert self._held_at is not None
        spec = self.spec
        base = {"op": "tag", "name": spec.name, "tag_id": spec.tag_id, "time_ns": spec.time_ns}

        async def tag_disk(client: ControlClient) -> dict[str, object]:
            if spec.app:
                await client.call({**base, "kind": "app"})
            return await client.call({**base, "kind": "group", "group": self._group})

        try:
            answers = await gather_answers(
                [tag_disk(client) for client in self._clients],
                self._held_at + spec.barrier_max_s,
                "tag every disk",
                disks=self.disks,
            )
        except TagError as exc:
            raise GroupRefusalError(self._why(exc.message), wire_code="tag-failed") from None
        return [
            TaggedDisk(
                client.disk_id,
                answer_int(answer, "generation"),
                answer_int(answer, "seq"),
                answer.get("consistent") is True,
            )
            for client, answer in zip(self._clients, answers, strict=True)
        ]

    async def resume(self) -> float:
        """Release every disk; the seconds the writes were held."""
        if not self.released:
            releases = [client.call({"op": "release"}) for client in self._clients]
            with contextlib.suppress(TimeoutError):  # closing them below releases them too
                await asyncio.wait_for(
                    asyncio.gather(*releases, return_exceptions=True), RELEASE_TIMEOUT_S
                )
            self._release_now("resumed")
        return self.held_s

    async def finish(self) -> None:
        """Release if not done, close the captures' connections, thaw the
        applications of an app round (bounded, never raises)."""
        self._release_now("the round ended")
        for timer in self._timers:
            timer.cancel()
        for client in self._clients:
            await client.close()
        self._thaw()
        if self._thaw_task is not None:
            await self._thaw_task

    def _check_live(self) -> None:
        if self.released:
            raise GroupRefusalError(
                f"the writes were released already ({self._why_released})", wire_code="expired"
            )

    def _why(self, message: str) -> str:
        return f"{message} ({self._why_released})" if self.released else message

    def _barrier_bound(self) -> None:
        if not self.released:
            log.warning(
                "group %s round %s: writes held for the barrier's %g s; released",
                self._group,
                self.spec.name,
                self.spec.barrier_max_s,
            )
            self._release_now(f"the barrier bound of {self.spec.barrier_max_s:g} s passed")

    def _freeze_bound(self) -> None:
        if self._frozen:
            log.warning(
                "group %s round %s: applications quiesced for tags.freeze_max_s (%g s); "
                "released and thawed",
                self._group,
                self.spec.name,
                self.config.tags.freeze_max_s,
            )
            self._release_now("tags.freeze_max_s passed")
            self._thaw()

    def _release_now(self, why: str) -> None:
        """Release every disk at once: closing a control connection ends its hold."""
        if self.released:
            return
        self.released = True
        self._why_released = why
        for client in self._clients:
            client.close_now()
        if self._held_at is not None:
            self.held_s = time.monotonic() - self._held_at
            if self._on_held is not None:
                self._on_held(self.held_s)

    def _thaw(self) -> None:
        if self._frozen:
            self._frozen = False
            self._thaw_task = asyncio.ensure_future(unquiesce(self.config.tags.unquiesce))
