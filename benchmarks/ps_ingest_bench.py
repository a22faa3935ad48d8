#!/usr/bin/env python3
"""Ingest throughput of a real process server shipping to a real master target.

Both daemons run as subprocesses on this machine with a fresh PKI and key
ring in a temporary folder. ``--sources`` agents (asyncio tasks, each its own
machine certificate and disk) POST batches of ``--writes-per-batch`` 64 KiB
writes of disk-like data (benchmarks/datagen.py) over mutual TLS, as many in
flight each as an agent keeps (benchmarks/workload.py: two of 1 MiB or more),
for ``--duration`` seconds. Measured in one run:

- ingest: write-data bytes acknowledged per second, all sources together;
- ack_p50 / ack_p99: each POST from its start until its 200 arrived;
- cpu_s_per_GB: the process server's user + system CPU seconds per 10**9
  bytes acknowledged (mt_cpu_ and client_cpu_s_per_GB: the same for the
  master target and for the sources, which share the machine's CPUs);
- ps_rss: the process server's peak resident memory (VmHWM);
- limit_encode: the bare zstd level 1 + AES-256-GCM calls on the same batches
  in this process (as protocol_bench.py measures it), the single-process
  ceiling for what the process server spends per batch;
- floor: benchmarks/floor.py on the same batches: the cores in use divided
  by the sum of the sources', the process server's and the master target's
  unskippable CPU per GB (TLS on each hop, encoding, sealing, verifying,
  before-images, pwrite), measured in this run; ``ingest_vs_floor`` is the
  ingest over it;
- the master target down (``--mt-down``, on by default): the master target is
  stopped and the sources go on until the process server's cache is at its
  high mark and it answers 503; its peak resident memory must not have grown
  with the backlog (cpu_s_per_GB_mt_down: its CPU cost with nothing shipped).

MB/s are 10**6 bytes of write data per second. The folder defaults to a
RAM-backed file system (/dev/shm) so the figures measure the software, not
the storage device; ``--dir`` measures a real volume. Run:
``.venv/bin/python benchmarks/ps_ingest_bench.py [--json] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datagen import synthetic_blocks
from benchmarks.deploy import Deployment, cpu_seconds, default_dir, peak_rss_mib
from benchmarks.deploy import deploy as deploy_site
from benchmarks.floor import measure_floor
from benchmarks.protocol_bench import limit_encode_mbps
from benchmarks.workload import Profile, Source, drive

#: Distinct blocks generated once and reused round-robin: enough that batches
#: differ, little enough to generate in about a second.
POOL_BLOCKS: Final = 512
#: Size of each replicated disk: writes land on random block slots in it.
DISK_BYTES: Final = 256 * 2**20
#: The process server's cache marks: low enough that the master-target-down
#: phase reaches the high mark in seconds, the low mark above the 32 MiB
#: floor the config requires.
CACHE_HIGH_BYTES: Final = 512 * 2**20
CACHE_LOW_BYTES: Final = 448 * 2**20
#: Seconds the master-target-down phase may take to fill the cache.
FILL_TIMEOUT_S: Final = 120.0


def deploy(root: Path, sources: int) -> Deployment:
    """Write a PKI, a key ring and both daemons' configs under ``root``: one
    machine ``srcN`` with disk ``diskN`` per source."""
    return deploy_site(
        root, {f"src{n}": f"disk{n}" for n in range(sources)}, disk_bytes=DISK_BYTES,
        cache_high_bytes=CACHE_HIGH_BYTES, cache_low_bytes=CACHE_LOW_BYTES,
    )  # fmt: skip


def _percentile_ms(values: list[float], q: int) -> float:
    if len(values) < 2:
        return round(values[0] * 1e3, 1) if values else 0.0
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3, 1)


def measure(args: argparse.Namespace, root: Path, blocks: list[bytes]) -> dict[str, object]:
    dep = deploy(root, args.sources)
    result: dict[str, object] = {}
    try:
        dep.mt.start()
        dep.ps.start()
        dep.mt.wait_healthy()
        dep.ps.wait_healthy()
        profile = Profile(
            block_bytes=args.block_size, writes_per_batch=args.writes_per_batch,
            pattern="random", disk_bytes=DISK_BYTES,
        )  # fmt: skip
        server = f"https://127.0.0.1:{dep.ps_port}"
        sources = [
            Source(disk, n, blocks, profile, server, dep.client_tls(machine))
            for n, (machine, disk) in enumerate(dep.disks_of.items())
        ]
        before = (cpu_seconds(dep.ps.pid), cpu_seconds(dep.mt.pid), time.process_time())
        tallies, elapsed = uvloop.run(drive(sources, args.duration))
        after = (cpu_seconds(dep.ps.pid), cpu_seconds(dep.mt.pid), time.process_time())
        cpu, mt_cpu, client_cpu = (b - a for a, b in zip(before, after, strict=True))
        acked = sum(t.acked_bytes() for t in tallies)
        gigabytes = acked / 1e9 or 1.0
        latencies = [x for t in tallies for x in t.latencies_s()]
        result.update(
            ingest_MBps=round(acked / elapsed / 1e6, 1),
            ack_p50_ms=_percentile_ms(latencies, 50),
            ack_p99_ms=_percentile_ms(latencies, 99),
            cpu_s_per_GB=round(cpu / gigabytes, 2),
            mt_cpu_s_per_GB=round(mt_cpu / gigabytes, 2),
            client_cpu_s_per_GB=round(client_cpu / gigabytes, 2),
            ps_rss_MiB=round(peak_rss_mib(dep.ps.pid), 1),
            refusals_503=sum(t.refusals_503 for t in tallies),
            errors=sum(t.errors for t in tallies),
        )
        if args.mt_down:
            dep.mt.stop()
            before_down = cpu_seconds(dep.ps.pid)
            tallies, elapsed = uvloop.run(drive(sources, FILL_TIMEOUT_S, stop_on_503=True))
            cpu = cpu_seconds(dep.ps.pid) - before_down
            acked = sum(t.acked_bytes() for t in tallies)
            result.update(
                ingest_MBps_mt_down=round(acked / elapsed / 1e6, 1),
                cpu_s_per_GB_mt_down=round(cpu / (acked / 1e9 or 1.0), 2),
                ps_rss_MiB_mt_down=round(peak_rss_mib(dep.ps.pid), 1),
                cache_full=all(t.refusals_503 for t in tallies),
            )
    finally:
        dep.ps.stop()
        dep.mt.stop()
    return result


def run(args: argparse.Namespace) -> dict[str, object]:
    blocks = synthetic_blocks(POOL_BLOCKS, args.block_size, seed=args.seed)
    limit = limit_encode_mbps(blocks, args.writes_per_batch, args.rounds)
    base = Path(args.dir) if args.dir else default_dir()
    root = Path(tempfile.mkdtemp(prefix="ps-ingest-bench-", dir=base))
    cores = len(os.sched_getaffinity(0))
    try:
        figures = measure(args, root, blocks)
        floor = measure_floor(
            blocks, args.writes_per_batch, directory=base, cores=cores, rounds=args.rounds
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ingest = figures["ingest_MBps"]
    assert isinstance(ingest, float)
    return {
        **figures,
        **floor.figures(),
        "ingest_vs_floor": round(ingest / floor.floor_MBps, 3),
        "limit_encode_MBps": round(limit, 1),
        "ingest_vs_limit": round(ingest / limit, 3),
        "sources": args.sources,
        "batch_bytes": args.writes_per_batch * args.block_size,
        "duration_s": args.duration,
        "dir": str(base),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a 3 s run with 2 rounds")
    parser.add_argument("--sources", type=int, default=4, help="concurrent sources (4)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (10)")
    parser.add_argument("--writes-per-batch", type=int, default=16, help="writes per batch (16)")
    parser.add_argument("--block-size", type=int, default=64 * 1024, help="bytes per write")
    parser.add_argument("--rounds", type=int, default=5, help="best of N encode rounds (5)")
    parser.add_argument(
        "--mt-down", action=argparse.BooleanOptionalAction, default=True,
        help="then stop the master target and fill the cache (default: on)",
    )  # fmt: skip
    parser.add_argument("--dir", help="where the daemons' files go (default: /dev/shm)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 3.0, 2
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    batch_kib = args.writes_per_batch * args.block_size // 2**10
    print(f"{args.sources} sources, batches of {batch_kib} KiB, {args.duration:g} s, "
          f"in {result['dir']}")  # fmt: skip
    keys = ("ingest_MBps", "limit_encode_MBps", "ingest_vs_limit", "ack_p50_ms", "ack_p99_ms",
            "cpu_s_per_GB", "mt_cpu_s_per_GB", "client_cpu_s_per_GB", "ps_rss_MiB",
            "ingest_MBps_mt_down", "cpu_s_per_GB_mt_down", "ps_rss_MiB_mt_down", "floor_MBps",
            "ingest_vs_floor", "ps_floor_s_per_GB", "mt_floor_s_per_GB")  # fmt: skip
    for key in keys:
        if key in result:
            print(f"{key:<22}{result[key]:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
