#!/usr/bin/env python3
"""Initial copy of a disk image: ``blockrepl agent sync`` beside rsync and restic.

An image of disk-like data (benchmarks/datagen.py, as resync_bench.py makes
it; 2 GiB by default) is copied, from nothing, three ways, each timed:

- copy_s: ``blockrepl agent sync`` onto an empty (all-zero) target of a
  real ``mastertarget serve`` behind a real ``processserver serve`` on
  loopback with mutual TLS, until the master target applied the last batch
  (resync_bench.py's ``run_resync``; the target is then checked equal);
- rsync_s: ``rsync --inplace --no-whole-file -I`` of the image to an rsync
  daemon on 127.0.0.1 that does not have it (resync_bench.py's
  ``run_rsync``; the copy is then checked equal);
- restic_s: ``restic backup`` of the image into a new local repository
  (``restic init`` is not timed), when restic is installed. The repository
  is of format version 2, which compresses (zstd, as blockrepl does;
  restic 0.14's default format, version 1, stores data uncompressed);
  there is no network in between.

Reported beside the times: the bytes each side sent or stored, and the CPU
seconds of each. The folder defaults to RAM (/dev/shm), so the figures
measure the software, not the storage.
Run: ``.venv/bin/python benchmarks/initial_copy_bench.py [--json] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.deploy import default_dir
from benchmarks.resync_bench import (
    RUN_TIMEOUT_S,
    children_cpu_s,
    make_pools,
    run_resync,
    run_rsync,
    write_image,
)

#: The password of the throw-away restic repository of one run (restic
#: encrypts every repository; this one is deleted with the run's folder).
RESTIC_PASSWORD: Final = "initial-copy-bench"  # noqa: S105


def run_restic(root: Path, source: Path) -> dict[str, Any]:
    """``restic backup`` of ``source`` into a new repository under ``root``.

    Raises:
        SystemExit: restic failed, or its summary is missing.
    """
    restic = shutil.which("restic")
    assert restic is not None
    env = {
        **os.environ,
        "RESTIC_REPOSITORY": str(root / "restic"),
        "RESTIC_PASSWORD": RESTIC_PASSWORD,
        "RESTIC_CACHE_DIR": str(root / "restic-cache"),
    }
    init = subprocess.run(  # noqa: S603 - restic from PATH, our arguments
        [restic, "init", "--repository-version", "2"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if init.returncode != 0:
        raise SystemExit(f"initial_copy_bench: restic init failed:\n{init.stderr}")
    cpu_before = children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603
        [restic, "backup", "--json", str(source)], env=env, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"initial_copy_bench: restic backup failed:\n{done.stderr}")
    messages = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    summary = next((m for m in messages if m.get("message_type") == "summary"), None)
    if summary is None:
        raise SystemExit(f"initial_copy_bench: expected a restic summary, found:\n{done.stdout}")
    return {
        "seconds": elapsed,
        # restic 0.14's summary counts data added before compression: what it
        # stored is what its repository holds.
        "stored_bytes": sum(f.stat().st_size for f in (root / "restic").rglob("*") if f.is_file()),
        "cpu_s": children_cpu_s() - cpu_before,
    }


def run(args: argparse.Namespace, pools: tuple[list[bytes], list[bytes]] | None = None) -> dict[
    str, object
]:  # fmt: skip
    """One copy each way; ``pools`` as resync_bench.make_pools makes them."""
    pools = pools or make_pools(args.seed)
    base = Path(args.dir) if args.dir else default_dir()
    root = Path(tempfile.mkdtemp(prefix="initial-copy-bench-", dir=base))
    try:
        source = root / "source.raw"
        write_image(source, args.size_mib * 2**20, pools[0], args.seed)
        (root / "ours").mkdir()
        target = root / "ours" / "target.raw"
        with target.open("wb") as empty:
            empty.truncate(source.stat().st_size)
        ours = run_resync(root / "ours", source, target)
        target.unlink()
        (root / "rsync").mkdir()
        peer = run_rsync(root, source, root / "rsync" / "disk.raw")
        (root / "rsync" / "disk.raw").unlink()
        restic = run_restic(root, source) if shutil.which("restic") else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = ours["report"]
    result: dict[str, object] = {
        "copy_s": round(ours["seconds"], 3),
        "rsync_s": round(peer["seconds"], 3),
        "restic_s": round(restic["seconds"], 3) if restic else None,
        "rsync_over_copy": round(peer["seconds"] / ours["seconds"], 2),
        "restic_over_copy": round(restic["seconds"] / ours["seconds"], 2) if restic else None,
        "disk_bytes": args.size_mib * 2**20,
        "sent_bytes": report["sent_bytes"],
        "rsync_sent_bytes": peer["sent_bytes"],
        "restic_stored_bytes": restic["stored_bytes"] if restic else None,
        "agent_cpu_s": round(ours["agent_cpu_s"], 2),
        "ps_cpu_s": round(ours["ps_cpu_s"], 2),
        "mt_cpu_s": round(ours["mt_cpu_s"], 2),
        "rsync_client_cpu_s": round(peer["client_cpu_s"], 2),
        "restic_cpu_s": round(restic["cpu_s"], 2) if restic else None,
        "dir": str(base),
    }
    if restic is None:
        result["note"] = "restic is not installed (apt-get install restic): its figures are null"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a 256 MiB image")
    parser.add_argument("--size-mib", type=int, default=2048, help="image size in MiB (2048)")
    parser.add_argument("--dir", help="where the files go (default: /dev/shm)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib = 256
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"initial copy of a {args.size_mib} MiB image, in {result['dir']}")
    for key in ("copy_s", "rsync_s", "restic_s", "sent_bytes", "rsync_sent_bytes",
                "restic_stored_bytes", "agent_cpu_s", "ps_cpu_s", "mt_cpu_s",
                "rsync_client_cpu_s", "restic_cpu_s"):  # fmt: skip
        print(f"{key:<20}{result[key]!s:>14}")
    if "note" in result:
        print(result["note"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
