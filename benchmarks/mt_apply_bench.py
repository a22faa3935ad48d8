#!/usr/bin/env python3
"""Apply throughput of the master target beside the bare pipeline limit.

For HRL files of 64 KiB random writes (disk-like data from benchmarks/datagen.py),
in one run and per back-end:

- apply: the master target's applier, for real (``raw_with_journal`` also
  keeps the retention journal's before-images, as the daemon does): files wait in an inbox (as
  the data API stores them), a DiskReplica verifies each whole (HKDF,
  AES-256-GCM, zstd, XXH3-128, records), applies it with adjacent writes
  merged, flushes the target, moves the durable marker in sqlite and unlinks
  the file — timed from start until the last marker moved;
- limit: the bare primitives on the same files: AES-GCM decrypt, zstd
  decompress, one pwrite per write into a raw file, one fdatasync per file
  (the durability every applied file needs).

The target directory defaults to a RAM-backed file system (/dev/shm) so the
figures measure the software, not the storage device; ``--dir`` measures a
real volume. Each figure is the best of ``--rounds``. MB/s are 10**6 bytes of
write data per second. Prints one JSON object with ``--json``, keyed by
back-end: ``{"raw": {"apply_MBps": ..., "limit_MBps": ...}, "vmdk_sparse": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datagen import synthetic_blocks
from mastertarget.config import DiskConfig
from mastertarget.disks import CreateFormat, create_disk
from mastertarget.inbox import Inbox
from mastertarget.journal import UndoJournal
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.replica import DiskReplica
from mastertarget.state import StateStore
from protocol.compression import Compression
from protocol.hrl import HRL_HEADER, HrlSealer, SealedHrl
from protocol.keyring import KeyRing
from protocol.records import Record, Write
from protocol.sequencing import StreamPosition

#: name -> (back-end, keep the retention journal). The daemon always keeps
#: the journal; without it the figure is the applier alone, the one compared
#: with the bare limit (which has no before-images to keep).
BACKENDS: dict[str, tuple[CreateFormat, bool]] = {
    "raw": ("raw", False),
    "vmdk_sparse": ("vmdk-sparse", False),
    "raw_with_journal": ("raw", True),
}


@dataclass(frozen=True)
class Workload:
    keyring: KeyRing
    files: list[SealedHrl]
    #: per file: (offset, length) of each write, in data-area order
    writes: list[list[tuple[int, int]]]
    data_bytes: int
    disk_bytes: int


def build(args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    block = args.block_size
    count = args.files * args.writes_per_file
    blocks = synthetic_blocks(count, block, seed=args.seed)
    slots = args.disk_mib * 2**20 // block
    keyring = KeyRing({1: os.urandom(32)}, 1)
    sealer = HrlSealer(keyring)
    files, writes = [], []
    seq = 1
    for n in range(args.files):
        chunk = blocks[n * args.writes_per_file : (n + 1) * args.writes_per_file]
        records: list[Record] = [Write(rng.randrange(slots) * block, b) for b in chunk]
        files.append(
            sealer.seal_records(
                records, disk_id="bench", generation=1, first_seq=seq, first_capture_ns=seq,
                last_capture_ns=seq, receive_ns=seq, salt=os.urandom(32),
            )
        )  # fmt: skip
        writes.append([(r.offset, len(r.data)) for r in records if isinstance(r, Write)])
        seq += len(records)
    return Workload(keyring, files, writes, count * block, args.disk_mib * 2**20)


async def _apply_once(work: Workload, root: Path, kind: CreateFormat, journaled: bool) -> float:
    """Seconds for a DiskReplica to drain an inbox of every file into a new target."""
    target_path = root / ("target.img" if kind == "raw" else "target.vmdk")
    create_disk(target_path, kind, work.disk_bytes).close()
    inbox = Inbox(root / "cache")
    inbox.prepare("bench")
    for sealed in work.files:
        inbox.store(sealed.header, list(sealed.segments), now_ns=time.time_ns())
    store = StateStore(root / "state.db")
    executor = ThreadPoolExecutor(max_workers=4)
    config = DiskConfig(id="bench", target=target_path, format="raw" if kind == "raw" else "vmdk")
    replica = await DiskReplica.open(
        config, store=store, inbox=inbox, keyring=work.keyring,
        metrics=MasterTargetMetrics(CollectorRegistry()), executor=executor,
        journal=UndoJournal(root / "journal", work.keyring) if journaled else None,
    )  # fmt: skip
    last = work.files[-1].header
    started = time.perf_counter()
    replica.start()
    await replica.wait_applied(StreamPosition(last.generation, last.last_seq))
    elapsed = time.perf_counter() - started
    await replica.close()
    store.close()
    executor.shutdown()
    return elapsed


def _limit_once(work: Workload, root: Path) -> float:
    """Seconds for bare decrypt + decompress + pwrite + fdatasync of every file."""
    path = root / "limit.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, work.disk_bytes)
    keys = [work.keyring.file_key(f.header.key_id, f.header.kdf_salt) for f in work.files]
    zstd = zstandard.ZstdDecompressor()
    started = time.perf_counter()
    for sealed, key, writes in zip(work.files, keys, work.writes, strict=True):
        stored = AESGCM(key.key).decrypt(key.nonce, sealed.body, sealed.header_bytes)
        compressed = sealed.header.compression is Compression.ZSTD
        plain = zstd.decompress(stored) if compressed else stored
        view = memoryview(plain)
        pos = 0
        for offset, length in writes:
            os.pwrite(fd, view[pos : pos + length], offset)
            pos += length
        os.fdatasync(fd)
    elapsed = time.perf_counter() - started
    os.close(fd)
    return elapsed


def run(args: argparse.Namespace) -> dict[str, object]:
    work = build(args)
    base = Path(args.dir) if args.dir else _default_dir()
    result: dict[str, object] = {}
    for name, (kind, journaled) in BACKENDS.items():
        best_apply = best_limit = float("inf")
        for _ in range(args.rounds):
            for measure in ("limit", "apply"):
                root = Path(tempfile.mkdtemp(prefix="mt-apply-bench-", dir=base))
                try:
                    if measure == "apply":
                        seconds = asyncio.run(_apply_once(work, root, kind, journaled))
                        best_apply = min(best_apply, seconds)
                    else:
                        best_limit = min(best_limit, _limit_once(work, root))
                finally:
                    shutil.rmtree(root)
        apply_mbps = work.data_bytes / best_apply / 1e6
        limit_mbps = work.data_bytes / best_limit / 1e6
        result[name] = {
            "apply_MBps": round(apply_mbps, 1),
            "limit_MBps": round(limit_mbps, 1),
            "apply_vs_limit": round(apply_mbps / limit_mbps, 3),
        }
    result["setup"] = {
        "files": args.files,
        "writes_per_file": args.writes_per_file,
        "block_bytes": args.block_size,
        "data_bytes": work.data_bytes,
        "stored_bytes": sum(len(f.body) + HRL_HEADER.size for f in work.files),
        "disk_bytes": work.disk_bytes,
        "dir": str(base),
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
    }
    return result


def _default_dir() -> Path:
    shm = Path("/dev/shm")  # noqa: S108 - each run makes its own mkdtemp folder in it
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--files", type=int, default=128, help="HRL files (128)")
    parser.add_argument("--writes-per-file", type=int, default=16, help="writes per file (16)")
    parser.add_argument("--block-size", type=int, default=64 * 1024, help="bytes per write")
    parser.add_argument("--disk-mib", type=int, default=1024, help="target size in MiB (1024)")
    parser.add_argument("--rounds", type=int, default=3, help="best of N rounds (3)")
    parser.add_argument("--dir", help="where targets go (default: /dev/shm, RAM-backed)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    for name in BACKENDS:
        figures = result[name]
        assert isinstance(figures, dict)
        print(f"{name:<12} apply {figures['apply_MBps']:>8} MB/s   limit "
              f"{figures['limit_MBps']:>8} MB/s   {figures['apply_vs_limit']:.0%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
