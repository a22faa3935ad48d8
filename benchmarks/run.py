#!/usr/bin/env python3
"""Load test of a replication site, beside its limits and its peers, in one run.

Starts a master target and a process server on loopback (or drives running
ones: ``--ps-url`` and the options beside it), drives simulated protected
disks (benchmarks/workload.py) and reads the figures from the daemons
themselves (benchmarks/sitemetrics.py, /proc). Phases, in order:

- full: ``--disks`` disks (8) of ``--block-size`` (64 KiB) ``--pattern``
  (random) writes, open throttle (or ``--rate`` MB/s): throughput applied at
  the master target beside the bare pipeline limit (protocol_bench.py's
  ``pipeline_limit`` on the same data, scaled to the cores in use), CPU per
  GB and peak memory of each daemon, compression, bytes on the wire;
- half: the same disks throttled to half of full's applied rate: RPO
  p50/p99/max (each disk's RPO at each of the master target's evaluations)
  and ack latency p50/p99/p99.9 (POST to 200);
- mt-down: full load again with the master target frozen (SIGSTOP) for a
  while: the process server's peak memory with its cache filling, then the
  time to drain once it runs again;
- many: ``--many-disks`` disks (256) on a site of their own, one write per
  disk every few seconds: how far the worst disk's RPO is from the median
  disk's;
- smallwrite: a database's load on a site of its own
  (benchmarks/smallwrite_bench.py): real agent streams, 4 to 16 KiB writes,
  a commit (one journaled batch) each few ms on each of ``--disks`` disks;
  the RPO while it runs, the time to drain once it stops, the backlogs;
- fs: ext4 made by the kernel on the capture's export (nbdfuse and a loop
  device), SQLite committing 100 times a second on it, an app-consistent tag
  every 5 s (benchmarks/fs_bench.py); the RPO, and every tag recovered,
  checked by e2fsck, mounted, and its database whole (root only);
- resync: resync_bench.py (agent sync beside rsync on a changed image);
- initial: initial_copy_bench.py (agent sync beside rsync and restic backup
  of a whole image).

With ``--profile-daemons``, py-spy samples both daemons through full's
measured window (benchmarks/daemon_profile.py): the raw stacks go into the
results folder, each daemon's top functions into the JSON and the log.

Prints a table (``--json``: one JSON object on stdout, the table on
stderr), and writes results.json and a plot of throughput and RPO over the
run into ``--results`` (default benchmarks/results/TIMESTAMP/). Progress goes
to stderr, live on a terminal. ``--quick`` shortens every phase so the
whole run takes about three minutes on two cores.
Run: ``.venv/bin/python benchmarks/run.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (
    daemon_profile,
    fs_bench,
    initial_copy_bench,
    resync_bench,
    smallwrite_bench,
)
from benchmarks.daemon_profile import ProfileSummary, profile_daemons, profile_table
from benchmarks.deploy import default_dir
from benchmarks.floor import measure_floor
from benchmarks.phases import Runner, load_figures, per_disk_rpo
from benchmarks.protocol_bench import pipeline_limit
from benchmarks.report import headline, judge, table, timeline, write_results
from benchmarks.site import Site, running_site, start_site
from benchmarks.sitemetrics import PS_CACHE
from benchmarks.workload import (
    MAX_BLOCK_BYTES,
    MIN_BLOCK_BYTES,
    POOL_BYTES,
    Profile,
    Source,
    data_pool,
)
from runtime.config import TlsFiles

PHASES: Final = (
    "full", "half", "mt-down", "many", "smallwrite", "fs", "resync", "initial",
)  # fmt: skip
#: Write data per batch: an agent sends what it captured in about a tenth
#: of a second; 1 MiB keeps per-request costs small beside per-byte ones.
BATCH_BYTES: Final = 2**20
#: Each disk of the load site: writes land on its slots. Big enough that
#: random 64 KiB writes rarely hit the same slot twice in a batch, small
#: enough that eight of them fully written fit in RAM (/dev/shm).
LOAD_DISK_BYTES: Final = 128 * 2**20
#: The many-disk site: each disk small (only a few MiB are ever written)...
MANY_DISK_BYTES: Final = 16 * 2**20
#: ...and written every few seconds: a lightly used server's disk (16 KiB/s
#: of 64 KiB writes; 256 disks make 64 requests a second, which two shared
#: cores sustain, where one a second per disk already built a backlog).
MANY_WRITE_INTERVAL_S: Final = 4.0
#: The half-load phase runs at this share of full's applied rate.
HALF_LOAD: Final = 0.5
#: Seconds the master target may take to apply the backlog a phase left.
DRAIN_TIMEOUT_S: Final = 120.0
#: Rounds of the bare pipeline limit, the best kept: a neighbour's burst
#: slows one round, rarely all three.
LIMIT_ROUNDS: Final = 3
#: Changed share of the image in the resync phase (resync_bench's default).
RESYNC_CHANGED_PERCENT: Final = 3.0


@dataclass(frozen=True)
class Plan:
    """How long each phase runs: measured seconds after a warm-up each."""

    full_s: float
    half_s: float
    mt_down_s: float
    many_s: float
    warmup_s: float
    #: long enough for every disk's first point and one RPO evaluation after
    many_warmup_s: float
    #: the resync's image: 2 GiB even when quick, the size its target is set
    #: at (on a small image the agent's start, not the comparing, is timed)
    resync_mib: int
    initial_mib: int
    rounds: int
    #: seconds of the database load
    smallwrite_s: float


FULL_PLAN: Final = Plan(60, 60, 30, 60, 5, 12, 2048, 2048, 3, 60)
#: Two or three RPO evaluations (every 5 s) per phase: enough for every key;
#: the peers' best of three rounds each, as one round is at the mercy of the
#: machine's other work for a few seconds.
QUICK_PLAN: Final = Plan(8, 10, 10, 15, 2, 8, 2048, 256, 3, 15)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def site_phases(
    site: Site,
    *, blocks: list[bytes], profile: Profile, plan: Plan, want: set[str],
    notes: list[str], profile_into: Path | None = None,
) -> tuple[dict[str, Any], Runner]:  # fmt: skip
    """full, half and mt-down on one site; each phase's figures by name. With
    ``profile_into``, the daemons are sampled (py-spy) through full's window."""
    out: dict[str, Any] = {}
    profiles: dict[str, ProfileSummary] = {}

    async def sampled() -> None:
        pids = {name: pid for name, pid in (("ps", site.ps_pid), ("mt", site.mt_pid)) if pid}
        assert profile_into is not None
        profiles.update(await profile_daemons(pids, plan.full_s - 1, profile_into))

    # The site's disks may be smaller than ours (running daemons); a rate is shared by them.
    size = min(profile.disk_bytes, site.disk_bytes) // profile.block_bytes * profile.block_bytes
    rate = profile.rate_Bps / len(site.disks) if profile.rate_Bps is not None else None
    profile = dataclasses.replace(profile, disk_bytes=size, rate_Bps=rate)
    async with Runner(site, label="load") as runner:
        sources = site.sources(blocks, profile)
        if "full" in want:
            runner.say(
                f"full: {len(sources)} disks, {_describe(profile)}, {_span(plan, plan.full_s)}"
            )
            phase = await runner.load(
                "full", sources, seconds=plan.full_s, warmup_s=plan.warmup_s,
                during=sampled if profile_into is not None else None,
            )  # fmt: skip
            out["full"] = {
                **load_figures(runner, phase), "disks": len(sources),
                "ps_rss_MiB": site.peak_rss_mib("ps"), "mt_rss_MiB": site.peak_rss_mib("mt"),
            }  # fmt: skip
            if profiles:
                out["full"]["profile"] = {name: p.to_json() for name, p in profiles.items()}
                runner.say("full: profiles\n" + profile_table(profiles))
            out["full"]["drain_s"] = await runner.drain(sources, DRAIN_TIMEOUT_S)
            full = out["full"]
            runner.say(f"full: applied {full['e2e_MBps']} MB/s, acked {full['acked_MBps']} MB/s")
        if "half" in want and "full" in out:
            rate = HALF_LOAD * out["full"]["e2e_MBps"] * 1e6 / len(sources)
            half = dataclasses.replace(profile, rate_Bps=max(rate, 1.0))
            runner.say(f"half: {_describe(half)} per disk, {_span(plan, plan.half_s)}")
            sources = site.sources(blocks, half)
            phase = await runner.load("half", sources, seconds=plan.half_s, warmup_s=plan.warmup_s)
            out["half"] = {**load_figures(runner, phase), "mt_rss_MiB": site.peak_rss_mib("mt")}
            out["half"]["drain_s"] = await runner.drain(sources, DRAIN_TIMEOUT_S)
            half_out = out["half"]
            runner.say(
                f"half: RPO p99 {half_out['rpo_p99_s']} s, ack p99 {half_out['ack_p99_ms']} ms"
            )
        elif "half" in want:
            notes.append("half: not run, as it throttles to half of what full measures")
        if "mt-down" in want and site.mt_pid is None:
            notes.append("mt-down: not run, as it needs the master target's process id (--mt-pid)")
        elif "mt-down" in want:
            out["mt_down"] = await _mt_down(runner, site.sources(blocks, profile), plan)
    return out, runner


async def _mt_down(runner: Runner, sources: Sequence[Source], plan: Plan) -> dict[str, Any]:
    site = runner.site
    rss: list[float | None] = []

    async def frozen() -> None:
        site.freeze_mt(True)
        try:
            await asyncio.sleep(plan.mt_down_s)
            rss.append(site.peak_rss_mib("ps"))
        finally:
            site.freeze_mt(False)

    runner.say(f"mt-down: full load, the master target frozen for {plan.mt_down_s:g} s")
    phase = await runner.load(
        "mt-down", sources, seconds=plan.mt_down_s, warmup_s=plan.warmup_s, during=frozen
    )
    figures = load_figures(runner, phase)
    cache = runner.sampler.ps_peak(PS_CACHE, phase.measured_from, phase.ended)
    out = {
        "ps_rss_MiB": rss[0],
        "acked_MBps": figures["acked_MBps"],
        "refusals_503": figures["refusals_503"],
        "cache_full": bool(figures["refusals_503"]),
        "ps_cache_peak_MiB": None if cache is None else round(cache / 2**20, 1),
        "drain_s": await runner.drain(sources, DRAIN_TIMEOUT_S),
    }
    runner.say(
        f"mt-down: process server peak RSS {out['ps_rss_MiB']} MiB, drained in {out['drain_s']} s"
    )
    return out


async def many_phase(site: Site, blocks: list[bytes], plan: Plan) -> tuple[dict[str, Any], Runner]:
    block = len(blocks[0])
    profile = Profile(
        block_bytes=block, writes_per_batch=1, pattern="random", disk_bytes=MANY_DISK_BYTES,
        rate_Bps=block / MANY_WRITE_INTERVAL_S,
    )  # fmt: skip
    async with Runner(site, label="many") as runner:
        runner.say(f"many: {len(site.disks)} disks, {_describe(profile)} each, "
            f"{plan.many_warmup_s:g}+{plan.many_s:g} s")  # fmt: skip
        sources = site.sources(blocks, profile)
        phase = await runner.load("many", sources, seconds=plan.many_s, warmup_s=plan.many_warmup_s)
        out = {
            **load_figures(runner, phase), **per_disk_rpo(runner, phase),
            "disks": len(site.disks), "ps_rss_MiB": site.peak_rss_mib("ps"),
            "mt_rss_MiB": site.peak_rss_mib("mt"),
        }  # fmt: skip
    log(f"many: worst disk's RPO {out.get('rpo_worst_disk_s')} s, "
        f"median disk's {out.get('rpo_median_disk_s')} s")  # fmt: skip
    return out, runner


def smallwrite_phase(args: argparse.Namespace, plan: Plan, root: Path) -> dict[str, Any]:
    """The database load on a site of its own (benchmarks/smallwrite_bench.py)."""
    commits = smallwrite_bench.DEFAULT_COMMITS_PER_S
    log(f"smallwrite: {args.disks} disks, {commits:g} commits/s each of 4-16 KiB writes, "
        f"{plan.smallwrite_s:g} s")  # fmt: skip
    site = start_site(root / "smallwrite", args.disks, disk_bytes=smallwrite_bench.DISK_BYTES)
    try:
        out = uvloop.run(
            smallwrite_bench.measure(
                site, root / "smallwrite", commits=commits, seconds=plan.smallwrite_s,
                seed=args.seed,
            )
        )  # fmt: skip
    finally:
        site.stop()
    log(f"smallwrite: RPO p99 {out['smallwrite_rpo_p99_s']} s, max {out['smallwrite_rpo_max_s']}"
        f" s, drained in {out['smallwrite_drain_s']} s")  # fmt: skip
    return out


def fs_phase(args: argparse.Namespace, plan: Plan, root: Path) -> dict[str, Any]:
    """A kernel file system on the capture's export (benchmarks/fs_bench.py)."""
    log(f"fs: ext4 on the capture's export, SQLite {fs_bench.DEFAULT_COMMITS_PER_S:g} commits/s,"
        f" a tag every {fs_bench.DEFAULT_TAG_EVERY_S:g} s, {plan.smallwrite_s:g} s")  # fmt: skip
    (root / "fs").mkdir()
    out = fs_bench.measure(
        root / "fs", commits=fs_bench.DEFAULT_COMMITS_PER_S, seconds=plan.smallwrite_s,
        tag_every=fs_bench.DEFAULT_TAG_EVERY_S, seed=args.seed,
    )  # fmt: skip
    log(f"fs: RPO p99 {out['fs_rpo_p99_s']} s, max {out['fs_rpo_max_s']} s; "
        f"{out['fs_tags_whole']} of {out['fs_tags']} tags whole")  # fmt: skip
    return out


def _span(plan: Plan, seconds: float) -> str:
    return f"{plan.warmup_s:g} s warm-up + {seconds:g} s measured"


def _describe(profile: Profile) -> str:
    rate = "open throttle" if profile.rate_Bps is None else f"{profile.rate_Bps / 1e6:.2f} MB/s"
    return (f"{profile.block_bytes // 1024} KiB {profile.pattern} writes, "
            f"{profile.writes_per_batch} per batch, {rate}")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every phase short: about 3 minutes")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated, of {','.join(PHASES)} (all)")  # fmt: skip
    parser.add_argument("--disks", type=int, default=8, help="disks of the load phases (8)")
    parser.add_argument("--block-size", type=int, default=64 * 2**10,
                        help=f"bytes per write, {MIN_BLOCK_BYTES}..{MAX_BLOCK_BYTES}")  # fmt: skip
    parser.add_argument("--pattern", choices=("random", "sequential"), default="random")
    parser.add_argument("--rate", type=float, metavar="MBPS",
                        help="MB/s in all for the full phase (default: open throttle)")  # fmt: skip
    parser.add_argument("--duration", type=float, metavar="S",
                        help="measured seconds of each load phase (60)")  # fmt: skip
    parser.add_argument("--many-disks", type=int, default=256, help="disks of many (256)")
    parser.add_argument(
        "--image-mib", type=int, help="image of resync and initial (2048; --quick: 2048, 256)"
    )
    parser.add_argument("--tar-of", metavar="DIR", help="write data cut from a tar of DIR")
    parser.add_argument("--dir", help="where the sites' files go (default: /dev/shm)")
    parser.add_argument("--results", metavar="DIR",
                        help="results folder (default: benchmarks/results/TIMESTAMP)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile-daemons", action="store_true",
                        help="sample both daemons with py-spy through full; the stacks go "
                        "into the results folder, the top functions into the JSON")  # fmt: skip
    running = parser.add_argument_group(
        "running daemons",
        "drive these instead of starting a site for full, half and mt-down (their disks are "
        "overwritten with test data); many, resync and initial start sites of their own",
    )
    running.add_argument("--ps-url", help="process server data API, https://HOST:PORT")
    running.add_argument("--mt-metrics-url", help="master target metrics, http://HOST:PORT")
    running.add_argument("--ps-metrics-url", help="process server metrics, http://HOST:PORT")
    running.add_argument("--ca", help="the deployment's CA certificate (PEM)")
    running.add_argument("--cert", help="a protected machine's client certificate (PEM)")
    running.add_argument("--key", help="its private key (PEM)")
    running.add_argument("--disk-ids", help="comma-separated disks of that machine to drive")
    running.add_argument("--ps-pid", type=int, help="for CPU and memory figures")
    running.add_argument("--mt-pid", type=int, help="for CPU, memory and the mt-down phase")
    args = parser.parse_args(argv)
    want = set(args.phases.split(","))
    if args.profile_daemons and not daemon_profile.available():
        parser.error("--profile-daemons: expected py-spy on the PATH (pip install py-spy)")
    if not want <= set(PHASES):
        parser.error(f"--phases: expected some of {','.join(PHASES)}, found {args.phases}")
    if args.ps_url and not all((args.mt_metrics_url, args.ca, args.cert, args.key, args.disk_ids)):
        parser.error("--ps-url: expected --mt-metrics-url, --ca, --cert, --key and --disk-ids too")
    if min(args.disks, args.many_disks) < 1 or (args.duration is not None and args.duration <= 0):
        parser.error(
            f"expected at least one disk and a positive duration, found --disks {args.disks}, "
            f"--many-disks {args.many_disks}, --duration {args.duration}"
        )
    try:
        # rate_Bps: all disks together here; the site's share per disk in site_phases
        args.profile = Profile(
            block_bytes=args.block_size, writes_per_batch=max(1, BATCH_BYTES // args.block_size),
            pattern=args.pattern, disk_bytes=LOAD_DISK_BYTES,
            rate_Bps=args.rate * 1e6 if args.rate is not None else None,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(f"--block-size or --rate: {exc}")
    args.want = want
    return args


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.duration:
        plan = dataclasses.replace(plan, full_s=args.duration, half_s=args.duration,
                                   mt_down_s=args.duration, many_s=args.duration,
                                   smallwrite_s=args.duration)  # fmt: skip
    if args.image_mib:
        plan = dataclasses.replace(plan, resync_mib=args.image_mib, initial_mib=args.image_mib)
    return plan


def _load_site(args: argparse.Namespace, root: Path) -> Site:
    if args.ps_url:
        tls = TlsFiles(ca_file=Path(args.ca), cert_file=Path(args.cert), key_file=Path(args.key))
        return running_site(
            ps_url=args.ps_url, mt_metrics=args.mt_metrics_url, ps_metrics=args.ps_metrics_url,
            tls=tls, disks=[d for d in args.disk_ids.split(",") if d], ps_pid=args.ps_pid,
            mt_pid=args.mt_pid,
        )  # fmt: skip
    return start_site(root / "load", args.disks, disk_bytes=LOAD_DISK_BYTES)


def measure(args: argparse.Namespace, plan: Plan, base: Path, notes: list[str]) -> tuple[
    dict[str, Any], list[Runner]
]:  # fmt: skip
    """Every phase asked for; figures by phase, and the runners of the load phases."""
    want = args.want
    pools = resync_bench.make_pools(args.seed) if want & {"resync", "initial"} else None
    tar = Path(args.tar_of) if args.tar_of else None
    if pools and args.block_size == resync_bench.CHUNK and tar is None:
        # datagen makes the same blocks for a seed: the image's pool starts with the load's.
        blocks = pools[0][: POOL_BYTES // args.block_size]
    else:
        blocks = data_pool(args.block_size, seed=args.seed, tar_of=tar)
    profile = args.profile
    cores = len(os.sched_getaffinity(0))
    log(f"pipeline limit: bare zstd, AES-GCM, decrypt, decompress and pwrite on {cores} cores")
    limit = pipeline_limit(
        blocks, profile.writes_per_batch, rounds=LIMIT_ROUNDS, directory=base, cores=cores
    )
    log("floor: TLS, encode, seal, verify, before-images and pwrite, per GB of the run's data")
    floor = measure_floor(
        blocks, profile.writes_per_batch, directory=base, cores=cores, rounds=LIMIT_ROUNDS
    )
    figures: dict[str, Any] = {"limit": {
        "limit_MBps": round(limit.limit_MBps, 1), "cores": cores,
        "encode_MBps": round(limit.encode_MBps, 1), "decode_MBps": round(limit.decode_MBps, 1),
        "pwrite_MBps": round(limit.pwrite_MBps, 1), "cpu_s_per_GB": round(limit.cpu_s_per_GB, 2),
    }, "floor": floor.figures()}  # fmt: skip
    runners: list[Runner] = []
    root = Path(tempfile.mkdtemp(prefix="blockrepl-run-", dir=base))
    try:
        if want & {"full", "half", "mt-down"}:
            site = _load_site(args, root)
            try:
                out, runner = uvloop.run(
                    site_phases(
                        site,
                        blocks=blocks,
                        profile=profile,
                        plan=plan,
                        want=want,
                        notes=notes,
                        profile_into=args.profile_into,
                    )
                )
            finally:
                site.stop()
            figures.update(out)
            runners.append(runner)
        if "many" in want and args.ps_url:
            notes.append("many: not run against running daemons (it needs a site of its own)")
        elif "many" in want:
            site = start_site(root / "many", args.many_disks, disk_bytes=MANY_DISK_BYTES)
            try:
                figures["many"], runner = uvloop.run(many_phase(site, blocks, plan))
            finally:
                site.stop()
            runners.append(runner)
        if "smallwrite" in want and args.ps_url:
            notes.append("smallwrite: not run against running daemons (it needs a site of its own)")
        elif "smallwrite" in want:
            figures["smallwrite"] = smallwrite_phase(args, plan, root)
        if "fs" in want and (missing := fs_bench.missing_peers()):
            notes.append(f"fs: not run, as it needs {', '.join(missing)}")
        elif "fs" in want:
            figures["fs"] = fs_phase(args, plan, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures.update(peer_phases(args, plan, base, pools, notes))
    return figures, runners


def peer_phases(
    args: argparse.Namespace, plan: Plan, base: Path,
    pools: tuple[list[bytes], list[bytes]] | None, notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """resync and initial, as asked: resync_bench.py and initial_copy_bench.py."""
    want = args.want
    figures: dict[str, Any] = {}
    if want & {"resync", "initial"} and shutil.which("rsync") is None:
        notes.append("resync, initial: not run, as rsync is not installed (apt-get install rsync)")
        want = want - {"resync", "initial"}
    peers = argparse.Namespace(size_mib=plan.resync_mib, changed_percent=RESYNC_CHANGED_PERCENT,
                               rounds=plan.rounds, dir=str(base), seed=args.seed)  # fmt: skip
    if "resync" in want:
        log(f"resync: {plan.resync_mib} MiB image, {RESYNC_CHANGED_PERCENT:g} % changed")
        figures["resync"] = resync_bench.run(peers, pools)
        log(f"resync: {figures['resync']['resync_s']} s, rsync {figures['resync']['rsync_s']} s")
    if "initial" in want:
        log(f"initial: {plan.initial_mib} MiB image, beside rsync and restic")
        peers.size_mib = plan.initial_mib
        figures["initial"] = initial_copy_bench.run(peers, pools)
        if "note" in figures["initial"]:
            notes.append(f"initial: {figures['initial']['note']}")
        log(f"initial: {figures['initial']['copy_s']} s, rsync {figures['initial']['rsync_s']} s, "
            f"restic {figures['initial']['restic_s']} s")  # fmt: skip
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = _plan(args)
    started, t0 = time.strftime("%Y%m%d-%H%M%S"), time.monotonic()
    results = Path(args.results or Path(__file__).resolve().parent / "results" / started)
    base = Path(args.dir) if args.dir else default_dir()
    notes: list[str] = []
    args.profile_into = results / "profile" if args.profile_daemons else None
    figures, runners = measure(args, plan, base, notes)
    result: dict[str, Any] = {**headline(figures)}
    result["targets"] = judge(result)
    result.update(
        phases=figures, notes=notes, duration_s=round(time.monotonic() - t0, 1),
        settings={"quick": args.quick, "phases": sorted(args.want), "disks": args.disks,
                  "block_bytes": args.block_size, "pattern": args.pattern, "rate_MBps": args.rate,
                  "many_disks": args.many_disks, "data": f"tar of {args.tar_of}" if args.tar_of
                  else "synthetic mix (benchmarks/datagen.py)", "dir": str(base),
                  "plan": dataclasses.asdict(plan), "cpu_count": os.cpu_count()},
        results=str(results),
    )  # fmt: skip
    plot = write_results(results, result, timeline(runners, t0))
    for note in notes:
        log(f"note: {note}")
    log(plot)
    if args.json:
        log(table(result))
        print(json.dumps(result))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
