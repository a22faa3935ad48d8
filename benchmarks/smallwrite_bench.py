#!/usr/bin/env python3
"""RPO under a database's load: small writes, a commit after each, many a second.

A real master target and process server on loopback (benchmarks/site.py),
and in this process one agent stream per disk (agent/stream.py: the
journal, the sender, coalescing and all), as the capture drives it: each
commit of the simulated database is 1 to 3 writes of 4 to 16 KiB at random
places, journaled as one batch (the capture's group commit after a flush).
``--disks`` disks (8) commit ``--commits`` times a second each (300) for
``--seconds`` (20); then the load stops and the run waits until the master
target has applied every commit.

Figures (the master target's ``applied_seq`` of each disk, scraped every
:data:`SAMPLE_S`):

- smallwrite_rpo_p99_s / smallwrite_rpo_max_s: at each sample and for each
  disk, how old the oldest commit the master target has not applied is
  (0 when it applied them all): what a disaster at that moment would lose;
- smallwrite_drain_s: from the load stopping until every commit is applied;
- agent_backlog_peak_MiB: the most the agents' journals held at once (all
  disks), ps_backlog_peak_MiB: the same of the process server's cache;
- commits_per_s: the commits the disks made (the rate kept, or not);
- wire_batches_per_commit: how many batches the agents sent per commit
  journaled (1 when nothing waited; far below under load: coalescing).

Run: ``.venv/bin/python benchmarks/smallwrite_bench.py [--json] [--quick]``.
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import DEFAULT_IN_FLIGHT_PER_DISK
from agent.journal import EntryKind
from agent.pool import ProcessServerPool
from agent.state import AgentState
from agent.stream import ReplicationStream
from benchmarks.deploy import default_dir
from benchmarks.site import Site, start_site
from benchmarks.sitemetrics import MT_APPLIED_SEQ, PS_CACHE, parse, percentile
from protocol.records import NO_FLAGS, Record, Write
from runtime.tls import client_context

#: The writes of a commit: a database page (4 KiB) to a few (16 KiB).
MIN_WRITE_BYTES: Final = 4 * 2**10
MAX_WRITE_BYTES: Final = 16 * 2**10
#: Writes per commit: the data page, its index page, the log.
MAX_WRITES_PER_COMMIT: Final = 3
#: Commits a second of each disk: a busy database's few hundred.
DEFAULT_COMMITS_PER_S: Final = 300.0
#: Each disk's size: commits land anywhere in it.
DISK_BYTES: Final = 256 * 2**20
#: Seconds between scrapes of the master target's applied position.
SAMPLE_S: Final = 0.1
#: Seconds the run may wait for the backlog to drain before it gives up.
DRAIN_TIMEOUT_S: Final = 300.0
#: How the agents reach the process server: as an agent's defaults do.
REQUEST_TIMEOUT_S: Final = 60.0
CONNECT_TIMEOUT_S: Final = 10.0
GIVE_UP_AFTER_S: Final = 600.0
#: Distinct data written round-robin: 4 MiB of random bytes (databases
#: compress poorly page by page; the figures should not lean on zstd).
POOL_BYTES: Final = 4 * 2**20


@dataclass
class Disk:
    """One disk's stream and the times of its commits."""

    disk_id: str
    stream: ReplicationStream
    pool: ProcessServerPool
    #: (last seq of the commit, wall time it was journaled)
    commits: list[tuple[int, float]] = field(default_factory=list)
    applied_seq: int = 0
    #: index of the first commit not known applied
    first_unapplied: int = 0

    def rpo_s(self, now: float) -> float:
        """How old the oldest commit not yet applied is, at ``now`` (0 when none)."""
        while (
            self.first_unapplied < len(self.commits)
            and self.commits[self.first_unapplied][0] <= self.applied_seq
        ):
            self.first_unapplied += 1
        if self.first_unapplied == len(self.commits):
            return 0.0
        return max(0.0, now - self.commits[self.first_unapplied][1])


async def _commit_loop(
    disk: Disk, rate: float, until: float, pool: Sequence[bytes], seed: int
) -> None:
    rng = random.Random(seed)
    pages = DISK_BYTES // MIN_WRITE_BYTES
    interval = 1.0 / rate
    next_at = time.monotonic()
    n = 0
    while (now := time.monotonic()) < until:
        if next_at > now:
            await asyncio.sleep(next_at - now)
        next_at = max(next_at + interval, time.monotonic() - 1.0)  # no burst after a stall
        records: list[Record] = []
        for _ in range(rng.randint(1, MAX_WRITES_PER_COMMIT)):
            size = MIN_WRITE_BYTES * rng.choice((1, 2, 4))
            offset = rng.randrange(pages - size // MIN_WRITE_BYTES) * MIN_WRITE_BYTES
            records.append(Write(offset, pool[n % len(pool)][:size]))
            n += 1
        stamp = time.time_ns()
        await disk.stream.append(
            records, flags=NO_FLAGS, first_capture_ns=stamp, last_capture_ns=stamp,
            kind=EntryKind.INLINE, wait=False,
        )  # fmt: skip
        disk.commits.append((disk.stream.end_seq, time.monotonic()))


async def _sample(site: Site, disks: Sequence[Disk], session: aiohttp.ClientSession) -> float:
    """Scrape both daemons once; the process server's cache bytes."""
    async with session.get(f"{site.mt_metrics}/metrics") as response:
        mt = parse(await response.text(), (MT_APPLIED_SEQ,))
    for disk in disks:
        disk.applied_seq = int(mt.get(MT_APPLIED_SEQ, {}).get(disk.disk_id, 0))
    if site.ps_metrics is None:
        return 0.0
    async with session.get(f"{site.ps_metrics}/metrics") as response:
        ps = parse(await response.text(), (PS_CACHE,))
    return sum(ps.get(PS_CACHE, {}).values())


async def measure(
    site: Site, root: Path, *, commits: float, seconds: float, seed: int,
    in_flight_per_disk: int = DEFAULT_IN_FLIGHT_PER_DISK,
) -> dict[str, Any]:  # fmt: skip
    """The phase on ``site``: figures by name (see the module's text); each agent
    stream keeps ``in_flight_per_disk`` requests in flight."""
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="agent")
    blocks = [os.urandom(MAX_WRITE_BYTES) for _ in range(POOL_BYTES // MAX_WRITE_BYTES)]
    disks: list[Disk] = []
    try:
        for disk_id, tls in site.disks:
            pool = ProcessServerPool(
                (site.ps_url,), client_context(tls), request_timeout_s=REQUEST_TIMEOUT_S,
                connect_timeout_s=CONNECT_TIMEOUT_S, give_up_after_s=GIVE_UP_AFTER_S,
                in_flight_per_disk=in_flight_per_disk,
            )  # fmt: skip
            home = root / "agents" / disk_id
            stream = await ReplicationStream.create(
                disk_id, 1, state=AgentState(home / "state"), pool=pool,
                journal_dir=home / "journal", source=None, executor=executor,
            )  # fmt: skip
            stream.start()
            disks.append(Disk(disk_id, stream, pool))
        samples: list[float] = []
        agent_peak = ps_peak = 0.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            started = time.monotonic()
            until = started + seconds
            writers = [
                asyncio.create_task(_commit_loop(d, commits, until, blocks, seed + i))
                for i, d in enumerate(disks)
            ]
            stopped: float | None = None
            drained: float | None = None
            while drained is None:
                await asyncio.sleep(SAMPLE_S)
                cache = await _sample(site, disks, session)
                now = time.monotonic()
                samples.extend(d.rpo_s(now) for d in disks)
                agent_peak = max(agent_peak, sum(d.stream.journal_bytes for d in disks))
                ps_peak = max(ps_peak, cache)
                if stopped is None and all(w.done() for w in writers):
                    for writer in writers:
                        writer.result()  # a writer that failed ends the run with its error
                    stopped = now
                if stopped is not None and all(d.applied_seq >= d.stream.end_seq for d in disks):
                    drained = now
                if stopped is not None and now - stopped > DRAIN_TIMEOUT_S:
                    raise SystemExit(f"the backlog did not drain within {DRAIN_TIMEOUT_S} s")
        made = sum(len(d.commits) for d in disks)
        journaled = sum(d.stream.stats.batches for d in disks)
        wire = sum(d.stream.stats.wire_batches for d in disks)
        assert stopped is not None
        return {
            "smallwrite_rpo_p50_s": _round(percentile(samples, 50)),
            "smallwrite_rpo_p99_s": _round(percentile(samples, 99)),
            "smallwrite_rpo_max_s": _round(max(samples, default=0.0)),
            "smallwrite_drain_s": _round(drained - stopped),
            "agent_backlog_peak_MiB": round(agent_peak / 2**20, 1),
            "ps_backlog_peak_MiB": round(ps_peak / 2**20, 1),
            "commits_per_s": round(made / seconds, 1),
            "commits_per_s_wanted": commits * len(disks),
            "wire_batches_per_commit": round(wire / max(1, journaled), 3),
            "disks": len(disks),
            "seconds": seconds,
        }
    finally:
        for disk in disks:
            await disk.stream.close()
            await disk.pool.close()
        executor.shutdown()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.dir) if args.dir else default_dir()
    root = Path(tempfile.mkdtemp(prefix="br-sw-", dir=base))
    try:
        site = start_site(root / "s", args.disks, disk_bytes=DISK_BYTES)
        try:
            measuring = measure(
                site, root, commits=args.commits, seconds=args.seconds, seed=args.seed,
                in_flight_per_disk=args.in_flight_per_disk,
            )  # fmt: skip
            return asyncio.run(measuring)
        finally:
            site.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="10 s of load")
    parser.add_argument("--disks", type=int, default=8, help="disks, one machine each (8)")
    parser.add_argument(
        "--commits", type=float, default=DEFAULT_COMMITS_PER_S, help="commits a second per disk"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load (20)")
    parser.add_argument("--in-flight-per-disk", type=int, default=DEFAULT_IN_FLIGHT_PER_DISK,
                        help="each agent stream's requests in flight "
                        f"({DEFAULT_IN_FLIGHT_PER_DISK})")  # fmt: skip
    parser.add_argument("--dir", help="where the daemons' files go (default: /dev/shm)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 10.0
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        print(f"{key:<26}{value:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
