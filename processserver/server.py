"""The process server's data API on aiohttp: routes, authorisation, answers.

Specified in docs/api.md. Every request comes over mutual TLS 1.3; the
middleware names the machine from its client certificate and refuses (403)
a request for a disk the config does not give that machine, before a handler
runs: no byte of its body is read (DESIGN.md invariant 7).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web

from processserver.stream import DiskStream, Verdict
from protocol.api import (
    MAX_ANSWER_BYTES,
    AckedPosition,
    BatchesAnswer,
    ErrorBody,
    GenerationAnswer,
    GenerationRequest,
    PsDiskState,
    StaleGeneration,
    refusal_of,
)
from protocol.batch import BatchDecoder
from protocol.errors import BlockreplError, MalformedError, ProtocolError
from protocol.sequencing import Fit
from runtime.answers import read_answer
from runtime.bodies import body_pieces, small_body
from runtime.errors import BodyTimeoutError, DurabilityError, PeerIdentityError
from runtime.tls import connection_identity

if TYPE_CHECKING:
    from processserver.daemon import ProcessServer

log = logging.getLogger("blockrepl.processserver.api")

PS: Final = web.AppKey["ProcessServer"]("processserver")
#: Bytes of the master target's checksum answer passed on per write.
READ_CHUNK: Final = 256 * 1024
#: Seconds an agent is asked to wait when the cache is full or a write
#: failed: long enough for the shipper to drain some files.
RETRY_AFTER_S: Final = 5
#: A generation request is a small JSON object.
MAX_SMALL_BODY: Final = 4096
#: Longest a state request may wait for the shipped position to move
#: (``?shipped=N&wait_s=S``): well below the agents' read timeout and a
#: graceful stop's grace, so neither ever cuts a waiting answer.
MAX_STATE_WAIT_S: Final = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str, **details: object) -> web.Response:
    response = web.json_response(ErrorBody(code, message, details).to_json(), status=status)
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _from_exception(exc: BlockreplError) -> web.Response:
    response = _error(exc.http_status, exc.code, exc.message, **exc.details)
    if isinstance(exc, BodyTimeoutError):
        response.force_close()  # the rest of the body is not read: the connection is spent
    return response


@web.middleware
async def authorise(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a machine asking about a disk that is not its own."""
    ps = request.app[PS]
    disk_id = request.match_info.get("disk", "")
    machine: str | None = None
    reason = "no TLS connection"
    try:
        if request.transport is not None:
            machine = connection_identity(request.transport.get_extra_info("ssl_object"))
    except PeerIdentityError as exc:
        reason = exc.message
    owner = ps.config.owner(disk_id)
    if machine is None or owner != machine:
        if machine is not None:
            reason = f"machine {machine!r} may not write disk {disk_id!r}"
        ps.metrics.rejects.labels("forbidden").inc()
        refusal = _error(403, "forbidden", reason)
        refusal.force_close()  # the body stays unread: the connection cannot be reused
        return refusal
    return await handler(request)


def _disk(request: web.Request) -> DiskStream:
    return request.app[PS].disks[request.match_info["disk"]]


def _position(disk: DiskStream) -> AckedPosition:
    acked = disk.position.acked
    return AckedPosition(disk.disk_id, acked.generation, acked.seq)


def _answer(disk: DiskStream, verdict: Verdict | None) -> web.Response:
    refusal = None
    if verdict is not None and verdict.admission.fit not in (Fit.NEXT, Fit.DUPLICATE):
        refusal = refusal_of(verdict.admission)
    answer = BatchesAnswer(_position(disk), refusal)
    return web.json_response(answer.to_json(), status=answer.status)


async def post_batches(request: web.Request) -> web.StreamResponse:
    """POST /v1/disks/{disk}/batches: batches in, acknowledged once durable."""
    ps = request.app[PS]
    disk = _disk(request)
    if ps.cache.full:
        ps.metrics.rejects.labels("cache-full").inc()
        return _error(
            503, "cache-full",
            f"the cache holds {ps.cache.bytes} bytes, over its high mark of "
            f"{ps.cache.high_bytes}; batches are taken again below {ps.cache.low_bytes}",
        )  # fmt: skip
    started = time.monotonic()
    decoder = BatchDecoder(expected_disk_id=disk.disk_id)
    verdict: Verdict | None = None
    try:
        async with disk.request_lock:
            pieces = body_pieces(request.content, timeout_s=ps.config.connections.body_timeout_s)
            eof = False
            while not eof:
                chunk = await anext(pieces, b"")
                if chunk:
                    decoder.feed(chunk)
                else:
                    decoder.feed_eof()
                    eof = True
                for batch in decoder.events():
                    verdict = await disk.take(batch)
                    # Nothing of ours waits to be shipped: the master target
                    # may hold the stream further than we do.
                    if (
                        verdict.admission.fit is Fit.GAP
                        and not disk.cached
                        and await ps.follow_master_target(disk)
                    ):
                        verdict = await disk.take(batch)
                    ps.metrics.count_batch(disk.disk_id, batch, verdict.admission.fit)
                    if verdict.admission.fit not in (Fit.NEXT, Fit.DUPLICATE):
                        return _answer(disk, verdict)
    except BlockreplError as exc:
        ps.metrics.rejects.labels(exc.code).inc()
        if isinstance(exc, DurabilityError):
            log.error("disk %s: cannot cache a batch: %s", disk.disk_id, exc.message)
        return _from_exception(exc)
    if decoder.batches == 0:
        return _error(400, "malformed", "the body held no batch")
    ps.metrics.ack_seconds.observe(time.monotonic() - started)
    return _answer(disk, verdict)


async def get_state(request: web.Request) -> web.StreamResponse:
    """GET /v1/disks/{disk}/state[?shipped=N&wait_s=S]: with ``shipped``, the
    answer waits (``wait_s`` at most) until the master target holds seq N of
    the current generation, so an agent hears it at once instead of polling."""
    disk = _disk(request)
    if "shipped" in request.query:
        try:
            seq = _query_number(request, "shipped", int, 0, 2**63 - 1)
            wait_s = (
                _query_number(request, "wait_s", float, 0.0, MAX_STATE_WAIT_S)
                if "wait_s" in request.query
                else 0.0
            )
        except MalformedError as exc:
            return _from_exception(exc)
        await disk.wait_shipped(int(seq), wait_s)
    position = disk.position
    state = PsDiskState(
        disk.disk_id, position.acked.generation, position.acked.seq, position.shipped_seq,
        disk.backlog_bytes, disk.backlog_age_s(), position.resync_required,
    )  # fmt: skip
    return web.json_response(state.to_json())


def _query_number(
    request: web.Request, name: str, kind: type[int] | type[float], low: float, high: float
) -> float:
    """A query parameter as ``kind`` within ``low..high``."""
    text = request.query.get(name, "")
    try:
        value = kind(text)
    except ValueError:
        raise MalformedError(
            f"query parameter {name} must be a {kind.__name__} in {low:g}..{high:g}, found {text!r}"
        ) from None
    if math.isnan(value) or not low <= value <= high:
        raise MalformedError(f"query parameter {name} must be in {low:g}..{high:g}, found {text!r}")
    return value


async def post_generation(request: web.Request) -> web.StreamResponse:
    """POST /v1/disks/{disk}/generation {"generation": N}: start a newer generation."""
    ps = request.app[PS]
    disk = _disk(request)
    try:
        raw = await small_body(
            request, max_bytes=MAX_SMALL_BODY, timeout_s=ps.config.connections.body_timeout_s
        )
        generation = GenerationRequest.parse_bytes(raw).generation
        async with disk.request_lock:
            current = disk.position.acked.generation
            if generation <= current:
                refusal = StaleGeneration(
                    current,
                    f"a new generation must be above the current {current}, found {generation}",
                )
                return web.json_response(GenerationAnswer(refusal).to_json(), status=409)
            await disk.start_generation(generation)
    except BlockreplError as exc:
        return _from_exception(exc)
    return web.json_response(GenerationAnswer(_position(disk)).to_json())


#: Headers of the master target's checksum answer that the agent needs.
PASSED_HEADERS: Final = (
    "Content-Type", "Content-Length", "X-Blockrepl-Chunk", "X-Blockrepl-Applied-Generation",
    "X-Blockrepl-Applied-Seq",
)  # fmt: skip


async def get_checksums(request: web.Request) -> web.StreamResponse:
    """GET /v1/disks/{disk}/checksums: the master target's answer, streamed through.

    A protected machine reaches only its process server (as in the seeds);
    the resync compares its disk with the target through here.
    """
    ps = request.app[PS]
    disk = _disk(request)
    shipper = ps.shipper
    url = f"{shipper.base_url}/v1/disks/{disk.disk_id}/checksums?{request.query_string}"
    response: web.StreamResponse | None = None
    try:
        async with shipper.session.get(url) as upstream:
            if upstream.status != 200:
                return await _refusal_passed_on(ps, upstream)
            response = web.StreamResponse(
                headers={h: upstream.headers[h] for h in PASSED_HEADERS if h in upstream.headers}
            )
            await response.prepare(request)
            async for piece in upstream.content.iter_chunked(READ_CHUNK):
                await response.write(piece)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, OSError) as exc:
        ps.metrics.rejects.labels("master-target-unreachable").inc()
        if response is not None and request.transport is not None:
            # The status and part of the digests went out: an error answer now
            # would land inside the body, and the agent would wait for the rest
            # until its read timeout. A cut connection tells it the answer is short.
            request.transport.close()
            return response
        return _error(
            503, "master-target-unreachable",
            f"the master target at {shipper.base_url} did not answer: {exc}",
        )  # fmt: skip


async def _refusal_passed_on(ps: ProcessServer, upstream: aiohttp.ClientResponse) -> web.Response:
    """The master target's refusal of a checksum request, as it gave it; one
    that breaks docs/api.md (or is longer than an answer may be) is counted
    and answered 503, as if the master target had not answered."""
    try:
        raw = await read_answer(upstream.content, max_bytes=MAX_ANSWER_BYTES,
                                what="the master target's refusal")  # fmt: skip
        refusal = ErrorBody.parse_bytes(raw)
    except ProtocolError as exc:
        ps.metrics.malformed_answers.labels("checksums").inc()
        ps.metrics.rejects.labels("master-target-unreachable").inc()
        log.warning("the master target answered a checksum request with %d and a body that "
                    "breaks docs/api.md: %s", upstream.status, exc.message)  # fmt: skip
        return _error(
            503, "master-target-unreachable",
            f"the master target at {ps.shipper.base_url} answered {upstream.status} with a "
            f"body that breaks docs/api.md: {exc.message}",
        )  # fmt: skip
    return web.json_response(refusal.to_json(), status=upstream.status)


def build_app(ps: ProcessServer) -> web.Application:
    """The data API application of one process server."""
    app = web.Application(
        middlewares=[authorise],
        client_max_size=MAX_SMALL_BODY,
    )
    app[PS] = ps
    app.router.add_post("/v1/disks/{disk}/batches", post_batches)
    app.router.add_get("/v1/disks/{disk}/state", get_state)
    app.router.add_post("/v1/disks/{disk}/generation", post_generation)
    app.router.add_get("/v1/disks/{disk}/checksums", get_checksums)
    return app
