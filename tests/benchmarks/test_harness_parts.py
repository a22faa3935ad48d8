"""The load harness's parts: what they read from the daemons, what the simulated
disks write, and how figures turn into targets and files (no timing asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from benchmarks.daemon_profile import PROJECT, summarize
from benchmarks.report import judge, table, write_results
from benchmarks.sitemetrics import MT_RPO, PS_CACHE, MtSample, Sampler, parse, percentile
from benchmarks.wanlink import WanLink
from benchmarks.workload import Profile, Source
from protocol.batch import BatchDecoder
from protocol.records import Write
from runtime.config import TlsFiles

PAGE = """\
# HELP blockrepl_mastertarget_rpo_seconds Age of the newest recovery point.
# TYPE blockrepl_mastertarget_rpo_seconds gauge
blockrepl_mastertarget_rpo_seconds{disk="a"} 1.5
blockrepl_mastertarget_rpo_seconds{disk="b"} 0.25
# TYPE blockrepl_mastertarget_disk_state gauge
blockrepl_mastertarget_disk_state{disk="a",state="replicating"} 1.0
# TYPE blockrepl_processserver_cache_bytes gauge
blockrepl_processserver_cache_bytes 4096.0
"""


def test_parse_reads_the_wanted_series_by_disk() -> None:
    series = parse(PAGE)
    assert series[MT_RPO] == {"a": 1.5, "b": 0.25}
    assert series[PS_CACHE] == {"": 4096.0}
    assert not any("disk_state" in name for name in series)  # other labels: left out


def _mt(t: float, applied: float, **rpo: float) -> MtSample:
    return MtSample(t, applied, dict(rpo), {})


def test_each_rpo_evaluation_counts_once_and_only_inside_the_window() -> None:
    sampler = Sampler("http://mt", None, ["a", "b"])
    sampler.mt = [
        _mt(1.0, 0, a=9.0, b=9.0),  # evaluated before the window opened
        _mt(2.0, 0, a=9.0, b=9.0),
        _mt(3.0, 0, a=0.5, b=9.0),  # a evaluated again, b not yet seen changed
        _mt(4.0, 0, a=0.5, b=0.7),
        _mt(5.0, 0, a=0.5, b=0.7),  # the same evaluation scraped again
        _mt(6.0, 0, a=0.4, b=0.6),
        _mt(7.0, 0, a=3.0, b=3.0),  # after the window
    ]
    assert sampler.rpo_evaluations(2.0, 6.0) == {"a": [0.5, 0.4], "b": [0.7, 0.6]}


def test_applied_rate_reads_the_counter_at_the_window_s_ends() -> None:
    sampler = Sampler("http://mt", None, ["a"])
    sampler.mt = [_mt(0.0, 0), _mt(1.0, 100), _mt(3.0, 500), _mt(5.0, 500)]
    # 50 bytes at 0.5 s, 500 at 4 s: between the samples around each end
    assert sampler.applied_rate(0.5, 4.0) == pytest.approx(450 / 3.5)
    assert sampler.applied_rate(1.0, 3.0) == pytest.approx(200.0)
    assert sampler.applied_rate(4.0, 6.0) == 0.0  # not sampled after the end


def test_percentile() -> None:
    assert percentile([], 99) is None
    assert percentile([4.0], 50) == 4.0
    assert percentile([float(n) for n in range(1, 101)], 50) == pytest.approx(50.5)
    assert percentile([1.0, 2.0, 3.0, 1000.0], 99.9) == pytest.approx(1000.0, rel=0.01)


TLS = TlsFiles(ca_file=Path("ca.pem"), cert_file=Path("m.pem"), key_file=Path("m.key"))


def _writes(source: Source) -> list[Write]:
    decoder = BatchDecoder(expected_disk_id=source.disk)
    decoder.feed(source.body())
    (batch,) = decoder.events()
    return [r for r in batch.records if isinstance(r, Write)]


def test_sequential_writes_follow_each_other_and_wrap_at_the_end_of_the_disk() -> None:
    profile = Profile(block_bytes=4096, writes_per_batch=3, pattern="sequential",
                      disk_bytes=4 * 4096)  # fmt: skip
    source = Source("d0", 0, [bytes([n]) * 4096 for n in range(5)], profile, "https://ps", TLS)
    offsets = [w.offset for w in _writes(source)]
    assert source.next_seq == 4  # the next batch follows this one
    offsets += [w.offset for w in _writes(source)]
    assert offsets == [0, 4096, 8192, 12288, 0, 4096]


@pytest.mark.parametrize(
    ("block_bytes", "writes", "rate", "in_flight"),
    [
        (65536, 16, None, 2),  # 1 MiB batches as fast as answered: as the agent sends them
        (65536, 15, None, 1),  # below 1 MiB: nothing goes behind a batch
        (65536, 16, 1e6, 1),  # a rate to keep: one at a time
    ],
)
def test_a_source_pipelines_as_the_agent_does(
    block_bytes: int, writes: int, rate: float | None, in_flight: int
) -> None:
    profile = Profile(block_bytes=block_bytes, writes_per_batch=writes, pattern="random",
                      disk_bytes=2**24, rate_Bps=rate)  # fmt: skip
    source = Source("d0", 0, [b"x" * block_bytes], profile, "https://ps", TLS)
    assert source.pipelined == in_flight


def test_random_writes_stay_on_block_slots_of_the_disk() -> None:
    profile = Profile(block_bytes=65536, writes_per_batch=64, pattern="random",
                      disk_bytes=2**20)  # fmt: skip
    source = Source("d0", 3, [b"x" * 65536], profile, "https://ps", TLS)
    writes = _writes(source)
    assert len(writes) == 64
    assert all(w.offset % 65536 == 0 and w.offset < 2**20 for w in writes)
    assert len({w.offset for w in writes}) > 1


@pytest.mark.parametrize(
    ("kwargs", "found"),
    [
        ({"block_bytes": 2048}, "found 2048"),
        ({"block_bytes": 3 * 4096}, "found 12288"),
        ({"block_bytes": 2 * 2**20}, "found 2097152"),
        ({"writes_per_batch": 0}, "found 0"),
        ({"disk_bytes": 100_000}, "found 100000"),
        ({"rate_Bps": 0.0}, "found 0.0"),
    ],
)
def test_a_profile_out_of_range_says_what_was_expected(
    kwargs: dict[str, object], found: str
) -> None:
    args: dict[str, object] = {"block_bytes": 4096, "writes_per_batch": 1, "pattern": "random",
                               "disk_bytes": 2**20, **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match="expected") as error:
        Profile(**args)  # type: ignore[arg-type]
    assert found in str(error.value)


def test_targets_hold_miss_or_were_not_measured() -> None:
    result = {"e2e_MBps": 60.0, "limit_MBps": 100.0, "rpo_p99_s": 7.0, "ack_p99_ms": None,
              "rsync_s": 6.0, "resync_s": 1.0, "ps_rss_MiB": 120.0,
              "many_rpo_worst_over_median": 2.5, "ps_cpu_s_per_GB": 4.5,
              "ps_floor_s_per_GB": 3.0, "mt_cpu_s_per_GB": 4.6, "mt_floor_s_per_GB": 3.0,
              "initial_copy_s": 2.6, "initial_rsync_s": 1.0, "fs_tags": 3,
              "fs_tags_whole": 2}  # fmt: skip
    held = judge(result)
    assert held["e2e_vs_limit"] is True
    assert held["resync_vs_rsync"] is True
    assert held["ps_cpu_vs_floor"] is True  # 4.5 <= 1.5 x 3.0
    assert held["mt_cpu_vs_floor"] is False
    assert held["initial_vs_rsync"] is False  # 2.6 > 2.5 x 1.0
    assert held["fs_tags_whole"] is False  # one tag of three did not come back whole
    assert held["ps_rss_full_load"] is True
    assert held["half_load_rpo"] is False
    assert held["many_disks_rpo"] is False
    assert held["half_load_ack"] is None  # measured as nothing
    assert held["ps_rss_mt_down"] is None  # not in this run
    text = table({**result, "targets": held})
    assert "not run" in text
    assert " NO " in text


TIMELINE = {
    "samples": [{"site": "load", "t": 1.0, "applied_MBps": None, "rpo_max_s": 0.2,
                 "rpo_median_s": 0.1},
                {"site": "load", "t": 2.0, "applied_MBps": 50.0, "rpo_max_s": 0.3,
                 "rpo_median_s": 0.2}],
    "acked": [{"phase": "full", "t": 1.5, "acked_MBps": 55.0}],
    "phases": [{"site": "load", "name": "full", "started": 0.0, "measured_from": 0.5,
                "ended": 2.0}],
}  # fmt: skip


def test_results_hold_the_json_and_the_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    said = write_results(tmp_path / "r", {"e2e_MBps": 50.0}, TIMELINE)
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["e2e_MBps"] == 50.0
    assert saved["timeline"]["phases"][0]["name"] == "full"
    plot = tmp_path / "r" / "throughput-rpo.png"
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert str(plot) in said


def test_without_matplotlib_the_json_is_written_and_the_plot_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    said = write_results(tmp_path, {"e2e_MBps": 50.0}, TIMELINE)
    assert said.startswith("plot skipped: matplotlib is not installed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_profile_sums_each_function_once_per_stack() -> None:
    raw = "\n".join([
        "thread (11): MainThread;_run_once (/usr/lib/python3.11/asyncio/base_events.py:1922);"
        f"seal ({PROJECT}processserver/sealing.py:40);compress (zstandard/__init__.py:9) 6",
        "thread (11): MainThread;_run_once (/usr/lib/python3.11/asyncio/base_events.py:1922);"
        f"seal ({PROJECT}processserver/sealing.py:41) 3",
        f"thread (12): worker;recurse ({PROJECT}agent/a.py:1);recurse ({PROJECT}agent/a.py:1) 1",
        "thread (13): pool;_bootstrap (/usr/lib/python3.11/threading.py:1);"
        "_worker (/usr/lib/python3.11/concurrent/futures/thread.py:81) 40",
        "garbage without a count",
    ])  # fmt: skip
    summary = summarize(raw)
    assert summary.samples == 10, "an idle pool thread's samples are left out"
    assert summary.self_top[0] == ("compress (zstandard/__init__.py)", 0.6)
    assert ("seal (processserver/sealing.py)", 0.3) in summary.self_top
    total = dict(summary.total_top)
    assert total["seal (processserver/sealing.py)"] == 0.9
    assert total["recurse (agent/a.py)"] == 0.1, "a recursive function counts once per stack"
    assert "_run_once (asyncio/base_events.py)" not in total, "only the project's functions"


async def test_a_wan_link_carries_every_byte_late_in_both_directions() -> None:
    """benchmarks/wanlink.py: an echo through the link comes back whole, and no
    sooner than the round trip it adds (a lower bound: a slow machine only adds)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(2**16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    payload = os.urandom(3 * 2**20)
    try:
        with WanLink(port, rtt_s=0.1, bytes_per_s=200e6) as link:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            started = loop.time()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            assert loop.time() - started >= 0.1
            writer.write(payload)
            writer.write_eof()
            assert await reader.readexactly(len(payload)) == payload
            writer.close()
            assert (
                link.carried >= 2 * (len(payload) + 1) - 2**20
            )  # the last pieces may be on their way
    finally:
        server.close()
