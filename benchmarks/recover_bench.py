#!/usr/bin/env python3
"""Recovering a disk at an earlier point beside a plain copy of the same disk.

In one run, on one volume:

- setup: a raw target of ``--disk-mib`` is created and ``--data-mib`` of
  disk-like data (benchmarks/datagen.py) is written over it in 1 MiB extents
  spread at random, the rest left as holes; a real DiskReplica with its
  StateStore and UndoJournal applies one small HRL file (its end is the
  recovery point), the image is hashed, then ``--changes-mib`` of 64 KiB
  random writes arrive through the inbox as HRL files and are applied, each
  file's before-images captured into the journal first;
- recover: ``await replica.history.recover(point, output, "raw")`` — the target
  copied (all-zero 4 MiB pieces skipped), then the undo files after the point
  verified and applied to the copy, then the copy fsynced;
- copy: ``shutil.copyfile`` of the target file (sendfile(2) on Linux: a
  cp-like copy of every byte, holes read and written as zeros, not
  sparse-aware) followed by one fsync, the durability a recovered disk has.

The recovered image is checked once against the hash taken at the point; no
figure is printed for a wrong result. Each figure is the best of
``--rounds``; ``os.sync()`` runs before each timing so that earlier writes do
not drain inside it. The target directory defaults to /var/tmp, a real
volume (/dev/shm would measure memory copies); ``--dir`` chooses another.
Prints one JSON object with ``--json``: ``{"recover_s", "copy_s", "ratio",
"disk_bytes", "changed_bytes", "undo_bytes", "dir", ...}``.
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
from typing import Final

import xxhash
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datagen import synthetic_blocks
from mastertarget.config import DiskConfig
from mastertarget.disks import create_disk
from mastertarget.disks.base import TargetDisk
from mastertarget.inbox import Inbox
from mastertarget.journal import UndoJournal
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.points import RecoveryPoint
from mastertarget.replica import DiskReplica
from mastertarget.state import StateStore
from protocol.hrl import HrlSealer
from protocol.keyring import KeyRing
from protocol.records import Record, Write
from protocol.sequencing import StreamPosition

MiB: Final = 2**20
DISK_ID: Final = "bench"
#: Pieces the image is hashed in: the recover path's own copy piece size.
HASH_PIECE: Final = 4 * MiB
#: Unit in which the initial data is spread over the disk: small enough that
#: almost every 4 MiB copy piece holds data, as on a used file system.
FILL_EXTENT: Final = 1 * MiB
#: Distinct datagen blocks per pool: generating hundreds of MiB of distinct
#: text blocks takes longer than the measurement, and where a block lands
#: matters more to a copy than whether it repeats 64 MiB away.
POOL_BYTES: Final = 64 * MiB
#: Full run and --quick: (disk, initial data, changes) in MiB.
FULL: Final = (1024, 512, 256)
QUICK: Final = (64, 32, 16)


@dataclass(frozen=True)
class Setup:
    disk_bytes: int
    data_bytes: int
    changes_bytes: int
    block: int
    writes_per_file: int
    seed: int


@dataclass(frozen=True)
class Prepared:
    """A running replica whose target is ``changes_bytes`` past ``point``."""

    root: Path
    target_path: Path
    replica: DiskReplica
    store: StateStore
    executor: ThreadPoolExecutor
    point: RecoveryPoint
    point_digest: bytes
    undo_bytes: int


def _pool(setup: Setup, count: int, seed: int) -> list[bytes]:
    return synthetic_blocks(min(count, POOL_BYTES // setup.block), setup.block, seed=seed)


def _fill(target: TargetDisk, setup: Setup, rng: random.Random) -> None:
    """Write the initial data over the disk in extents at random places."""
    extents = setup.disk_bytes // FILL_EXTENT
    pool = _pool(setup, setup.data_bytes // setup.block, setup.seed)
    per_extent = FILL_EXTENT // setup.block
    for extent in sorted(rng.sample(range(extents), setup.data_bytes // FILL_EXTENT)):
        data = b"".join(rng.choice(pool) for _ in range(per_extent))
        target.write(extent * FILL_EXTENT, data)
    target.flush()


def _digest(path: Path) -> bytes:
    """XXH3-128 of a whole image file, read in pieces."""
    digest = xxhash.xxh3_128()
    with path.open("rb") as f:
        while piece := f.read(HASH_PIECE):
            digest.update(piece)
    return digest.digest()


async def _push(replica: DiskReplica, sealer: HrlSealer, records: list[Record], seq: int) -> int:
    """Seal records as the file starting at ``seq``, store it in the inbox; the next seq."""
    sealed = sealer.seal_records(
        records, disk_id=DISK_ID, generation=1, first_seq=seq, first_capture_ns=seq,
        last_capture_ns=seq, receive_ns=seq, salt=os.urandom(32),
    )  # fmt: skip
    async with replica.receiver.put_lock:
        await replica.receiver.store(sealed.header, sealed.to_bytes())
    return seq + len(records)


async def prepare(setup: Setup, root: Path) -> Prepared:
    """Fill a target, make a point, apply the changes after it with a journal."""
    rng = random.Random(setup.seed)
    keyring = KeyRing({1: os.urandom(32)}, 1)
    target_path = root / "target.img"
    target = create_disk(target_path, "raw", setup.disk_bytes)
    _fill(target, setup, rng)
    target.close()
    store = StateStore(root / "state.db")
    executor = ThreadPoolExecutor(max_workers=4)
    replica = await DiskReplica.open(
        DiskConfig(id=DISK_ID, target=target_path), store=store,
        inbox=Inbox(root / "cache"), keyring=keyring,
        metrics=MasterTargetMetrics(CollectorRegistry()), executor=executor,
        journal=UndoJournal(root / "journal", keyring),
    )  # fmt: skip
    replica.start()
    sealer = HrlSealer(keyring)
    slots = setup.disk_bytes // setup.block
    # One small file first: its end is the recovery point the changes are undone to.
    seq = await _push(replica, sealer, [Write(0, rng.randbytes(setup.block))], 1)
    await replica.wait_applied(StreamPosition(1, seq - 1))
    point = next(p for p in await replica.history.points() if p.seq == seq - 1)
    point_digest = await asyncio.get_running_loop().run_in_executor(executor, _digest, target_path)
    pool = _pool(setup, setup.changes_bytes // setup.block, setup.seed + 1)
    writes = setup.changes_bytes // setup.block
    for start in range(0, writes, setup.writes_per_file):
        count = min(setup.writes_per_file, writes - start)
        records: list[Record] = [
            Write(rng.randrange(slots) * setup.block, rng.choice(pool)) for _ in range(count)
        ]
        seq = await _push(replica, sealer, records, seq)
    await replica.wait_applied(StreamPosition(1, seq - 1))
    if await asyncio.get_running_loop().run_in_executor(executor, _digest, target_path) == (
        point_digest
    ):
        raise SystemExit("the changes left the image as it was: the check would prove nothing")
    parts = store.undo_after(DISK_ID, StreamPosition(point.generation, point.seq))
    return Prepared(
        root, target_path, replica, store, executor, point, point_digest,
        sum(p.bytes for p in parts),
    )  # fmt: skip


async def close(prepared: Prepared) -> None:
    await prepared.replica.close()
    prepared.store.close()
    prepared.executor.shutdown()


def copy_once(source: Path, output: Path) -> float:
    """Seconds for a cp-like copy of the whole file, made durable."""
    os.sync()
    started = time.perf_counter()
    shutil.copyfile(source, output)
    fd = os.open(output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    output.unlink()
    return elapsed


async def recover_once(prepared: Prepared, output: Path, *, check: bool) -> tuple[float, float]:
    """Seconds for the recover, and for its copy phase; checks the image if asked.

    Raises:
        SystemExit: the recovered image is not the image at the point.
    """
    os.sync()
    started = time.perf_counter()
    result = await prepared.replica.history.recover(prepared.point, output, "raw")
    elapsed = time.perf_counter() - started
    if check and _digest(output) != prepared.point_digest:
        raise SystemExit(f"recovered image {output} differs from the image at the point")
    output.unlink()
    return elapsed, result.copy_s


async def measure(setup: Setup, root: Path, rounds: int) -> dict[str, object]:
    prepared = await prepare(setup, root)
    try:
        best_recover = best_copy = best_phase = float("inf")
        for n in range(rounds):
            best_copy = min(best_copy, copy_once(prepared.target_path, root / "copy.img"))
            recover_s, phase_s = await recover_once(prepared, root / "recovered.img", check=n == 0)
            if recover_s < best_recover:
                best_recover, best_phase = recover_s, phase_s
    finally:
        await close(prepared)
    return {
        "recover_s": round(best_recover, 3),
        "copy_s": round(best_copy, 3),
        "ratio": round(best_recover / best_copy, 3),
        "recover_copy_phase_s": round(best_phase, 3),
        "recover_undo_phase_s": round(best_recover - best_phase, 3),
        "disk_bytes": setup.disk_bytes,
        "data_bytes": setup.data_bytes,
        "changed_bytes": setup.changes_bytes,
        "undo_bytes": prepared.undo_bytes,
        "copy_method": "shutil.copyfile (sendfile, not sparse-aware) + fsync",
        "rounds": rounds,
    }


def _default_dir() -> Path:
    return Path("/var/tmp")  # noqa: S108 - a real volume; each run makes its own mkdtemp folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="64 MiB disk, 16 MiB of changes")
    parser.add_argument("--disk-mib", type=int, help=f"target size ({FULL[0]})")
    parser.add_argument("--data-mib", type=int, help=f"initial data spread over it ({FULL[1]})")
    parser.add_argument("--changes-mib", type=int, help=f"changes after the point ({FULL[2]})")
    parser.add_argument("--block-size", type=int, default=64 * 1024, help="bytes per write")
    parser.add_argument("--writes-per-file", type=int, default=64, help="writes per HRL file")
    parser.add_argument("--rounds", type=int, default=3, help="best of N rounds (3)")
    parser.add_argument("--dir", help="where the run's folder goes (default /var/tmp)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    disk_mib, data_mib, changes_mib = QUICK if args.quick else FULL
    setup = Setup(
        disk_bytes=(args.disk_mib or disk_mib) * MiB,
        data_bytes=(args.data_mib if args.data_mib is not None else data_mib) * MiB,
        changes_bytes=(args.changes_mib or changes_mib) * MiB,
        block=args.block_size, writes_per_file=args.writes_per_file, seed=args.seed,
    )  # fmt: skip
    if setup.data_bytes > setup.disk_bytes or FILL_EXTENT % setup.block:
        parser.error(f"--data-mib must fit the disk and {FILL_EXTENT} divide by --block-size")
    base = Path(args.dir) if args.dir else _default_dir()
    root = Path(tempfile.mkdtemp(prefix="recover-bench-", dir=base))
    try:
        result = asyncio.run(measure(setup, root, args.rounds))
    finally:
        shutil.rmtree(root)
    result["dir"] = str(base)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"recover {result['recover_s']} s   copy {result['copy_s']} s   "
              f"ratio {result['ratio']}   disk {setup.disk_bytes // MiB} MiB   "
              f"changes {setup.changes_bytes // MiB} MiB   in {base}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
