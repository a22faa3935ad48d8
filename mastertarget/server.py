"""The master target's data API on aiohttp: routes, authorisation, answers.

Specified in docs/api.md. Every request comes over mutual TLS 1.3; the
middleware names the client from its certificate and refuses (403) anyone the
config does not list as a process server before a handler runs, so no byte of
an unauthorised body is read, let alone decoded (docs/design.md invariant 7).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Final

import xxhash
from aiohttp import web

from mastertarget.app_state import CONFIG, EXECUTOR, KEYRING, METRICS, REPLICAS, replica_or_404
from mastertarget.config import MAX_HRL_FILE_BYTES, MasterTargetConfig
from mastertarget.guarded_target import GuardedTarget
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.replica import DiskReplica
from mastertarget.state import DiskState
from protocol.api import (
    DiskList,
    DiskSummary,
    FailedOver,
    HrlAnswer,
    MtDiskState,
    ReceivedPosition,
    refusal_of,
)
from protocol.batch import NEED_DATA
from protocol.errors import BlockreplError, LimitExceededError, MalformedError, TruncatedError
from protocol.hrl import HrlHeader
from protocol.hrl_receiver import FileReceived, HeaderReady, HrlReceiver
from protocol.keyring import KeyRing
from protocol.limits import MAX_HRL_RUN_BYTES, GiB, MiB
from protocol.sequencing import Fit
from runtime.apiserver import (
    caller,
    decimal,
    error_answer,
    exception_answer,
    forbidden,
    query_int,
)
from runtime.bodies import feed_body
from runtime.errors import DurabilityError

log = logging.getLogger("blockrepl.mastertarget.api")

#: Checksum chunks: at least a page, at most a region the resync compares at
#: its top level.
MIN_CHECKSUM_CHUNK: Final = 4096
MAX_CHECKSUM_CHUNK: Final = GiB
#: Most digests in one answer (16 MiB of them): a client asks again for more.
MAX_CHECKSUM_CHUNKS: Final = 1 << 20
#: Bytes hashed per executor call: holds the disk lock for a bounded time.
CHECKSUM_READ_BYTES: Final = 64 * MiB
#: Bytes read from the target at a time while hashing. Chunks smaller than
#: this are hashed several to a read: one read per 64 KiB chunk spent a
#: quarter of the time in the calls around it; a read of 1 MiB still stays in
#: the CPU's cache while its chunks are hashed. Larger chunks are fed to
#: their digest a piece at a time.
CHECKSUM_PIECE_BYTES: Final = MiB
DIGEST_BYTES: Final = 16

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def authorise(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse any client the config does not list as a process server; count answers."""
    metrics = request.app[METRICS]
    identity, reason = caller(request)
    if identity is None or identity not in request.app[CONFIG]().process_servers:
        reason = reason if identity is None else f"machine {identity!r} is not a process server"
        metrics.errors.labels("forbidden").inc()
        return forbidden(f"{reason}; allowed: the configured process servers")
    response: web.StreamResponse = await handler(request)
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    metrics.requests.labels(name, str(response.status)).inc()
    return response


def _position(replica: DiskReplica) -> ReceivedPosition:
    received, applied = replica.received, replica.applied
    return ReceivedPosition(
        replica.config.id, received.generation, received.seq, applied.generation, applied.seq
    )


def _answer(answer: HrlAnswer) -> web.Response:
    return web.json_response(answer.to_json(), status=answer.status)


async def put_hrl(request: web.Request) -> web.StreamResponse:
    """PUT /v1/disks/{disk}/hrl/{generation}/{seq}: store one HRL file, or a run of
    the disk's consecutive files from that one on, durably and in order."""
    metrics = request.app[METRICS]
    replica = replica_or_404(request)
    receiver = replica.receiver
    try:
        generation = decimal(request.match_info["generation"], "generation in the URL")
        seq = decimal(request.match_info["seq"], "seq in the URL")
        if replica.state is DiskState.FAILED_OVER:
            refusal = FailedOver(
                f"disk {replica.config.id} was failed over: it takes no more replication "
                "data until it is protected again"
            )
            return _answer(HrlAnswer(None, refusal))
        if request.content_length is not None and request.content_length > MAX_HRL_RUN_BYTES:
            raise LimitExceededError(
                f"a PUT of HRL files may hold at most {MAX_HRL_RUN_BYTES} bytes, found "
                f"Content-Length {request.content_length}",
                details={"max_file_bytes": MAX_HRL_FILE_BYTES},
            )
        # The whole body first, without the disk's lock: a sender that stalls
        # mid-body (a dead process server, a black-holed link) must not keep
        # another from storing the disk's files meanwhile.
        with receiver.puts.opened():
            files = await _files(request, replica, generation, seq)
            async with receiver.put_lock:
                for stored, (header, data) in enumerate(files):
                    quota = request.app[CONFIG]().inbox_quota_bytes
                    if receiver.inbox_bytes() + len(data) > quota:
                        if stored:  # what came before is held: the answer says up to where
                            break
                        metrics.errors.labels("inbox-full").inc()
                        return error_answer(
                            503,
                            "inbox-full",
                            f"disk {replica.config.id} has {receiver.inbox_bytes()} bytes "
                            f"waiting to be applied, the quota is {quota}",
                        )
                    verdict = await receiver.store(header, data)
                    # A run that came ahead of its turn (a process server with
                    # several PUTs of the disk in flight): wait for the one ahead.
                    while verdict.fit is Fit.GAP and await receiver.puts.wait_for_earlier():
                        verdict = await receiver.store(header, data)
                    if verdict.fit is Fit.DUPLICATE:
                        metrics.duplicates.labels(replica.config.id).inc()
                    elif verdict.fit is not Fit.NEXT:
                        return _answer(HrlAnswer(_position(replica), refusal_of(verdict)))
    except BlockreplError as exc:
        metrics.errors.labels(exc.code).inc()
        if isinstance(exc, DurabilityError):
            log.error("disk %s: cannot store a received file: %s", replica.config.id, exc.message)
        return exception_answer(exc)
    return _answer(HrlAnswer(_position(replica)))


async def _files(
    request: web.Request, replica: DiskReplica, generation: int, seq: int
) -> list[tuple[HrlHeader, bytes]]:
    """The body's files, each header checked as soon as it is in: the first against
    the URL, each next against the one before; :data:`MAX_HRL_RUN_BYTES` in all.

    Raises:
        ProtocolError: the body breaks docs/api.md; nothing of it is stored.
    """
    receiver = HrlReceiver(max_file_len=MAX_HRL_FILE_BYTES, run=True)
    keyring = request.app[KEYRING]
    timeout_s = request.app[CONFIG]().connections.body_timeout_s
    expected = (generation, seq)
    files: list[tuple[HrlHeader, bytes]] = []
    declared = 0
    async for _ in feed_body(request.content, receiver, timeout_s=timeout_s):
        while (event := receiver.next_event()) is not NEED_DATA:
            if isinstance(event, HeaderReady):
                header = event.header
                _check_header(header, replica.config.id, *expected)
                keyring.data_key(header.key_id)  # unknown key: refuse before storing
                declared += header.file_len
                if declared > MAX_HRL_RUN_BYTES:
                    raise LimitExceededError(
                        f"a PUT of HRL files may hold at most {MAX_HRL_RUN_BYTES} bytes, its "
                        f"files' headers declare {declared} so far",
                        details={"max_file_bytes": MAX_HRL_FILE_BYTES},
                    )
                expected = (header.generation, header.last_seq + 1)
            elif isinstance(event, FileReceived):
                files.append((event.header, event.data))
            else:
                return files
    raise TruncatedError("the request body ended before a whole HRL file arrived")


def _check_header(header: HrlHeader, disk_id: str, generation: int, seq: int) -> None:
    found = (header.disk_id, header.generation, header.first_seq)
    if found != (disk_id, generation, seq):
        raise MalformedError(
            f"the HRL header must match the URL, and each next file of a run must follow "
            f"the one before: expected disk {disk_id}, generation {generation}, first seq "
            f"{seq}; found disk {found[0]}, generation {found[1]}, first seq {found[2]}",
        )


async def get_state(request: web.Request) -> web.StreamResponse:
    """GET /v1/disks/{disk}/state."""
    status = replica_or_404(request).status()
    received, applied = status.received, status.applied
    state = MtDiskState(
        ReceivedPosition(
            status.disk_id, received.generation, received.seq, applied.generation, applied.seq
        ),
        status.target_size,
        status.state.value,
        status.resync_open,
        status.last_error,
        status.inbox_files,
        status.inbox_bytes,
    )
    return web.json_response(state.to_json())


async def get_disks(request: web.Request) -> web.StreamResponse:
    """GET /v1/disks: every disk replicated here, with its state."""
    disks = DiskList(
        tuple(
            DiskSummary(r.config.id, r.state.value, r.applied.seq)
            for r in request.app[REPLICAS].values()
        )
    )
    return web.json_response(disks.to_json())


async def get_checksums(request: web.Request) -> web.StreamResponse:
    """GET /v1/disks/{disk}/checksums?offset=&length=&chunk=: XXH3-128 per chunk, streamed."""
    replica = replica_or_404(request)
    try:
        offset = query_int(request, "offset", 0)
        length = query_int(request, "length", max(0, replica.target.size - offset))
        chunk = query_int(request, "chunk")
        _check_checksum_range(offset, length, chunk, replica.target.size)
    except BlockreplError as exc:
        return exception_answer(exc)
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(-(-length // chunk) * DIGEST_BYTES),
            "X-Blockrepl-Chunk": str(chunk),
            "X-Blockrepl-Applied-Generation": str(replica.applied.generation),
            "X-Blockrepl-Applied-Seq": str(replica.applied.seq),
        }
    )
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    position, end = offset, offset + length
    per_call = max(1, CHECKSUM_READ_BYTES // chunk)
    while position < end:
        starts = list(range(position, min(end, position + per_call * chunk), chunk))
        digests = await loop.run_in_executor(
            request.app[EXECUTOR], _hash_chunks, replica.target, starts, chunk, end
        )
        await response.write(digests)
        position = starts[-1] + chunk
    await response.write_eof()
    return response


def _check_checksum_range(offset: int, length: int, chunk: int, size: int) -> None:
    if not MIN_CHECKSUM_CHUNK <= chunk <= MAX_CHECKSUM_CHUNK:
        raise MalformedError(
            f"chunk must be {MIN_CHECKSUM_CHUNK}..{MAX_CHECKSUM_CHUNK} bytes, found {chunk}"
        )
    if length < 1 or offset + length > size:
        raise MalformedError(
            f"the range must lie inside the {size}-byte target, found offset={offset} "
            f"length={length}"
        )
    if -(-length // chunk) > MAX_CHECKSUM_CHUNKS:
        raise MalformedError(
            f"at most {MAX_CHECKSUM_CHUNKS} chunks per request, found {-(-length // chunk)}: "
            "ask for a shorter range or larger chunks"
        )


def _hash_chunks(target: GuardedTarget, starts: list[int], chunk: int, end: int) -> bytes:
    """The digests of the consecutive chunks at ``starts``; the last ends at ``end`` at most.

    The target is read into one reused buffer: a fresh buffer per read
    costs more than the hashing (docs/performance.md, resync).
    """
    out = bytearray()
    buffer = memoryview(bytearray(CHECKSUM_PIECE_BYTES))
    with target.hold() as disk:  # a whole group applied, or none of it
        if chunk >= CHECKSUM_PIECE_BYTES:
            for start in starts:
                digest = xxhash.xxh3_128()
                stop = min(start + chunk, end)
                for piece in range(start, stop, CHECKSUM_PIECE_BYTES):
                    view = buffer[: min(CHECKSUM_PIECE_BYTES, stop - piece)]
                    disk.read_into(piece, view)
                    digest.update(view)
                out += digest.digest()
            return bytes(out)
        # Small chunks: several whole chunks per read, each hashed from it.
        per_piece = CHECKSUM_PIECE_BYTES // chunk * chunk
        stop = min(starts[-1] + chunk, end)
        for base in range(starts[0], stop, per_piece):
            view = buffer[: min(per_piece, stop - base)]
            disk.read_into(base, view)
            for at in range(0, len(view), chunk):
                out += xxhash.xxh3_128_digest(view[at : at + chunk])
    return bytes(out)


def build_app(
    *,
    replicas: Mapping[str, DiskReplica],
    config: Callable[[], MasterTargetConfig],
    metrics: MasterTargetMetrics,
    keyring: KeyRing,
    executor: Executor,
) -> web.Application:
    """The data API application over ``replicas``.

    Args:
        config: returns the running config (process servers, inbox quota, timeouts).
        keyring: refuses a file sealed under an unknown key before it is stored.
        executor: hashes the targets for checksums.
    """
    app = web.Application(
        middlewares=[authorise],
        client_max_size=1024,
    )
    app[REPLICAS] = replicas
    app[CONFIG] = config
    app[METRICS] = metrics
    app[KEYRING] = keyring
    app[EXECUTOR] = executor
    app.router.add_put(r"/v1/disks/{disk}/hrl/{generation}/{seq}", put_hrl)
    app.router.add_get("/v1/disks", get_disks)
    app.router.add_get("/v1/disks/{disk}/state", get_state)
    app.router.add_get("/v1/disks/{disk}/checksums", get_checksums)
    return app
