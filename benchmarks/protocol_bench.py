#!/usr/bin/env python3
"""Throughput of the protocol formats beside the bare primitives they are built on.

For batches of 64 KiB writes on disk-like data, measures in one run:

- encode: records -> sealed HRL file (record framing, XXH3-128, HKDF per file,
  zstd, AES-256-GCM, header built and parsed back), what the process server
  spends per batch;
- decode: HRL file -> verified records (header checks, HKDF, AES-256-GCM, zstd,
  XXH3-128, record decoding), what the master target spends per file;
- limit_encode / limit_decode: the bare zstd and AES-GCM calls on the same
  data and sizes, with nothing around them: the ceiling for the two above;
- wire_encode / wire_decode: the batch wire format alone (agent -> process server).

:func:`pipeline_limit` adds the bare ``pwrite`` of every write to the two
limits: the per-byte cost of the whole pipeline, which benchmarks/run.py
sets beside what a real deployment reaches.

Each figure is the best of ``--rounds`` rounds, the rounds interleaved so a
noisy neighbour hurts every figure alike. MB/s are 10**6 bytes of write data
per second. Run: ``.venv/bin/python benchmarks/protocol_bench.py [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datagen import synthetic_blocks, tar_blocks
from protocol.batch import BatchDecoder, encode_batch
from protocol.hrl import HrlSealer, SealedHrl, open_hrl
from protocol.keyring import KeyRing
from protocol.records import Record, Write

DISK_BYTES = 64 * 2**30  # random write offsets fall in a 64 GiB disk
#: Size of the file the bare pwrite limit writes into: writes land on random
#: slots of it. Sparse, so only what is written takes room.
PWRITE_FILE_BYTES: Final = 256 * 2**20


class BarePrimitives:
    """The bare calls each byte of the pipeline goes through, nothing around them:
    zstd + AES-256-GCM as the process server seals, AES-256-GCM + zstd as the
    master target verifies. One key and nonce throughout: a measurement, never
    a format."""

    def __init__(self, level: int) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()
        self._aead = AESGCM(os.urandom(32))
        self._nonce, self._ad = os.urandom(12), os.urandom(200)

    def encode(self, data: bytes) -> bytes:
        return self._aead.encrypt(self._nonce, self._compressor.compress(data), self._ad)

    def decode(self, blob: bytes) -> bytes:
        return self._decompressor.decompress(self._aead.decrypt(self._nonce, blob, self._ad))


def joined_batches(blocks: list[bytes], per_batch: int) -> list[bytes]:
    """The data of ``blocks`` cut into batches of ``per_batch``, each batch's data contiguous."""
    return [b"".join(blocks[i : i + per_batch]) for i in range(0, len(blocks), per_batch)]


def limit_encode_mbps(blocks: list[bytes], per_batch: int, rounds: int, level: int = 1) -> float:
    """MB/s of bare zstd + AES-256-GCM over ``blocks`` in batches, the best of ``rounds``."""
    joined = joined_batches(blocks, per_batch)
    bare = BarePrimitives(level)
    best = min(_timed(lambda: [bare.encode(d) for d in joined]) for _ in range(rounds))
    return sum(len(d) for d in joined) / best / 1e6


@dataclass(frozen=True)
class PipelineLimit:
    """One core's MB/s of each bare step, and the pipeline's limit on ``cores``.

    Every byte is sealed (encode), verified (decode) and written (pwrite), so
    one core spends the sum of the three per-byte costs on it; ``cores`` cores
    working on nothing else reach ``limit_MBps``.
    """

    encode_MBps: float
    decode_MBps: float
    pwrite_MBps: float
    cores: int

    @property
    def cpu_s_per_GB(self) -> float:
        return 1e3 / self.encode_MBps + 1e3 / self.decode_MBps + 1e3 / self.pwrite_MBps

    @property
    def limit_MBps(self) -> float:
        return self.cores * 1e3 / self.cpu_s_per_GB


def pipeline_limit(
    blocks: list[bytes], per_batch: int, *, rounds: int, directory: Path, level: int = 1,
    cores: int,
) -> PipelineLimit:  # fmt: skip
    """Measure the bare steps on ``blocks`` cut into batches of ``per_batch`` writes.

    pwrite puts every block on a random slot of a sparse file in ``directory``
    with one fdatasync per batch, the durability each applied file needs (as
    mt_apply_bench.py's limit does). Each step is the best of ``rounds``.
    """
    joined = joined_batches(blocks, per_batch)
    data_bytes = sum(len(d) for d in joined)
    bare = BarePrimitives(level)
    sealed = [bare.encode(d) for d in joined]
    size = len(blocks[0])
    rng = random.Random(len(blocks))
    offsets = [rng.randrange(PWRITE_FILE_BYTES // size) * size for _ in blocks]
    path = directory / f"pipeline-limit-{os.getpid()}.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, PWRITE_FILE_BYTES)

        def pwrite_all() -> None:
            for n, block in enumerate(blocks):
                os.pwrite(fd, block, offsets[n])
                if n % per_batch == per_batch - 1:
                    os.fdatasync(fd)
            os.fdatasync(fd)

        best = dict.fromkeys(("encode", "decode", "pwrite"), float("inf"))
        for _ in range(rounds):  # interleaved, so a noisy neighbour hurts each alike
            best["encode"] = min(best["encode"], _timed(lambda: [bare.encode(d) for d in joined]))
            best["decode"] = min(best["decode"], _timed(lambda: [bare.decode(b) for b in sealed]))
            best["pwrite"] = min(best["pwrite"], _timed(pwrite_all))
    finally:
        os.close(fd)
        path.unlink()
    mbps = {step: data_bytes / seconds / 1e6 for step, seconds in best.items()}
    return PipelineLimit(mbps["encode"], mbps["decode"], mbps["pwrite"], cores)


def _batches(blocks: list[bytes], per_batch: int, seed: int) -> list[list[Record]]:
    rng = random.Random(seed)
    size = len(blocks[0])
    slots = DISK_BYTES // size
    records: list[Record] = [Write(rng.randrange(slots) * size, b) for b in blocks]
    return [records[i : i + per_batch] for i in range(0, len(records), per_batch)]


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, object]:
    count = max(1, args.megabytes * 2**20 // args.block_size)
    if args.tar_of:
        blocks = tar_blocks(Path(args.tar_of), count, args.block_size)
        if not blocks:
            raise SystemExit(f"protocol_bench: no readable files under {args.tar_of}")
        source = f"tar of {args.tar_of}"
    else:
        blocks = synthetic_blocks(count, args.block_size, seed=args.seed)
        source = "synthetic mix (random 27 %, zero 15 %, log text 58 %)"
    batches = _batches(blocks, args.writes_per_batch, args.seed)
    data_bytes = sum(len(b) for b in blocks)
    keyring = KeyRing({1: os.urandom(32)}, 1)
    sealer = HrlSealer(keyring, zstd_level=args.level)
    # The bare calls get the same contiguous batch data the sealer compresses.
    joined = [b"".join(bytes(r.data) for r in batch if isinstance(r, Write)) for batch in batches]
    primitives = BarePrimitives(args.level)

    sealed: list[SealedHrl] = []
    bare: list[bytes] = []

    def encode() -> None:
        sealed.clear()
        for n, batch in enumerate(batches):
            sealed.append(
                sealer.seal_records(
                    batch, disk_id="bench", generation=1, first_seq=1 + n * len(batch),
                    first_capture_ns=n, last_capture_ns=n, receive_ns=n, salt=os.urandom(32),
                )
            )  # fmt: skip

    files: list[bytes] = []

    def decode() -> None:
        if not files:  # a file is read whole from disk: join outside the timing
            files.extend(f.to_bytes() for f in sealed)
        for data in files:
            open_hrl(data, keyring)

    def limit_encode() -> None:
        bare[:] = [primitives.encode(data) for data in joined]

    def limit_decode() -> None:
        for blob in bare:
            primitives.decode(blob)

    wire: list[bytes] = []

    def wire_encode() -> None:
        wire.clear()
        for n, batch in enumerate(batches):
            wire.append(
                encode_batch(
                    disk_id="bench", generation=1, first_seq=1 + n * len(batch), records=batch,
                    first_capture_ns=n, last_capture_ns=n,
                )
            )  # fmt: skip

    def wire_decode() -> None:
        decoder = BatchDecoder(expected_disk_id="bench")
        for body in wire:
            decoder.feed(body)
            for _ in decoder.events():
                pass

    figures: dict[str, Callable[[], None]] = {
        "encode": encode, "limit_encode": limit_encode, "decode": decode,
        "limit_decode": limit_decode, "wire_encode": wire_encode, "wire_decode": wire_decode,
    }  # fmt: skip
    best = dict.fromkeys(figures, float("inf"))
    for _ in range(args.rounds):
        for name, fn in figures.items():
            best[name] = min(best[name], _timed(fn))
    stored = sum(len(f.header_bytes) + len(f.body) for f in sealed)
    result: dict[str, object] = {
        f"{name}_MBps": round(data_bytes / seconds / 1e6, 1) for name, seconds in best.items()
    }
    result.update(
        encode_vs_limit=round(best["limit_encode"] / best["encode"], 3),
        decode_vs_limit=round(best["limit_decode"] / best["decode"], 3),
        compression_ratio=round(data_bytes / stored, 3),
        data_bytes=data_bytes,
        block_bytes=args.block_size,
        writes_per_batch=args.writes_per_batch,
        batches=len(batches),
        zstd_level=args.level,
        rounds=args.rounds,
        data_source=source,
        python=sys.version.split()[0],
        cpu_count=os.cpu_count(),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--megabytes", type=int, default=64, help="MiB of write data (64)")
    parser.add_argument("--block-size", type=int, default=64 * 1024, help="bytes per write")
    parser.add_argument("--writes-per-batch", type=int, default=16, help="writes per batch (16)")
    parser.add_argument("--level", type=int, default=1, help="zstd level (1)")
    parser.add_argument("--rounds", type=int, default=5, help="best of N rounds (5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tar-of", metavar="DIR", help="use a tar of the files under DIR")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    data_bytes = result["data_bytes"]
    assert isinstance(data_bytes, int)
    print(f"data: {data_bytes / 2**20:.0f} MiB, {result['data_source']}, "
          f"zstd {args.level}, ratio {result['compression_ratio']}:1")  # fmt: skip
    print(f"{'figure':<14}{'MB/s':>10}")
    for key in ("encode", "limit_encode", "decode", "limit_decode", "wire_encode", "wire_decode"):
        print(f"{key:<14}{result[key + '_MBps']:>10}")
    print(f"encode at {result['encode_vs_limit']:.0%} of its limit, "
          f"decode at {result['decode_vs_limit']:.0%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
