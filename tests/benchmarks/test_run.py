"""benchmarks/run.py drives real daemons and hands over every figure (its speed is not
asserted): one JSON object on stdout, the table and progress on stderr, the results
folder with the JSON and the plot."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.run import PHASES
from benchmarks.site import start_site
from benchmarks.workload import Profile, Source, connected, data_pool, drive
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "benchmarks" / "run.py"


def _run(*args: str, timeout: float = 240) -> tuple[dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, str(RUN), "--json", *args],
        check=True, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return json.loads(done.stdout), done.stderr


def test_load_phases_report_from_the_daemons(tmp_path: Path) -> None:
    result, stderr = _run(
        # 6 s measured: every window holds one of the master target's RPO evaluations (5 s).
        "--quick", "--phases", "full,half,mt-down,many", "--duration", "6", "--disks", "3",
        "--many-disks", "12", "--results", str(tmp_path / "results"), "--dir", str(tmp_path),
    )  # fmt: skip
    for key in ("e2e_MBps", "limit_MBps", "acked_MBps", "ack_p50_ms", "ack_p99_ms",
                "ack_p999_ms", "rpo_p50_s", "rpo_p99_s", "rpo_max_s", "ps_cpu_s_per_GB",
                "mt_cpu_s_per_GB", "ps_rss_MiB", "ps_rss_mt_down_MiB", "mt_rss_MiB",
                "compression_ratio", "wire_in_MB", "wire_out_MB",
                "many_rpo_worst_over_median", "floor_MBps", "ps_floor_s_per_GB",
                "mt_floor_s_per_GB"):  # fmt: skip
        value = result[key]
        assert isinstance(value, float), key
        assert value > 0, key
    phases = result["phases"]
    assert isinstance(phases, dict)
    assert phases["half"]["rpo_evaluations"] >= 3  # every disk evaluated in the window
    assert phases["many"]["disks_with_rpo"] == 12
    assert phases["mt_down"]["drain_s"] is not None  # applied all once it ran again
    assert 1.5 < float(result["compression_ratio"]) < 4  # datagen's mix, sealed
    # what went to the master target is the sealed data, less than what came in
    assert float(result["wire_out_MB"]) < float(result["wire_in_MB"])
    targets = result["targets"]
    assert isinstance(targets, dict)
    assert targets["resync_vs_rsync"] is None  # not run
    for target in ("e2e_vs_limit", "half_load_rpo", "ps_rss_mt_down", "many_disks_rpo"):
        assert isinstance(targets[target], bool), target
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert saved["e2e_MBps"] == result["e2e_MBps"]
    assert {p["name"] for p in saved["timeline"]["phases"]} == {"full", "half", "mt-down", "many"}
    assert "e2e_vs_limit" in stderr  # the table
    assert "full: applied" in stderr  # progress
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("blockrepl-run-")] == []


def _positions(sources: list[Source]) -> list[int]:
    """The process server's next seq of each source's disk."""

    async def read() -> list[int]:
        async with connected(sources):
            return [s.next_seq for s in sources]

    return asyncio.run(read())


def test_running_daemons_are_driven_by_url(tmp_path: Path) -> None:
    site = start_site(tmp_path / "site", 2, disk_bytes=16 * 2**20)
    try:
        # The disks replicated before: the harness continues their streams.
        sources = site.sources(data_pool(65536, seed=1), Profile(65536, 4, "random", 16 * 2**20))
        asyncio.run(drive(sources, 1.0))
        before = _positions(sources)
        disk, tls = site.disks[0]
        result, _ = _run(
            "--quick", "--phases", "full,mt-down", "--duration", "2",
            "--ps-url", site.ps_url, "--mt-metrics-url", site.mt_metrics,
            "--ca", str(tls.ca_file), "--cert", str(tls.cert_file), "--key", str(tls.key_file),
            "--disk-ids", disk, "--results", str(tmp_path / "results"),
        )  # fmt: skip
        after = _positions(sources)
    finally:
        site.stop()
    assert after[0] > before[0] > 1  # the stream went on where it stood
    assert after[1] == before[1]  # the disk not asked for was left alone
    assert isinstance(result["e2e_MBps"], float)
    assert result["e2e_MBps"] > 0
    # no process ids, no process server metrics: those figures are not made up
    for key in ("ps_rss_MiB", "mt_rss_MiB", "ps_cpu_s_per_GB", "compression_ratio"):
        assert result[key] is None, key
    assert any("mt-down: not run" in note for note in result["notes"])  # type: ignore[attr-defined]


def test_wrong_options_say_what_was_expected() -> None:
    done = subprocess.run(
        [sys.executable, str(RUN), "--phases", "full,fast"], capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"expected some of {','.join(PHASES)}, found full,fast" in done.stderr
    done = subprocess.run(
        [sys.executable, str(RUN), "--ps-url", "https://127.0.0.1:9443"], capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "expected --mt-metrics-url, --ca, --cert, --key and --disk-ids too" in done.stderr


def test_initial_copy_bench_reports_ours_and_the_peers() -> None:
    require_binary("rsync")
    # A short folder: the master target's admin socket lives in the site, and
    # a Unix socket's path is limited to 107 bytes (pytest's tmp_path is long).
    with tempfile.TemporaryDirectory(prefix="icb-", dir="/tmp") as short:
        tmp_path = Path(short)
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "initial_copy_bench.py"), "--json",
             "--size-mib", "16", "--dir", str(tmp_path)],
            check=False, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        left = list(tmp_path.iterdir())
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in ("copy_s", "rsync_s", "sent_bytes", "rsync_sent_bytes", "agent_cpu_s"):
        assert result[key] > 0, key
    assert result["disk_bytes"] == 16 * 2**20
    # zero chunks already match an empty target: ours sends less than the image
    assert result["sent_bytes"] < result["disk_bytes"] <= result["rsync_sent_bytes"]
    if result["restic_s"] is None:
        assert "restic is not installed" in result["note"]
    else:
        assert 0 < result["restic_stored_bytes"] < result["disk_bytes"]  # compressed
    assert left == []  # the run's folder is removed
