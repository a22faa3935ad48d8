"""The master target's admin API: recovery points, recover and failover, of a
disk or of a consistency group.

Served on a Unix socket (``admin_socket`` in the config, mode 0600): only
the service user and root can reach it, so it needs no certificates, and it
is never on the network. ``mastertarget points|recover|failover`` use it while
the daemon runs. Specified in docs/api.md, "Admin API".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Final

from aiohttp import web

from mastertarget.admin_answers import (
    group_of,
    group_points_listing,
    parse_limit,
    recover_answer,
)
from mastertarget.app_state import CATALOG, CONFIG, EXECUTOR, METRICS, REPLICAS, replica_or_404
from mastertarget.config import MasterTargetConfig
from mastertarget.group_recovery import recover_group
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.points import RecoveryPoint
from mastertarget.pointspec import SpecKind, parse_spec, select_point
from mastertarget.recovery import RecoverResult
from mastertarget.replica import DiskReplica
from mastertarget.state import StateStore
from protocol.admin_api import (
    FailoverRequest,
    GroupRecoverRequest,
    RecoverRequest,
)
from protocol.errors import BlockreplError, MalformedError
from protocol.sequencing import StreamPosition
from runtime.apiserver import exception_answer
from runtime.bodies import small_body

#: Admin request bodies are small JSON objects.
MAX_ADMIN_BODY: Final = 64 * 1024
#: How long ``latest`` waits for the files already received to be applied:
#: "latest" means every received change, as in the seeds; past this the
#: answer says the applier is behind instead of waiting forever.
LATEST_DRAIN_S: Final = 300.0
#: The admin socket is for the service user and root only.
SOCKET_MODE: Final = 0o600


async def _body(request: web.Request) -> bytes:
    return await small_body(
        request,
        max_bytes=MAX_ADMIN_BODY,
        timeout_s=request.app[CONFIG]().connections.body_timeout_s,
    )


async def _choose(replica: DiskReplica, text: str) -> RecoveryPoint:
    """The point ``text`` names; call it inside the disk's keeping_history()."""
    spec = parse_spec(text)
    if spec.kind is SpecKind.LATEST:  # every received change first (lowest RPO)
        await _drain(replica)
    applied: StreamPosition = replica.applied
    points = await replica.history.points()
    return select_point(spec, points, processed_seq=(applied.generation, applied.seq))


async def _drain(replica: DiskReplica) -> None:
    """Until the files already received are applied, for ``latest``."""
    try:
        await asyncio.wait_for(replica.wait_applied(replica.received), LATEST_DRAIN_S)
    except TimeoutError:
        raise MalformedError(
            f"'latest' waits for the received files to be applied; disk "
            f"{replica.config.id} is still {replica.received.seq - replica.applied.seq} "
            f"seqs behind after {LATEST_DRAIN_S:.0f} s: use latest-processed"
        ) from None


async def get_points(request: web.Request) -> web.StreamResponse:
    replica = replica_or_404(request)
    try:
        limit = parse_limit(request.query.get("limit"))
    except BlockreplError as exc:
        return exception_answer(exc)
    answer = await replica.history.listing(limit)
    return web.json_response(answer.to_json())


async def post_recover(request: web.Request) -> web.StreamResponse:
    replica = replica_or_404(request)
    history = replica.history
    try:
        asked = RecoverRequest.parse_bytes(await _body(request))
        async with history.keeping_history():  # the chosen point's undo data stays
            point = await _choose(replica, asked.point)
            with request.app[METRICS].recover_seconds.time():
                result = await history.recover(point, Path(asked.output), asked.format)
    except BlockreplError as exc:
        return exception_answer(exc)
    return web.json_response(recover_answer(result).to_json())


async def post_failover(request: web.Request) -> web.StreamResponse:
    replica = replica_or_404(request)
    history = replica.history
    try:
        asked = FailoverRequest.parse_bytes(await _body(request))
        async with history.keeping_history():
            point = await _choose(replica, asked.point)
            with request.app[METRICS].failover_seconds.time():
                result = await history.failover(point)
    except BlockreplError as exc:
        return exception_answer(exc)
    return web.json_response(recover_answer(result).to_json())


# --- consistency groups ---------------------------------------------------------------


async def get_group_points(request: web.Request) -> web.StreamResponse:
    try:
        group = group_of(request.app[CONFIG]().groups, request.match_info["group"])
        limit = parse_limit(request.query.get("limit"))
    except BlockreplError as exc:
        return exception_answer(exc)
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(
        request.app[EXECUTOR], group_points_listing, request.app[CATALOG], group, limit
    )
    return web.json_response(answer.to_json())


async def post_group_recover(request: web.Request) -> web.StreamResponse:
    replicas = request.app[REPLICAS]
    metrics = request.app[METRICS]
    loop = asyncio.get_running_loop()
    try:
        group = group_of(request.app[CONFIG]().groups, request.match_info["group"])
        asked = GroupRecoverRequest.parse_bytes(await _body(request))
        fmt = asked.format
        spec = parse_spec(asked.point)
        members = [replicas[disk] for disk in group.disks]
        async with contextlib.AsyncExitStack() as history:
            for replica in members:  # before the point is chosen: its undo data must stay
                await history.enter_async_context(replica.history.keeping_history())
            if spec.kind is SpecKind.LATEST:
                for replica in members:
                    await _drain(replica)

            def recover_member(point: RecoveryPoint, output: Path) -> RecoverResult:
                result = replicas[point.disk_id].history.copy_at(point, output, fmt)
                metrics.recover_seconds.observe(result.total_s)
                return result

            answer = await loop.run_in_executor(
                request.app[EXECUTOR],
                lambda: recover_group(
                    request.app[CATALOG],
                    group,
                    spec,
                    directory=Path(asked.output_dir),
                    output_format=fmt,
                    recover_member=recover_member,
                ),
            )
    except BlockreplError as exc:
        return exception_answer(exc)
    return web.json_response(answer.to_json())


def build_admin_app(
    *,
    replicas: Mapping[str, DiskReplica],
    config: Callable[[], MasterTargetConfig],
    metrics: MasterTargetMetrics,
    executor: Executor,
    catalog: StateStore,
) -> web.Application:
    """The admin application over ``replicas``.

    Args:
        config: returns the running config (groups, timeouts).
        executor: reads the catalog and copies the disks of a group.
        catalog: where a group's points are read.
    """
    app = web.Application(client_max_size=MAX_ADMIN_BODY)
    app[REPLICAS] = replicas
    app[CONFIG] = config
    app[METRICS] = metrics
    app[EXECUTOR] = executor
    app[CATALOG] = catalog
    app.router.add_get("/v1/disks/{disk}/points", get_points)
    app.router.add_post("/v1/disks/{disk}/recover", post_recover)
    app.router.add_post("/v1/disks/{disk}/failover", post_failover)
    app.router.add_get("/v1/groups/{group}/points", get_group_points)
    app.router.add_post("/v1/groups/{group}/recover", post_group_recover)
    return app
