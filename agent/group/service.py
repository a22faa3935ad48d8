"""``blockrepl agent group``: this machine's part of its consistency group, until stopped.

On a member, the listener for the coordinator's rounds (agent/group/server.py).
On the coordinator, the rounds at ``[group] crash_interval_s`` and
``app_interval_s`` (agent/group/coordinator.py). Both serve the metrics of
agent/group/metrics.py on the agent's metrics listener (127.0.0.1:9103).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from agent.config import AgentConfig, GroupSettings
from agent.errors import GroupRoundAbortedError
from agent.group.coordinator import GroupCoordinator
from agent.group.metrics import PREFIX, GroupMetrics
from agent.group.server import GroupMemberServer
from agent.tags import IntervalRounds, auto_name
from runtime.metrics import MetricsServer, new_registry, start_metrics_server
from runtime.serverlog import RequestLogs

log = logging.getLogger("blockrepl.agent.group")


class GroupService:
    """This machine's group role, running. Build with :meth:`start`, stop with :meth:`close`.

    Args:
        config: the agent config, with a ``[group]`` table.
        registry: the metrics registry (a new one by default).
        port, metrics_port: ports to bind instead of the configured ones (tests).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        registry: CollectorRegistry | None = None,
        port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        assert config.group is not None
        self.config = config
        self.group: GroupSettings = config.group
        self.registry = registry or new_registry()
        self.metrics = GroupMetrics(self.registry)
        self._port = port
        self._metrics_port = metrics_port
        self.server: GroupMemberServer | None = None
        self._rounds: IntervalRounds | None = None
        self._metrics_server: MetricsServer | None = None
        self._coordinator: GroupCoordinator | None = None
        self.committed = 0
        self.aborted = 0
        self._closing = False

    async def start(self) -> GroupService:
        group = self.group
        try:
            if group.is_coordinator:
                self._coordinator = GroupCoordinator(self.config, self.metrics)
                intervals = {"app": group.app_interval_s, "crash": group.crash_interval_s}
                self._rounds = IntervalRounds(intervals, self._round)
                self._rounds.start("group-rounds")
                log.info(
                    "group %s: coordinating %s; crash-consistent rounds every %g s, "
                    "app-consistent every %g s (0: never), writes held at most %g s",
                    group.id,
                    ", ".join(m.machine for m in group.members),
                    group.crash_interval_s,
                    group.app_interval_s,
                    group.barrier_max_s,
                )
            else:
                self.server = GroupMemberServer(
                    self.config, held=self._held, done=self._member_done
                )
                await self.server.start(self._port)
            self._metrics_server = await start_metrics_server(
                self.registry,
                self.config.metrics,
                alive=lambda: not self._closing,
                ready=lambda: (not self._closing, "shutting down"),
                port=self._metrics_port,
                server_log=RequestLogs(self.registry, PREFIX).for_listener("metrics"),
            )
        except BaseException:
            await self.close()
            raise
        return self

    @property
    def metrics_port(self) -> int:
        assert self._metrics_server is not None
        return self._metrics_server.port

    async def close(self) -> None:
        """Stop: a round under way ends first (bounded), then the listeners close."""
        self._closing = True
        if self._rounds is not None:
            await self._rounds.close()
        if self.server is not None:
            await self.server.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()

    async def _round(self, kind: str) -> None:
        assert self._coordinator is not None
        name = auto_name(f"{self.group.id}-{kind}")
        try:
            await self._coordinator.round(name, app=kind == "app")
        except GroupRoundAbortedError:
            self.aborted += 1  # logged and counted by the coordinator
            return
        self.committed += 1

    def _held(self, seconds: float) -> None:
        self.metrics.held.labels(self.group.id).observe(seconds)

    def _member_done(self, outcome: str, _: float) -> None:
        self.metrics.member_rounds.labels(self.group.id, outcome).inc()
        if outcome == "committed":
            self.committed += 1
        else:
            self.aborted += 1
