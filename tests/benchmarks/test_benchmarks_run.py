"""The benchmark programs run and report every figure (their speed is not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_binary, require_root

ROOT = Path(__file__).resolve().parents[2]


def test_bench_prints_one_json_object_with_every_figure() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "protocol_bench.py"), "--json",
         "--megabytes", "2", "--rounds", "1"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    result = json.loads(out.stdout)
    for key in ("encode_MBps", "decode_MBps", "limit_encode_MBps", "limit_decode_MBps"):
        assert result[key] > 0
    assert 1.5 < result["compression_ratio"] < 4
    assert result["data_bytes"] == 2 * 2**20


def test_bench_reads_a_tar_of_files(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"f{i}.txt").write_text(f"line {i}\n" * 2000)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "protocol_bench.py"), "--json",
         "--megabytes", "1", "--rounds", "1", "--tar-of", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["data_source"].startswith("tar of")
    assert result["compression_ratio"] > 3


def test_apply_bench_reports_each_backend(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mt_apply_bench.py"), "--json",
         "--files", "4", "--writes-per-file", "4", "--disk-mib", "16", "--rounds", "1",
         "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    result = json.loads(out.stdout)
    for backend in ("raw", "vmdk_sparse"):
        assert result[backend]["apply_MBps"] > 0
        assert result[backend]["limit_MBps"] > 0
    assert result["setup"]["data_bytes"] == 16 * 65536


def test_recover_bench_reports_recover_and_copy(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recover_bench.py"), "--json", "--quick",
         "--rounds", "1", "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["recover_s"] > 0
    assert result["copy_s"] > 0
    assert result["ratio"] > 0
    assert result["disk_bytes"] == 64 * 2**20
    assert result["changed_bytes"] == 16 * 2**20
    assert 0 < result["undo_bytes"] < result["changed_bytes"] + 2**20
    assert result["dir"] == str(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the run's folder is removed


def test_ingest_bench_reports_every_figure() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ps_ingest_bench.py"), "--json", "--quick",
         "--sources", "2"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    result = json.loads(out.stdout)
    for key in ("ingest_MBps", "ack_p50_ms", "ack_p99_ms", "cpu_s_per_GB", "ps_rss_MiB",
                "limit_encode_MBps", "ingest_vs_limit", "ps_rss_MiB_mt_down",
                "ingest_MBps_mt_down", "batch_bytes", "duration_s", "floor_MBps",
                "ingest_vs_floor", "ps_floor_s_per_GB", "mt_floor_s_per_GB"):  # fmt: skip
        assert result[key] > 0, key
    steps = result["floor_steps_s_per_GB"]
    assert set(steps) == {"encode", "check", "seal", "store", "verify", "before_image", "pwrite",
                          "tls_encrypt", "tls_decrypt"}  # fmt: skip
    assert all(seconds > 0 for seconds in steps.values()), steps
    # the process server's floor is its steps: TLS in, the check, sealing, the
    # store, and TLS out on fewer bytes
    own = steps["tls_decrypt"] + steps["check"] + steps["seal"] + steps["store"]
    assert own < result["ps_floor_s_per_GB"] < own + steps["tls_encrypt"]
    assert result["sources"] == 2
    assert result["cache_full"] is True  # the master target down, the cache filled up


def test_resync_bench_reports_ours_and_rsync(tmp_path: Path) -> None:
    require_binary("rsync")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "resync_bench.py"), "--json",
         "--size-mib", "64", "--rounds", "1", "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.stdout)
    for key in ("resync_s", "rsync_s", "speedup", "sent_bytes", "hash_bytes", "rsync_sent_bytes",
                "agent_cpu_s", "ps_cpu_s", "mt_cpu_s"):  # fmt: skip
        assert result[key] > 0, key
    assert result["disk_bytes"] == 64 * 2**20
    assert result["changed_chunks"] == round(1024 * 0.03)
    assert result["differing_chunks"] == result["changed_chunks"]
    assert result["changed_bytes"] <= result["sent_bytes"] <= 1.1 * result["changed_bytes"]
    assert list(tmp_path.iterdir()) == []  # the run's folder is removed


def test_smallwrite_bench_reports_the_rpo_of_a_database_load(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "smallwrite_bench.py"), "--json",
         "--disks", "2", "--commits", "50", "--seconds", "2", "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    result = json.loads(out.stdout)
    for key in ("smallwrite_rpo_p50_s", "smallwrite_rpo_p99_s", "smallwrite_rpo_max_s",
                "smallwrite_drain_s", "agent_backlog_peak_MiB", "ps_backlog_peak_MiB"):  # fmt: skip
        assert result[key] >= 0, key
    # every commit was applied (the run waits for it), and each went in a batch
    assert 0 < result["smallwrite_rpo_max_s"] < 120
    assert 50 < result["commits_per_s"] <= 1.1 * 100  # the rate kept, as far as it could be
    assert 0 < result["wire_batches_per_commit"] <= 1
    assert list(tmp_path.iterdir()) == []  # the run's folder is removed


def test_wan_bench_reports_each_setting_through_its_links(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "wan_bench.py"), "--json",
         "--size-mib", "24", "--disks", "2", "--commits", "50", "--seconds", "2",
         "--rtt-ms", "10", "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert [r["in_flight_per_disk"] for r in result["database"]] == [1, 2]
    assert [r["in_flight_per_disk"] for r in result["sync"]] == [1, 2]
    for run in result["database"]:
        assert 0 < run["smallwrite_rpo_max_s"] < 120
        assert run["commits_per_s"] > 50
    for run in result["sync"]:  # the target was compared with the image, equal
        assert run["seconds"] > 0
        # the image crossed both links (the second hop carries it compressed)
        assert run["agent_to_ps_bytes"] >= run["sent_bytes"] > 0
        assert run["ps_to_mt_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # the run's folder is removed


def test_fs_bench_recovers_every_tag_whole(tmp_path: Path) -> None:
    """The kernel file-system phase: SQLite on ext4 on the capture's export, tags
    taken under load, each recovered and checked by e2fsck, the kernel and SQLite."""
    require_root("a loop device and a FUSE mount")
    for peer in ("nbdkit", "nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fsfreeze"):
        require_binary(peer)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fs_bench.py"), "--json", "--seconds", "6",
         "--tag-every", "2", "--commits", "50", "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["fs_tags"] >= 2, result
    assert result["fs_tags_whole"] == result["fs_tags"], result["tags"]
    for check in result["tags"]:
        assert check["integrity"] == "ok"
        assert check["rows_before"] <= check["rows"] <= check["rows_after"]
    for key in ("fs_rpo_p50_s", "fs_rpo_p99_s", "fs_rpo_max_s", "fs_drain_s"):
        assert result[key] >= 0, key
    assert result["fs_commits_per_s"] > 2  # the database committed all along
    assert result["fs_paused_commits_per_s"] > 2  # with replication stopped
    assert result["fs_bare_commits_per_s"] > 2  # and on the peer: the same volume, bare NBD
    assert list(tmp_path.iterdir()) == []  # the run's folder is removed
