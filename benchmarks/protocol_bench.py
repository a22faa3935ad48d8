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
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datagen import synthetic_blocks, tar_blocks
from protocol.batch import BatchDecoder, encode_batch
from protocol.hrl import HrlSealer, SealedHrl, open_hrl
from protocol.keyring import KeyRing
from protocol.records import Record, Write

DISK_BYTES = 64 * 2**30  # random write offsets fall in a 64 GiB disk


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
    zstd_c = zstandard.ZstdCompressor(level=args.level, write_content_size=True)
    aead = AESGCM(os.urandom(32))
    nonce, ad = os.urandom(12), os.urandom(200)

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
        bare.clear()
        for data in joined:
            bare.append(aead.encrypt(nonce, zstd_c.compress(data), ad))

    def limit_decode() -> None:
        d = zstandard.ZstdDecompressor()
        for blob in bare:
            d.decompress(aead.decrypt(nonce, blob, ad))

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
    print(f"data: {result['data_bytes'] / 2**20:.0f} MiB, {result['data_source']}, "
          f"zstd {args.level}, ratio {result['compression_ratio']}:1")  # fmt: skip
    print(f"{'figure':<14}{'MB/s':>10}")
    for key in ("encode", "limit_encode", "decode", "limit_decode", "wire_encode", "wire_decode"):
        print(f"{key:<14}{result[key + '_MBps']:>10}")
    print(f"encode at {result['encode_vs_limit']:.0%} of its limit, "
          f"decode at {result['decode_vs_limit']:.0%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
