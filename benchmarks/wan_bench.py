#!/usr/bin/env python3
"""Disks replicated over WAN links: one and several requests of a disk in flight.

Replication crosses two links that are rarely a LAN: protected machine to
process server, process server to master target. A sender that waits for
each request's answer before the next leaves the link idle for a round
trip, and a write that arrives meanwhile waits for that answer before it
even starts; ``in_flight_per_disk`` (the agent's and the process server's
config, docs/api.md "Several requests in flight") keeps the next request on
its way. This bench measures what that is worth.

Both links are :class:`~benchmarks.wanlink.WanLink` relays on loopback
(``--rtt-ms`` of round trip and ``--mbit`` each way, the same for both
hops); a real ``processserver serve`` and ``mastertarget serve`` run behind
them. For each ``in_flight_per_disk`` of ``--in-flight`` (1 and 2 by
default), both ends set to it, each on a site of its own:

- database: ``--disks`` agent streams (agent/stream.py, as
  smallwrite_bench.py drives them) commit ``--commits`` small commits a
  second each for ``--seconds``; the RPO at the master target (p50, p99,
  max: how old the oldest commit not yet applied is, sampled every 0.1 s)
  and the drain after the load;
- sync: ``blockrepl agent sync`` of an image of disk-like data
  (benchmarks/datagen.py, ``--size-mib``) onto an empty target, timed until
  the master target applied the last batch, then compared with the image.

Run: ``.venv/bin/python benchmarks/wan_bench.py [--json] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import smallwrite_bench as smallwrite
from benchmarks.deploy import Deployment, default_dir, deploy
from benchmarks.resync_bench import (
    CACHE_HIGH_BYTES,
    CACHE_LOW_BYTES,
    DISK,
    MACHINE,
    agent_config,
    make_pools,
    same_files,
    sync_until_applied,
    write_image,
)
from benchmarks.site import start_site
from benchmarks.wanlink import WanLink

#: A round trip between sites a few hundred kilometres apart.
DEFAULT_RTT_MS: Final = 20.0
#: A site-to-site link of one gigabit.
DEFAULT_MBIT: Final = 1000.0


def run_one(
    root: Path, source: Path, in_flight: int, *, rtt_s: float, bytes_per_s: float
) -> dict[str, Any]:
    """A site of its own behind two links; ``agent sync`` of ``source`` onto an empty target."""
    size = source.stat().st_size
    dep = deploy(
        root, {MACHINE: DISK}, disk_bytes=size,
        cache_high_bytes=CACHE_HIGH_BYTES, cache_low_bytes=CACHE_LOW_BYTES,
    )  # fmt: skip
    with (
        WanLink(dep.mt_port, rtt_s=rtt_s, bytes_per_s=bytes_per_s) as to_mt,
        WanLink(dep.ps_port, rtt_s=rtt_s, bytes_per_s=bytes_per_s) as to_ps,
    ):
        ps_config = dep.ps.config
        text = ps_config.read_text().replace(
            f"https://127.0.0.1:{dep.mt_port}", f"https://127.0.0.1:{to_mt.port}"
        )
        ps_config.write_text(f"in_flight_per_disk = {in_flight}\n{text}")
        config = agent_config(dep, root, source)
        text = config.read_text().replace(f"127.0.0.1:{dep.ps_port}", f"127.0.0.1:{to_ps.port}")
        config.write_text(f"in_flight_per_disk = {in_flight}\n{text}")
        try:
            dep.mt.start()
            dep.ps.start()
            dep.mt.wait_healthy()
            dep.ps.wait_healthy()
            seconds, _, report = sync_until_applied(dep, config)
        finally:
            dep.ps.stop()
            dep.mt.stop()
        carried = {"agent_to_ps_bytes": to_ps.carried, "ps_to_mt_bytes": to_mt.carried}
    target = root / "mt" / f"{DISK}.raw"
    if not same_files(source, target):
        raise SystemExit("wan_bench: the target differs from the image after the sync")
    return {
        "in_flight_per_disk": in_flight,
        "seconds": round(seconds, 3),
        "MBps": round(size / seconds / 1e6, 1),
        "sent_bytes": report["sent_bytes"],
        **carried,
    }


def run_database(
    root: Path, args: argparse.Namespace, in_flight: int, *, rtt_s: float, bytes_per_s: float
) -> dict[str, Any]:
    """smallwrite_bench.py's load on a site of its own behind two links."""
    with contextlib.ExitStack() as links:

        def through_links(dep: Deployment) -> None:
            to_mt = links.enter_context(WanLink(dep.mt_port, rtt_s=rtt_s, bytes_per_s=bytes_per_s))
            config = dep.ps.config
            text = config.read_text().replace(
                f"https://127.0.0.1:{dep.mt_port}", f"https://127.0.0.1:{to_mt.port}"
            )
            config.write_text(f"in_flight_per_disk = {in_flight}\n{text}")

        site = start_site(
            root, args.disks, disk_bytes=smallwrite.DISK_BYTES, before_start=through_links
        )
        try:
            assert site.deployment is not None  # start_site made it
            ps_port = site.deployment.ps_port
            to_ps = links.enter_context(WanLink(ps_port, rtt_s=rtt_s, bytes_per_s=bytes_per_s))
            linked = dataclasses.replace(site, ps_url=f"https://127.0.0.1:{to_ps.port}")
            measuring = smallwrite.measure(
                linked, root, commits=args.commits, seconds=args.seconds, seed=args.seed,
                in_flight_per_disk=in_flight,
            )  # fmt: skip
            figures = asyncio.run(measuring)
        finally:
            site.stop()
    keep = ("smallwrite_rpo_p50_s", "smallwrite_rpo_p99_s", "smallwrite_rpo_max_s",
            "smallwrite_drain_s", "commits_per_s", "wire_batches_per_commit")  # fmt: skip
    return {"in_flight_per_disk": in_flight, **{k: figures[k] for k in keep}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.dir) if args.dir else default_dir()
    rtt_s, bytes_per_s = args.rtt_ms / 1000, args.mbit * 1e6 / 8
    pools = make_pools(args.seed)
    database: list[dict[str, Any]] = []
    sync: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="wan-bench-", dir=base))
    try:
        source = work / "source.raw"
        write_image(source, args.size_mib * 2**20, pools[0], args.seed)
        for in_flight in args.in_flight:
            root = work / f"db-{in_flight}"
            database.append(
                run_database(root, args, in_flight, rtt_s=rtt_s, bytes_per_s=bytes_per_s)
            )
            shutil.rmtree(root, ignore_errors=True)
            root = work / f"sync-{in_flight}"
            root.mkdir()
            sync.append(run_one(root, source, in_flight, rtt_s=rtt_s, bytes_per_s=bytes_per_s))
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = sync[0]["seconds"]
    for one in sync:
        one["speedup"] = round(first / one["seconds"], 2)
    return {
        "rtt_ms": args.rtt_ms,
        "link_mbit": args.mbit,
        "disks": args.disks,
        "commits_per_s_per_disk": args.commits,
        "seconds": args.seconds,
        "database": database,
        "sync_bytes": args.size_mib * 2**20,
        "sync": sync,
        "dir": str(base),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="6 s of load, a 128 MiB image")
    parser.add_argument("--size-mib", type=int, default=512, help="image to sync, MiB (512)")
    parser.add_argument("--disks", type=int, default=4, help="database disks (4)")
    parser.add_argument("--commits", type=float, default=100.0,
                        help="commits a second per disk (100)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of load (15)")
    parser.add_argument("--rtt-ms", type=float, default=DEFAULT_RTT_MS,
                        help=f"round trip of each link ({DEFAULT_RTT_MS:g} ms)")  # fmt: skip
    parser.add_argument("--mbit", type=float, default=DEFAULT_MBIT,
                        help=f"each link's rate each way ({DEFAULT_MBIT:g} Mbit/s)")  # fmt: skip
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 2],
                        help="in_flight_per_disk settings to compare (1 2)")  # fmt: skip
    parser.add_argument("--dir", help="where the files go (default: /dev/shm)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.seconds = 128, 6.0
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"two links of {args.rtt_ms:g} ms and {args.mbit:g} Mbit/s, in {result['dir']}")
    print(f"database, {args.disks} disks x {args.commits:g} commits/s for {args.seconds:g} s:")
    for one in result["database"]:
        rpo = [one[f"smallwrite_rpo_{q}_s"] for q in ("p50", "p99", "max")]
        print(f"  in_flight_per_disk {one['in_flight_per_disk']}: RPO p50 / p99 / max "
              f"{rpo[0]} / {rpo[1]} / {rpo[2]} s, drained in "
              f"{one['smallwrite_drain_s']} s")  # fmt: skip
    print(f"agent sync of {args.size_mib} MiB:")
    for one in result["sync"]:
        print(f"  in_flight_per_disk {one['in_flight_per_disk']}: {one['seconds']} s, "
              f"{one['MBps']} MB/s, speedup {one['speedup']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
