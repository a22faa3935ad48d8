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
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from aiohttp import web

from mastertarget.config import GroupConfig
from mastertarget.errors import UnknownGroupError
from mastertarget.groups import (
    GroupPoint,
    common_points,
    group_point_json,
    group_window,
    select_group_point,
)
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


def point_json(point: RecoveryPoint) -> dict[str, object]:
    """One point as the admin API and ``points --json`` show it."""
    return {
        "time": format_time_ns(point.capture_ns),
        "capture_ns": point.capture_ns,
        "applied_ns": point.applied_ns,
        "kind": point.kind.value,
        "name": point.name,
        "generation": point.generation,
        "seq": point.seq,
        "tag_id": point.tag_id.hex(),
        "group_id": point.group_id,
    }


def points_json(store: StateStore, disk_id: str, limit: int) -> dict[str, object]:
    """The answer of ``GET /v1/disks/{disk}/points``: the window, and the
    ``limit`` newest consistent points, newest first."""
    counts, oldest, newest = store.consistent_summary(disk_id)
    total = sum(counts.values())
    offered = store.newest_consistent(disk_id, limit)
    window = format_window([p for p in (oldest, newest) if p is not None])
    window["points"] = total
    return {"disk": disk_id, "window": window, "points": [point_json(p) for p in offered],
            "more": total > len(offered)}  # fmt: skip


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


def result_json(result: RecoverResult) -> dict[str, object]:
    return {
        "point": point_json(result.point),
        "copied_bytes": result.copied_bytes,
        "undo_parts": result.undo_parts,
        "undo_bytes": result.undo_bytes,
        "copy_s": round(result.copy_s, 3),
        "total_s": round(result.total_s, 3),
    }


def _replica(request: web.Request) -> DiskReplica:
    return replica_or_404(request.app[ADMIN].replicas, request)


async def _body(request: web.Request) -> dict[str, object]:
    raw = await small_body(
        request,
        max_bytes=MAX_ADMIN_BODY,
        timeout_s=request.app[ADMIN].config.connections.body_timeout_s,
    )
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deep
        raise MalformedError(
            f"expected a JSON object, found bytes that do not parse: {exc}"
        ) from None
    if not isinstance(body, dict):
        raise MalformedError(f"expected a JSON object, found {type(body).__name__}")
    return body


async def _choose(replica: DiskReplica, text: object) -> RecoveryPoint:
    spec = parse_spec(_spec_text(text))
    if spec.kind is SpecKind.LATEST:  # every received change first (lowest RPO)
        await _drain(replica)
    applied: StreamPosition = replica.applied
    return select_point(spec, replica.points(), processed_seq=(applied.generation, applied.seq))


def _spec_text(text: object) -> str:
    if not isinstance(text, str):
        raise MalformedError(f"expected 'point' to be a SPEC string, found {text!r}")
    return text


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
    return web.json_response(exc.to_json(), status=exc.http_status)


async def get_points(request: web.Request) -> web.StreamResponse:
    replica = _replica(request)
    mt = request.app[ADMIN]
    try:
        limit = parse_limit(request.query.get("limit"))
    except BlockreplError as exc:
        return _error(exc)
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(
        mt.executor, points_json, mt.store, replica.config.id, limit
    )
    return web.json_response(answer)


async def post_recover(request: web.Request) -> web.StreamResponse:
    replica = _replica(request)
    mt = request.app[ADMIN]
    try:
        body = await _body(request)
        output, fmt = body.get("output"), body.get("format", "raw")
        if not isinstance(output, str) or not os.path.isabs(output):
            raise MalformedError(f"expected 'output' to be an absolute path, found {output!r}")
        if fmt not in ("raw", "vmdk"):
            raise MalformedError(f"expected 'format' raw or vmdk, found {fmt!r}")
        point = await _choose(replica, body.get("point"))
        with mt.metrics.recover_seconds.time():
            result = await replica.recover(point, Path(output), fmt)
    except BlockreplError as exc:
        return _error(exc)
    return web.json_response(result_json(result))


async def post_failover(request: web.Request) -> web.StreamResponse:
    replica = _replica(request)
    mt = request.app[ADMIN]
    try:
        body = await _body(request)
        point = await _choose(replica, body.get("point"))
        with mt.metrics.failover_seconds.time():
            result = await replica.failover(point)
    except BlockreplError as exc:
        return _error(exc)
    return web.json_response(result_json(result))


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


def group_points_json(store: StateStore, group: GroupConfig, limit: int) -> dict[str, object]:
    """The answer of ``GET /v1/groups/{group}/points``: the window and the
    ``limit`` newest group points, newest first."""
    points = group_points(store, group)
    offered = points[::-1][:limit]
    return {"group": group.id, "disks": list(group.disks), "window": group_window(points),
            "points": [group_point_json(p) for p in offered],
            "more": len(points) > len(offered)}  # fmt: skip


def group_result_json(
    point: GroupPoint, outputs: dict[str, Path], results: list[RecoverResult], total_s: float
) -> dict[str, object]:
    return {
        "group": point.group_id,
        "point": group_point_json(point),
        "disks": {
            r.point.disk_id: {"output": str(outputs[r.point.disk_id]), **result_json(r)}
            for r in results
        },
        "total_s": round(total_s, 3),
    }


async def get_group_points(request: web.Request) -> web.StreamResponse:
    mt = request.app[ADMIN]
    try:
        group = group_of(mt.config.groups, request.match_info["group"])
        limit = parse_limit(request.query.get("limit"))
    except BlockreplError as exc:
        return _error(exc)
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(mt.executor, group_points_json, mt.store, group, limit)
    return web.json_response(answer)


async def post_group_recover(request: web.Request) -> web.StreamResponse:
    mt = request.app[ADMIN]
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        group = group_of(mt.config.groups, request.match_info["group"])
        body = await _body(request)
        directory, fmt = body.get("output_dir"), body.get("format", "raw")
        if not isinstance(directory, str) or not os.path.isabs(directory):
            raise MalformedError(
                f"expected 'output_dir' to be an absolute path, found {directory!r}"
            )
        if fmt not in ("raw", "vmdk"):
            raise MalformedError(f"expected 'format' raw or vmdk, found {fmt!r}")
        spec = parse_spec(_spec_text(body.get("point")))
        replicas = [mt.replicas[disk] for disk in group.disks]
        with contextlib.ExitStack() as history:
            for replica in replicas:  # before the point is chosen: its undo data must stay
                history.enter_context(replica.keeping_history())
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
    return web.json_response(group_result_json(point, outputs, results, time.monotonic() - started))


async def _recover_members(
    mt: MasterTarget, point: GroupPoint, outputs: dict[str, Path], fmt: OutputFormat
) -> list[RecoverResult]:
    """Each member disk at its own point of the group point, one after the other."""
    results: list[RecoverResult] = []
    try:
        for member in point.members:
            result = await mt.replicas[member.disk_id].recover(member, outputs[member.disk_id], fmt)
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
