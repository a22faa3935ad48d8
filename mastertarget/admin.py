"""The master target's admin API: recovery points, recover and failover.

Served on a Unix socket (``admin_socket`` in the config, mode 0600): only
the service user and root can reach it, so it needs no certificates, and it
is never on the network. ``mastertarget points|recover|failover`` use it while
the daemon runs. Specified in docs/api.md, "Admin API".
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from aiohttp import web

from mastertarget.points import RecoveryPoint
from mastertarget.pointspec import format_time_ns, format_window, parse_spec, select_point
from mastertarget.recovery import RecoverResult
from mastertarget.replica import DiskReplica
from mastertarget.server import replica_or_404
from mastertarget.state import StateStore
from protocol.errors import BlockreplError, MalformedError
from protocol.sequencing import StreamPosition

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
    if request.content_length is None or request.content_length > MAX_ADMIN_BODY:
        raise MalformedError(f"expected a JSON body of at most {MAX_ADMIN_BODY} bytes")
    try:
        body = await request.json()
    except ValueError as exc:  # not UTF-8, or not JSON
        raise MalformedError(
            f"expected a JSON object, found bytes that do not parse: {exc}"
        ) from None
    if not isinstance(body, dict):
        raise MalformedError(f"expected a JSON object, found {type(body).__name__}")
    return body


async def _choose(replica: DiskReplica, text: object) -> RecoveryPoint:
    if not isinstance(text, str):
        raise MalformedError(f"expected 'point' to be a SPEC string, found {text!r}")
    spec = parse_spec(text)
    if spec.kind.value == "latest":  # every received change first (lowest RPO)
        try:
            await asyncio.wait_for(replica.wait_applied(replica.received), LATEST_DRAIN_S)
        except TimeoutError:
            raise MalformedError(
                f"'latest' waits for the received files to be applied; disk "
                f"{replica.config.id} is still {replica.received.seq - replica.applied.seq} "
                f"seqs behind after {LATEST_DRAIN_S:.0f} s: use latest-processed"
            ) from None
    applied: StreamPosition = replica.applied
    return select_point(spec, replica.points(), processed_seq=(applied.generation, applied.seq))


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


def build_admin_app(mt: MasterTarget) -> web.Application:
    app = web.Application(client_max_size=MAX_ADMIN_BODY)
    app[ADMIN] = mt
    app.router.add_get("/v1/disks/{disk}/points", get_points)
    app.router.add_post("/v1/disks/{disk}/recover", post_recover)
    app.router.add_post("/v1/disks/{disk}/failover", post_failover)
    return app
