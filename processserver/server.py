"""The process server's data API on aiohttp: routes, authorisation, answers.

Specified in docs/api.md. Every request comes over mutual TLS 1.3; the
middleware names the machine from its client certificate and refuses (403)
a request for a disk the config does not give that machine, before a handler
runs: no byte of its body is read (docs/design.md invariant 7).

The handlers get what they use through the application's typed keys
(:func:`build_app`): the disks' streams, who owns which disk, the
connection timeouts, the metrics, the cache and the client of the master
target; nothing else of the daemon.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import aiohttp
from aiohttp import web

from processserver.cache import Cache
from processserver.master_target_client import POSITION_TIMEOUT_S, MasterTargetClient
from processserver.metrics import ProcessServerMetrics
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
from protocol.batch import Batch, BatchDecoder
from protocol.errors import BlockreplError, MalformedError, ProtocolError
from protocol.sequencing import Fit
from runtime.answers import read_answer
from runtime.apiserver import (
    caller,
    error_answer,
    exception_answer,
    forbidden,
    query_flag,
    query_int,
    query_seconds,
)
from runtime.bodies import feed_body, small_body
from runtime.config import ConnectionTimeouts
from runtime.errors import DurabilityError

log = logging.getLogger("blockrepl.processserver.api")

#: Each disk's stream, by disk id.
STREAMS: Final = web.AppKey[Mapping[str, DiskStream]]("streams")
#: The machine that may write each disk, by disk id.
OWNERS: Final = web.AppKey[Mapping[str, str]]("owners")
CONNECTIONS: Final = web.AppKey("connections", ConnectionTimeouts)
METRICS: Final = web.AppKey("metrics", ProcessServerMetrics)
CACHE: Final = web.AppKey("cache", Cache)
#: The process server's client of the master target: the checksum
#: pass-through and the master target's position at a gap or a resume.
MASTER_TARGET: Final = web.AppKey("master_target", MasterTargetClient)
#: Seconds a resumed stream's first request waits for the master target's
#: position. A master target that does not answer by then is taken as away:
#: the batches are cached as always (the process server's job while it is
#: away), at the small risk docs/api.md describes under ``resume``.
RESUME_POSITION_TIMEOUT_S: Final = 2.0
#: Bytes of the master target's checksum answer passed on per write.
READ_CHUNK: Final = 256 * 1024
#: A generation request is a small JSON object.
MAX_SMALL_BODY: Final = 4096
#: Longest a state request may wait for the shipped position to move
#: (``?shipped=N&wait_s=S``): well below the agents' read timeout and a
#: graceful stop's grace, so neither ever cuts a waiting answer.
MAX_STATE_WAIT_S: Final = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def authorise(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a machine asking about a disk that is not its own."""
    disk_id = request.match_info.get("disk", "")
    machine, reason = caller(request)
    if machine is None or request.app[OWNERS].get(disk_id) != machine:
        if machine is not None:
            reason = f"machine {machine!r} may not write disk {disk_id!r}"
        request.app[METRICS].rejects.labels("forbidden").inc()
        return forbidden(reason)
    return await handler(request)


def _stream(request: web.Request) -> DiskStream:
    return request.app[STREAMS][request.match_info["disk"]]


def _position(stream: DiskStream) -> AckedPosition:
    acked = stream.position.acked
    return AckedPosition(stream.disk_id, acked.generation, acked.seq)


def _answer(stream: DiskStream, verdict: Verdict | None) -> web.Response:
    refusal = None
    if verdict is not None and verdict.admission.fit not in (Fit.NEXT, Fit.DUPLICATE):
        refusal = refusal_of(verdict.admission)
    answer = BatchesAnswer(_position(stream), refusal)
    return web.json_response(answer.to_json(), status=answer.status)


async def post_batches(request: web.Request) -> web.StreamResponse:
    """POST /v1/disks/{disk}/batches[?resume=1]: batches in, acknowledged once durable."""
    metrics, cache = request.app[METRICS], request.app[CACHE]
    stream = _stream(request)
    try:
        resume = query_flag(request, "resume")
    except MalformedError as exc:
        return exception_answer(exc)
    if cache.full:
        metrics.rejects.labels("cache-full").inc()
        return error_answer(
            503,
            "cache-full",
            f"the cache holds {cache.bytes} bytes, over its high mark of "
            f"{cache.high_bytes}; batches are taken again below {cache.low_bytes}",
        )
    started = time.monotonic()
    decoder = BatchDecoder(expected_disk_id=stream.disk_id)
    verdict: Verdict | None = None
    body_timeout_s = request.app[CONNECTIONS].body_timeout_s
    try:
        with stream.requests.opened():
            async with stream.request_lock:
                if resume and not stream.cached:
                    await _follow(request.app[MASTER_TARGET], stream, RESUME_POSITION_TIMEOUT_S)
                async for _ in feed_body(request.content, decoder, timeout_s=body_timeout_s):
                    for batch in decoder.events():
                        verdict = await _take(request.app[MASTER_TARGET], stream, batch)
                        metrics.count_batch(stream.disk_id, batch, verdict.admission.fit)
                        if verdict.admission.fit not in (Fit.NEXT, Fit.DUPLICATE):
                            return _answer(stream, verdict)
    except BlockreplError as exc:
        metrics.rejects.labels(exc.code).inc()
        if isinstance(exc, DurabilityError):
            log.error("disk %s: cannot cache a batch: %s", stream.disk_id, exc.message)
        return exception_answer(exc)
    if decoder.batches == 0:
        return error_answer(400, "malformed", "the body held no batch")
    metrics.ack_seconds.observe(time.monotonic() - started)
    return _answer(stream, verdict)


async def _take(master_target: MasterTargetClient, stream: DiskStream, batch: Batch) -> Verdict:
    """Place one batch; the caller holds the stream's request lock.

    A batch that leaves a gap while another request of the disk is open may
    have come ahead of its turn (an agent with several requests in flight,
    runtime/inorder.py): it waits for the request ahead of it and is placed
    again, as long as the stream moves.

    A batch that leaves a gap while nothing of the disk waits in the cache:
    the agent may have moved here from another process server (which died
    with files in its cache, say) and sends again from what the master
    target holds. If the master target's stream is further than this one,
    the stream takes its position and the batch is placed again; the master
    target's seq order keeps the stream exact.
    """
    verdict = await stream.take(batch)
    while verdict.admission.fit is Fit.GAP and await stream.requests.wait_for_earlier():
        verdict = await stream.take(batch)
    if verdict.admission.fit is Fit.NEXT:
        stream.requests.moved()
    if (
        verdict.admission.fit is Fit.GAP
        and not stream.cached
        and await _follow(master_target, stream)
    ):
        verdict = await stream.take(batch)
        if verdict.admission.fit is Fit.NEXT:
            stream.requests.moved()
    return verdict


async def _follow(
    master_target: MasterTargetClient, stream: DiskStream, timeout_s: float = POSITION_TIMEOUT_S
) -> bool:
    """Take the master target's position of the disk if it is past this one; the
    caller holds the stream's request lock and saw nothing cached. False when the
    master target did not answer within ``timeout_s`` or holds no more than this
    process server."""
    there = await master_target.received_position(stream.disk_id, timeout_s=timeout_s)
    return there is not None and await stream.follow(there)


async def get_state(request: web.Request) -> web.StreamResponse:
    """GET /v1/disks/{disk}/state[?shipped=N&wait_s=S]: with ``shipped``, the
    answer waits (``wait_s`` at most) until the master target holds seq N of
    the current generation, so an agent hears it at once instead of polling."""
    stream = _stream(request)
    if "shipped" in request.query:
        try:
            seq = query_int(request, "shipped")
            wait_s = query_seconds(request, "wait_s", MAX_STATE_WAIT_S)
        except MalformedError as exc:
            return exception_answer(exc)
        await stream.wait_shipped(seq, wait_s)
    position = stream.position
    state = PsDiskState(
        stream.disk_id,
        position.acked.generation,
        position.acked.seq,
        position.shipped_seq,
        stream.backlog_bytes,
        stream.backlog_age_s(),
        position.resync_required,
    )
    return web.json_response(state.to_json())


async def post_generation(request: web.Request) -> web.StreamResponse:
    """POST /v1/disks/{disk}/generation {"generation": N}: start a newer generation."""
    stream = _stream(request)
    try:
        raw = await small_body(
            request, max_bytes=MAX_SMALL_BODY, timeout_s=request.app[CONNECTIONS].body_timeout_s
        )
        generation = GenerationRequest.parse_bytes(raw).generation
        async with stream.request_lock:
            current = stream.position.acked.generation
            if generation <= current:
                refusal = StaleGeneration(
                    current,
                    f"a new generation must be above the current {current}, found {generation}",
                )
                return web.json_response(GenerationAnswer(refusal).to_json(), status=409)
            await stream.start_generation(generation)
    except BlockreplError as exc:
        return exception_answer(exc)
    return web.json_response(GenerationAnswer(_position(stream)).to_json())


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
    master_target = request.app[MASTER_TARGET]
    stream = _stream(request)
    url = f"{master_target.base_url}/v1/disks/{stream.disk_id}/checksums?{request.query_string}"
    response: web.StreamResponse | None = None
    try:
        async with master_target.session.get(url) as upstream:
            if upstream.status != 200:
                return await _refusal_passed_on(request.app, upstream)
            response = web.StreamResponse(
                headers={h: upstream.headers[h] for h in PASSED_HEADERS if h in upstream.headers}
            )
            await response.prepare(request)
            async for piece in upstream.content.iter_chunked(READ_CHUNK):
                await response.write(piece)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, OSError) as exc:
        request.app[METRICS].rejects.labels("master-target-unreachable").inc()
        if response is not None and request.transport is not None:
            # The status and part of the digests went out: an error answer now
            # would land inside the body, and the agent would wait for the rest
            # until its read timeout. A cut connection tells it the answer is short.
            request.transport.close()
            return response
        return error_answer(
            503,
            "master-target-unreachable",
            f"the master target at {master_target.base_url} did not answer: {exc}",
        )


async def _refusal_passed_on(
    app: web.Application, upstream: aiohttp.ClientResponse
) -> web.Response:
    """The master target's refusal of a checksum request, as it gave it; one
    that breaks docs/api.md (or is longer than an answer may be) is counted
    and answered 503, as if the master target had not answered."""
    try:
        raw = await read_answer(
            upstream.content, max_bytes=MAX_ANSWER_BYTES, what="the master target's refusal"
        )
        refusal = ErrorBody.parse_bytes(raw)
    except ProtocolError as exc:
        app[METRICS].malformed_answers.labels("checksums").inc()
        app[METRICS].rejects.labels("master-target-unreachable").inc()
        log.warning(
            "the master target answered a checksum request with %d and a body that "
            "breaks docs/api.md: %s",
            upstream.status,
            exc.message,
        )
        return error_answer(
            503,
            "master-target-unreachable",
            f"the master target at {app[MASTER_TARGET].base_url} answered {upstream.status} with a "
            f"body that breaks docs/api.md: {exc.message}",
        )
    return web.json_response(refusal.to_json(), status=upstream.status)


def build_app(
    *,
    streams: Mapping[str, DiskStream],
    owners: Mapping[str, str],
    connections: ConnectionTimeouts,
    metrics: ProcessServerMetrics,
    cache: Cache,
    master_target: MasterTargetClient,
) -> web.Application:
    """The data API application of one process server.

    Args:
        streams: each disk's stream, by disk id.
        owners: the machine that may write each disk, by disk id.
        connections: how long a body may stall.
        metrics: the process server's series.
        cache: whose fill level refuses batches (503 ``cache-full``).
        master_target: for the checksum pass-through and the master
            target's position at a gap.
    """
    app = web.Application(
        middlewares=[authorise],
        client_max_size=MAX_SMALL_BODY,
    )
    app[STREAMS] = streams
    app[OWNERS] = owners
    app[CONNECTIONS] = connections
    app[METRICS] = metrics
    app[CACHE] = cache
    app[MASTER_TARGET] = master_target
    app.router.add_post("/v1/disks/{disk}/batches", post_batches)
    app.router.add_get("/v1/disks/{disk}/state", get_state)
    app.router.add_post("/v1/disks/{disk}/generation", post_generation)
    app.router.add_get("/v1/disks/{disk}/checksums", get_checksums)
    return app
