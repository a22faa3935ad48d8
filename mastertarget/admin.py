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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from aiohttp import web

from mastertarget.config import GroupConfig
from mastertarget.errors import UnknownGroupError
from mastertarget.groups import GroupPoint, common_points, group_window, select_group_point
from mastertarget.points import RecoveryPoint
from mastertarget.pointspec import (
    SpecKind,
    format_time_ns,
    format_window,
    parse_spec,
    select_point,
)
from mastertarget.recovery import OutputFormat, RecoverResult, group_outputs, set_aside
from mastertarget.replica import DiskReplica
from mastertarget.server import replica_or_404
from mastertarget.state import StateStore
from protocol.admin_api import (
    FailoverRequest,
    GroupPointEntry,
    GroupPointsListing,
    GroupRecoverAnswer,
    GroupRecoverRequest,
    MemberPosition,
    PointEntry,
    PointsListing,
    RecoverAnswer,
    RecoveredDisk,
    RecoverRequest,
    Window,
)
from protocol.api import ErrorBody
from protocol.errors import BlockreplError, MalformedError
from protocol.sequencing import StreamPosition
from runtime.bodies import small_body

if TYPE_CHECKING:
    from mastertarget.daemon import MasterTarget

ADMIN: Final = web.AppKey["MasterTarget"]("mastertarget-admin")
#: Admin request bodies are small JSON objects.
MAX_ADMIN_BODY: Final = 64 * 1024
#: How long ``latest`` waits for the files already received to be applied:
#: "latest" means every received change, as in the seeds; past this the
#: answer says the applier is behind instead of waiting forever.
LATEST_DRAIN_S: Final = 300.0
#: Points listed when the request names no limit: the newest day at one point
#: per 90 s; a full day of a busy disk is far more, and the window says so.
DEFAULT_POINTS_LIMIT: Final = 1000
#: The most points one answer lists (about 25 MB of JSON).
MAX_POINTS_LIMIT: Final = 100_000
#: The admin socket is for the service user and root only.
SOCKET_MODE: Final = 0o600


def point_entry(point: RecoveryPoint) -> PointEntry:
    """One point as the admin API and ``points --json`` show it."""
    return PointEntry(
        format_time_ns(point.capture_ns), point.capture_ns, point.applied_ns, point.kind.value,
        point.name, point.generation, point.seq, point.tag_id.hex(), point.group_id,
    )  # fmt: skip


def points_listing(store: StateStore, disk_id: str, limit: int) -> PointsListing:
    """The answer of ``GET /v1/disks/{disk}/points``: the window, and the
    ``limit`` newest consistent points, newest first."""
    counts, oldest, newest = store.consistent_summary(disk_id)
    total = sum(counts.values())
    offered = store.newest_consistent(disk_id, limit)
    window = format_window([p for p in (oldest, newest) if p is not None])
    return PointsListing(disk_id, Window.parse({**window, "points": total}),
                         tuple(point_entry(p) for p in offered), total > len(offered))  # fmt: skip


def parse_limit(text: str | None) -> int:
    """The ``limit`` of a points listing: DEFAULT_POINTS_LIMIT when absent.

    Raises:
        MalformedError: not a number in 1..MAX_POINTS_LIMIT.
    """
    if text is None:
        return DEFAULT_POINTS_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_POINTS_LIMIT:
        raise MalformedError(f"limit must be 1..{MAX_POINTS_LIMIT}, found {text!r}")
    return int(text)


def recover_answer(result: RecoverResult) -> RecoverAnswer:
    return RecoverAnswer(
        point_entry(result.point), result.copied_bytes, result.undo_parts, result.undo_bytes,
        round(result.copy_s, 3), round(result.total_s, 3),
    )  # fmt: skip


def _replica(request: web.Request) -> DiskReplica:
    return replica_or_404(request.app[ADMIN].replicas, request)


async def _body(request: web.Request) -> bytes:
    return await small_body(
        request,
        max_bytes=MAX_ADMIN_BODY,
        timeout_s=request.app[ADMIN].config.connections.body_timeout_s,
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


def _error(exc: BlockreplError) -> web.Response:
    return web.json_response(ErrorBody.of(exc).to_json(), status=exc.http_status)


async def get_points(request: web.Request) -> web.StreamResponse:
    replica = _replica(request)
    mt = request.app[ADMIN]
    try:
        limit = parse_limit(request.query.get("limit"))
    except BlockreplError as exc:
        return _error(exc)
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(
        mt.executor, points_listing, mt.store, replica.config.id, limit
    )
    return web.json_response(answer.to_json())


async def post_recover(request: web.Request) -> web.StreamResponse:
    replica = _replica(request)
    mt = request.app[ADMIN]
    try:
        asked = RecoverRequest.parse_bytes(await _body(request))
        async with replica.history.keeping_history():  # the chosen point's undo data stays
            point = await _choose(replica, asked.point)
            with mt.metrics.recover_seconds.time():
                result = await replica.history.recover(point, Path(asked.output), asked.format)
    except BlockreplError as exc:
        return _error(exc)
    return web.json_response(recover_answer(result).to_json())


async def post_failover(request: web.Request) -> web.StreamResponse:
    replica = _replica(request)
    mt = request.app[ADMIN]
    try:
        asked = FailoverRequest.parse_bytes(await _body(request))
        async with replica.history.keeping_history():
            point = await _choose(replica, asked.point)
            with mt.metrics.failover_seconds.time():
                result = await replica.history.failover(point)
    except BlockreplError as exc:
        return _error(exc)
    return web.json_response(recover_answer(result).to_json())


# --- consistency groups ---------------------------------------------------------------


def group_of(config_groups: tuple[GroupConfig, ...], group_id: str) -> GroupConfig:
    """The configured group ``group_id``.

    Raises:
        UnknownGroupError: no ``[[groups]]`` table names it.
    """
    for group in config_groups:
        if group.id == group_id:
            return group
    known = ", ".join(g.id for g in config_groups) or "none"
    raise UnknownGroupError(
        f"group {group_id!r} is not in the master target's config; configured: {known}",
        details={"group": group_id},
    )


def group_points(store: StateStore, group: GroupConfig) -> list[GroupPoint]:
    """The group's points, oldest first (blocking: reads the catalog)."""
    return common_points(group.id, group.disks, store.group_points(group.id, group.disks))


def group_point_entry(point: GroupPoint) -> GroupPointEntry:
    """One group point as the admin API and ``points --group --json`` show it."""
    members = {m.disk_id: MemberPosition(m.generation, m.seq) for m in point.members}
    return GroupPointEntry(
        format_time_ns(point.capture_ns), point.capture_ns, point.applied_ns, point.kind,
        point.name, point.tag_id.hex(), members,
    )  # fmt: skip


def group_points_listing(store: StateStore, group: GroupConfig, limit: int) -> GroupPointsListing:
    """The answer of ``GET /v1/groups/{group}/points``: the window and the
    ``limit`` newest group points, newest first."""
    points = group_points(store, group)
    offered = points[::-1][:limit]
    return GroupPointsListing(
        group.id, tuple(group.disks), Window.parse(group_window(points)),
        tuple(group_point_entry(p) for p in offered), len(points) > len(offered),
    )  # fmt: skip


def group_recover_answer(
    point: GroupPoint, outputs: dict[str, Path], results: list[RecoverResult], total_s: float
) -> GroupRecoverAnswer:
    disks = {
        r.point.disk_id: RecoveredDisk(str(outputs[r.point.disk_id]), recover_answer(r))
        for r in results
    }
    return GroupRecoverAnswer(point.group_id, group_point_entry(point), disks, round(total_s, 3))


async def get_group_points(request: web.Request) -> web.StreamResponse:
    mt = request.app[ADMIN]
    try:
        group = group_of(mt.config.groups, request.match_info["group"])
        limit = parse_limit(request.query.get("limit"))
    except BlockreplError as exc:
        return _error(exc)
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(mt.executor, group_points_listing, mt.store, group, limit)
    return web.json_response(answer.to_json())


async def post_group_recover(request: web.Request) -> web.StreamResponse:
    mt = request.app[ADMIN]
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        group = group_of(mt.config.groups, request.match_info["group"])
        asked = GroupRecoverRequest.parse_bytes(await _body(request))
        directory, fmt = asked.output_dir, asked.format
        spec = parse_spec(asked.point)
        replicas = [mt.replicas[disk] for disk in group.disks]
        async with contextlib.AsyncExitStack() as history:
            for replica in replicas:  # before the point is chosen: its undo data must stay
                await history.enter_async_context(replica.history.keeping_history())
            if spec.kind is SpecKind.LATEST:
                for replica in replicas:
                    await _drain(replica)
            points = await loop.run_in_executor(mt.executor, group_points, mt.store, group)
            point = select_group_point(spec, group.id, points)
            outputs = await loop.run_in_executor(
                mt.executor, group_outputs, list(group.disks), Path(directory), fmt
            )
            results = await _recover_members(mt, point, outputs, fmt)
    except BlockreplError as exc:
        return _error(exc)
    answer = group_recover_answer(point, outputs, results, time.monotonic() - started)
    return web.json_response(answer.to_json())


async def _recover_members(
    mt: MasterTarget, point: GroupPoint, outputs: dict[str, Path], fmt: OutputFormat
) -> list[RecoverResult]:
    """Each member disk at its own point of the group point, one after the other."""
    results: list[RecoverResult] = []
    try:
        for member in point.members:
            history = mt.replicas[member.disk_id].history
            result = await history.recover(member, outputs[member.disk_id], fmt)
            mt.metrics.recover_seconds.observe(result.total_s)
            results.append(result)
    except BaseException:
        finished = [outputs[r.point.disk_id] for r in results]
        await asyncio.get_running_loop().run_in_executor(mt.executor, set_aside, finished)
        raise
    return results


def build_admin_app(mt: MasterTarget) -> web.Application:
    app = web.Application(client_max_size=MAX_ADMIN_BODY)
    app[ADMIN] = mt
    app.router.add_get("/v1/disks/{disk}/points", get_points)
    app.router.add_post("/v1/disks/{disk}/recover", post_recover)
    app.router.add_post("/v1/disks/{disk}/failover", post_failover)
    app.router.add_get("/v1/groups/{group}/points", get_group_points)
    app.router.add_post("/v1/groups/{group}/recover", post_group_recover)
    return app
