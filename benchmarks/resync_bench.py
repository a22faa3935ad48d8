#!/usr/bin/env python3
"""Resync of a changed disk: ``blockrepl agent sync`` beside rsync, in one run.

A disk image of disk-like data (benchmarks/datagen.py; 2 GiB by default) is
on the recovery site twice: as the target of a real ``mastertarget serve``
(behind a real ``processserver serve``, both on loopback with mutual TLS),
and as the file of an rsync daemon on 127.0.0.1. Then ``--changed-percent``
of its 64 KiB chunks, chosen at random, are rewritten with new data on the
source, and each side is brought up to date:

- resync_s: ``blockrepl agent sync --json`` of the source, with a state
  directory of its own (so a new generation: the whole disk is compared),
  from the start of the command until the master target has *applied* the
  last batch — the target then equals the source (checked);
- rsync_s: ``rsync --inplace --no-whole-file -I`` of the source onto the
  daemon's copy (the delta algorithm, every block checked), until rsync
  exits — the copy then equals the source (checked).

Each side runs ``--rounds`` times on fresh copies; the best round of each
is reported, with every round's figure. Also reported: the bytes each side
sent, our digests' bytes, and the CPU seconds of the agent, the process
server and the master target during the resync. The folder defaults to
RAM (/dev/shm), so the figures measure the software, not the storage.
Run: ``.venv/bin/python benchmarks/resync_bench.py [--json] [--quick]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datagen import synthetic_blocks
from benchmarks.deploy import Deployment, cpu_seconds, default_dir, deploy, free_port
from runtime.tls import client_context

CHUNK: Final = 64 * 2**10
MACHINE: Final = "vm01"
DISK: Final = "vm01-disk0"
#: Distinct blocks the image is made of, and others the changes are drawn
#: from: generating 2 GiB of text-like data block by block would take minutes.
POOL_BLOCKS: Final = 1024
#: The process server's cache marks: far above what a resync sends.
CACHE_HIGH_BYTES: Final = 2 * 2**30
CACHE_LOW_BYTES: Final = 2**30
#: Seconds the resync or rsync may take before the run is abandoned.
RUN_TIMEOUT_S: Final = 600.0
BLOCKREPL: Final = Path(sys.executable).parent / "blockrepl"


def write_image(path: Path, size: int, blocks: list[bytes], seed: int) -> None:
    """``size`` bytes of chunks drawn from ``blocks``, the same for a seed."""
    rng = random.Random(seed)
    with path.open("wb") as image:
        for _ in range(size // CHUNK):
            image.write(blocks[rng.randrange(len(blocks))])


def change_chunks(path: Path, percent: float, blocks: list[bytes], seed: int) -> int:
    """Rewrite ``percent`` % of the chunks of ``path`` with other data; the count changed."""
    rng = random.Random(seed)
    chunks = os.path.getsize(path) // CHUNK
    chosen = rng.sample(range(chunks), round(chunks * percent / 100))
    with path.open("r+b") as image:
        for chunk in sorted(chosen):
            image.seek(chunk * CHUNK)
            old = image.read(CHUNK)
            new = blocks[rng.randrange(len(blocks))]
            while new == old:
                new = blocks[rng.randrange(len(blocks))]
            image.seek(chunk * CHUNK)
            image.write(new)
    return len(chosen)


def same_files(a: Path, b: Path) -> bool:
    with a.open("rb") as left, b.open("rb") as right:
        while True:
            x, y = left.read(16 * 2**20), right.read(16 * 2**20)
            if x != y:
                return False
            if not x:
                return True


def agent_config(dep: Deployment, root: Path, source: Path) -> Path:
    tls = dep.client_tls(MACHINE)
    path = root / "agent.toml"
    path.write_text(
        "\n".join(
            [
                f'process_servers = ["https://127.0.0.1:{dep.ps_port}"]',
                f'state_dir = "{root / "agent-state"}"',
                "[tls]",
                f'ca_file = "{tls.ca_file}"',
                f'cert_file = "{tls.cert_file}"',
                f'key_file = "{tls.key_file}"',
                "[logging]",
                'level = "warning"',
                "[[disks]]",
                f'id = "{DISK}"',
                f'source = "{source}"',
            ]
        )
        + "\n"
    )
    return path


class AppliedProbe:
    """The master target's applied position of the disk, asked over one kept
    connection: a TLS handshake per question (every 5 ms at the end of a run)
    would take the master target's CPU from the applying it is timed on."""

    def __init__(self, dep: Deployment) -> None:
        context = client_context(dep.client_tls("ps01"))
        self._connection = http.client.HTTPSConnection(
            "127.0.0.1", dep.mt_port, context=context, timeout=10
        )

    def __call__(self) -> tuple[int, int]:
        self._connection.request("GET", f"/v1/disks/{DISK}/state")
        state = json.loads(self._connection.getresponse().read())
        return int(state["applied_generation"]), int(state["applied_seq"])

    def close(self) -> None:
        self._connection.close()


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sync_until_applied(dep: Deployment, config: Path) -> tuple[float, float, dict[str, Any]]:
    """``blockrepl agent sync --json`` of the disk with ``config``, then until the
    master target applied its last batch: the seconds of both, the command's
    seconds, and its report.

    Raises:
        SystemExit: the sync failed, or the master target did not apply it in time.
    """
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - our own console script
        [str(BLOCKREPL), "agent", "sync", "--config", str(config), "--disk", DISK, "--json"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    command_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"agent sync failed:\n{done.stderr}")
    report = json.loads(done.stdout)
    last = (int(report["generation"]), int(report["last_seq"]))
    applied = AppliedProbe(dep)
    try:
        while applied() < last:
            if time.perf_counter() - started > RUN_TIMEOUT_S:
                raise SystemExit("the master target did not apply the sync")
            time.sleep(0.005)
    finally:
        applied.close()
    return time.perf_counter() - started, command_s, report


def run_resync(root: Path, source: Path, target: Path) -> dict[str, Any]:
    """Our side: the site, then ``agent sync`` until the master target applied it all."""
    dep = deploy(
        root, {MACHINE: DISK}, disk_bytes=os.path.getsize(source),
        cache_high_bytes=CACHE_HIGH_BYTES, cache_low_bytes=CACHE_LOW_BYTES,
        targets={DISK: target},
    )  # fmt: skip
    config = agent_config(dep, root, source)
    try:
        dep.mt.start()
        dep.ps.start()
        dep.mt.wait_healthy()
        dep.ps.wait_healthy()
        before = (cpu_seconds(dep.ps.pid), cpu_seconds(dep.mt.pid), children_cpu_s())
        elapsed, command_s, report = sync_until_applied(dep, config)
        after = (cpu_seconds(dep.ps.pid), cpu_seconds(dep.mt.pid), children_cpu_s())
    finally:
        dep.ps.stop()
        dep.mt.stop()
    if not same_files(source, target):
        raise SystemExit("resync_bench: the target differs from the source after the resync")
    ps_cpu, mt_cpu, agent_cpu = (b - a for a, b in zip(before, after, strict=True))
    return {
        "seconds": elapsed, "command_s": command_s, "report": report,
        "agent_cpu_s": agent_cpu, "ps_cpu_s": ps_cpu, "mt_cpu_s": mt_cpu,
    }  # fmt: skip


def run_rsync(root: Path, source: Path, copy: Path) -> dict[str, Any]:
    """The peer: an rsync daemon on 127.0.0.1 holding ``copy``, and one rsync of ``source``."""
    rsync = shutil.which("rsync")
    if rsync is None:
        raise SystemExit("resync_bench: rsync is not installed (./scripts/test installs it)")
    port = free_port()
    conf = root / "rsyncd.conf"
    conf.write_text(
        f"port = {port}\nuse chroot = false\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
        f"pid file = {root / 'rsyncd.pid'}\n[dst]\npath = {copy.parent}\nread only = false\n"
    )
    daemon = subprocess.Popen(  # noqa: S603 - rsync from PATH, our arguments
        [rsync, "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"rsync://127.0.0.1:{port}/dst/{copy.name}"
        deadline = time.monotonic() + 10
        while subprocess.run(  # noqa: S603
            [rsync, f"rsync://127.0.0.1:{port}/"], capture_output=True, check=False
        ).returncode:
            if time.monotonic() > deadline:
                raise SystemExit("resync_bench: the rsync daemon did not start")
            time.sleep(0.05)
        cpu_before = children_cpu_s()
        started = time.perf_counter()
        done = subprocess.run(  # noqa: S603
            [rsync, "--inplace", "--no-whole-file", "-I", "--stats", str(source), url],
            capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        cpu = children_cpu_s() - cpu_before
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
    if done.returncode != 0:
        raise SystemExit(f"resync_bench: rsync failed:\n{done.stderr}")
    if not same_files(source, copy):
        raise SystemExit("resync_bench: the rsync copy differs from the source")
    sent = re.search(r"Total bytes sent: ([\d,]+)", done.stdout)
    return {
        "seconds": elapsed,
        "sent_bytes": int(sent.group(1).replace(",", "")) if sent else -1,
        "client_cpu_s": cpu,
    }


def one_round(
    base: Path, args: argparse.Namespace, pools: tuple[list[bytes], list[bytes]]
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="resync-bench-", dir=base))
    try:
        source, target = root / "source.raw", root / "target.raw"
        (root / "rsync").mkdir()
        copy = root / "rsync" / "disk.raw"
        write_image(source, args.size_mib * 2**20, pools[0], args.seed)
        shutil.copyfile(source, target)
        shutil.copyfile(source, copy)
        changed = change_chunks(source, args.changed_percent, pools[1], args.seed + 1)
        ours = run_resync(root, source, target)
        peer = run_rsync(root, source, copy)
        return {"changed_chunks": changed, "ours": ours, "rsync": peer}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_pools(seed: int) -> tuple[list[bytes], list[bytes]]:
    """The chunks an image is made of, and the (non-zero) chunks changes are drawn from."""
    return (
        synthetic_blocks(POOL_BLOCKS, CHUNK, seed=seed),
        [b for b in synthetic_blocks(POOL_BLOCKS, CHUNK, seed=seed + 100) if any(b)],
    )


def run(
    args: argparse.Namespace, pools: tuple[list[bytes], list[bytes]] | None = None
) -> dict[str, object]:
    """Every round of ``args``; ``pools`` as :func:`make_pools` makes them for ``args.seed``."""
    pools = pools or make_pools(args.seed)
    base = Path(args.dir) if args.dir else default_dir()
    rounds = [one_round(base, args, pools) for _ in range(args.rounds)]
    best = min(rounds, key=lambda r: r["ours"]["seconds"])
    best_rsync = min(r["rsync"]["seconds"] for r in rounds)
    report = best["ours"]["report"]
    changed = best["changed_chunks"]
    return {
        "resync_s": round(best["ours"]["seconds"], 3),
        "rsync_s": round(best_rsync, 3),
        "speedup": round(best_rsync / best["ours"]["seconds"], 2),
        "resync_rounds_s": [round(r["ours"]["seconds"], 3) for r in rounds],
        "rsync_rounds_s": [round(r["rsync"]["seconds"], 3) for r in rounds],
        "sync_command_s": round(best["ours"]["command_s"], 3),
        "disk_bytes": args.size_mib * 2**20,
        "chunk_bytes": CHUNK,
        "changed_chunks": changed,
        "changed_bytes": changed * CHUNK,
        "differing_chunks": report["differing_chunks"],
        "sent_bytes": report["sent_bytes"],
        "hash_bytes": report["hash_bytes"],
        "hash_requests": report["hash_requests"],
        "dense_spans": report["dense_spans"],
        "sparse_spans": report["sparse_spans"],
        "rsync_sent_bytes": best["rsync"]["sent_bytes"],
        "agent_cpu_s": round(best["ours"]["agent_cpu_s"], 2),
        "ps_cpu_s": round(best["ours"]["ps_cpu_s"], 2),
        "mt_cpu_s": round(best["ours"]["mt_cpu_s"], 2),
        "rsync_client_cpu_s": round(best["rsync"]["client_cpu_s"], 2),
        "rounds": args.rounds,
        "dir": str(base),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a 256 MiB disk, one round")
    parser.add_argument("--size-mib", type=int, default=2048, help="disk size in MiB (2048)")
    parser.add_argument("--changed-percent", type=float, default=3.0,
                        help="share of 64 KiB chunks rewritten (3)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="rounds per side, best kept (2)")
    parser.add_argument("--dir", help="where the files go (default: /dev/shm)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.rounds = 256, 1
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"resync of {args.size_mib} MiB with {args.changed_percent:g} % of its 64 KiB chunks "
          f"changed, in {result['dir']}")  # fmt: skip
    for key in ("resync_s", "rsync_s", "speedup", "sent_bytes", "hash_bytes", "rsync_sent_bytes",
                "agent_cpu_s", "ps_cpu_s", "mt_cpu_s", "rsync_client_cpu_s"):  # fmt: skip
        print(f"{key:<20}{result[key]:>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
