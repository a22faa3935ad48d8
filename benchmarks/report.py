"""What benchmarks/run.py hands over: the headline figures, the targets held or
not, a table, a results folder with the JSON and a plot of throughput and RPO
over the run.

The plot needs matplotlib (the ``bench`` extra: ``pip install -e '.[bench]'``);
without it the folder gets the JSON alone and the run says the plot was
skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks.phases import Phase, Runner
from benchmarks.sitemetrics import SAMPLE_S, SCRAPE_TIMEOUT_S, MtSample

#: Seconds between two samples of the master target above which the plot
#: shows a gap (it did not answer): a few missed scrapes.
SILENT_S: Final = 3 * SAMPLE_S + SCRAPE_TIMEOUT_S


@dataclass(frozen=True)
class Target:
    """A figure's target: ``passes`` tells whether a value meets it."""

    name: str
    text: str
    passes: Callable[[Mapping[str, Any]], bool | None]


def _at_most(key: str, limit: float) -> Callable[[Mapping[str, Any]], bool | None]:
    return lambda r: None if r.get(key) is None else bool(r[key] <= limit)


def _ratio_at_least(
    num: str, den: str, factor: float
) -> Callable[[Mapping[str, Any]], bool | None]:
    return lambda r: (
        None if r.get(num) is None or r.get(den) is None else bool(r[num] >= factor * r[den])
    )


#: The targets of a run, each from what it is for: the pipeline should reach
#: a third of its bare per-byte limit, and each daemon spend at most half
#: again what its unskippable steps cost (the floor); half that load should
#: leave little at risk (RPO) and not slow the writers down (ack); a resync
#: should beat rsync well, an initial copy come near it; the process server
#: must fit a small VM whatever the master target does; no disk may be
#: starved by the others; a database's small commits, and a kernel file
#: system on the export, must not leave the master target behind for long,
#: and every tag taken must come back whole.
TARGETS: Final = (
    Target("e2e_vs_limit", "e2e_MBps >= 0.35 x limit_MBps",
           _ratio_at_least("e2e_MBps", "limit_MBps", 0.35)),
    Target("ps_cpu_vs_floor", "ps_cpu_s_per_GB <= 1.5 x ps_floor_s_per_GB",
           _ratio_at_least("ps_floor_s_per_GB", "ps_cpu_s_per_GB", 1 / 1.5)),
    Target("mt_cpu_vs_floor", "mt_cpu_s_per_GB <= 1.5 x mt_floor_s_per_GB",
           _ratio_at_least("mt_floor_s_per_GB", "mt_cpu_s_per_GB", 1 / 1.5)),
    Target("half_load_rpo", "rpo_p99_s <= 5 s at half load", _at_most("rpo_p99_s", 5.0)),
    Target("half_load_ack", "ack_p99_ms <= 50 ms at half load", _at_most("ack_p99_ms", 50.0)),
    Target("resync_vs_rsync", "rsync_s >= 5 x resync_s",
           _ratio_at_least("rsync_s", "resync_s", 5.0)),
    Target("initial_vs_rsync", "initial_copy_s <= 2.5 x initial_rsync_s",
           _ratio_at_least("initial_rsync_s", "initial_copy_s", 1 / 2.5)),
    Target("ps_rss_full_load", "ps_rss_MiB <= 300 at full load", _at_most("ps_rss_MiB", 300.0)),
    Target("ps_rss_mt_down", "ps_rss_mt_down_MiB <= 300", _at_most("ps_rss_mt_down_MiB", 300.0)),
    Target("many_disks_rpo", "worst disk's RPO <= 2 x the median disk's",
           _at_most("many_rpo_worst_over_median", 2.0)),
    Target("smallwrite_rpo_p99", "smallwrite_rpo_p99_s <= 5 s under a database's load",
           _at_most("smallwrite_rpo_p99_s", 5.0)),
    Target("smallwrite_rpo_max", "smallwrite_rpo_max_s <= 10 s",
           _at_most("smallwrite_rpo_max_s", 10.0)),
    Target("smallwrite_drain", "smallwrite_drain_s <= 5 s", _at_most("smallwrite_drain_s", 5.0)),
    Target("fs_rpo_max", "fs_rpo_max_s <= 10 s on a kernel file system",
           _at_most("fs_rpo_max_s", 10.0)),
    Target("fs_tags_whole", "every tag of the fs phase recovered whole",
           lambda r: None if r.get("fs_tags") is None
           else bool(r["fs_tags"] > 0 and r["fs_tags_whole"] == r["fs_tags"])),
)  # fmt: skip


def judge(result: Mapping[str, Any]) -> dict[str, bool | None]:
    """Each target: held (True), missed (False), or not measured in this run (None)."""
    return {t.name: t.passes(result) for t in TARGETS}


#: The rows of the table: key, and what it is.
ROWS: Final = (
    ("e2e_MBps", "applied at the master target, full load (MB/s)"),
    ("limit_MBps", "bare pipeline limit on the cores in use (MB/s)"),
    ("floor_MBps", "what the unskippable steps allow on the cores in use (MB/s)"),
    ("ps_floor_s_per_GB", "process server's unskippable CPU (s/GB)"),
    ("mt_floor_s_per_GB", "master target's unskippable CPU (s/GB)"),
    ("acked_MBps", "acknowledged by the process server, full load (MB/s)"),
    ("ack_p50_ms", "ack latency p50, half load (ms)"),
    ("ack_p99_ms", "ack latency p99, half load (ms)"),
    ("ack_p999_ms", "ack latency p99.9, half load (ms)"),
    ("rpo_p50_s", "RPO p50, half load (s)"),
    ("rpo_p99_s", "RPO p99, half load (s)"),
    ("rpo_max_s", "RPO max, half load (s)"),
    ("ps_cpu_s_per_GB", "process server CPU, full load (s/GB)"),
    ("mt_cpu_s_per_GB", "master target CPU, full load (s/GB)"),
    ("ps_rss_MiB", "process server peak RSS, full load (MiB)"),
    ("ps_rss_mt_down_MiB", "process server peak RSS, master target down (MiB)"),
    ("mt_rss_MiB", "master target peak RSS (MiB)"),
    ("compression_ratio", "write data / sealed HRL bytes"),
    ("wire_in_MB", "agent -> process server, full load (MB)"),
    ("wire_out_MB", "process server -> master target, full load (MB)"),
    ("many_rpo_worst_over_median", "many disks: worst disk's RPO / median disk's"),
    ("smallwrite_rpo_p99_s", "RPO p99, database load (s)"),
    ("smallwrite_rpo_max_s", "RPO max, database load (s)"),
    ("smallwrite_drain_s", "backlog drained after the database load (s)"),
    ("smallwrite_commits_per_s", "commits made a second, all disks, database load"),
    ("agent_backlog_peak_MiB", "agents' journals at their fullest, database load (MiB)"),
    ("ps_backlog_peak_MiB", "process server cache at its fullest, database load (MiB)"),
    ("fs_rpo_p99_s", "RPO p99, SQLite on ext4 on the capture's export (s)"),
    ("fs_rpo_max_s", "RPO max, the same (s)"),
    ("fs_drain_s", "backlog drained after it (s)"),
    ("fs_commits_per_s", "SQLite commits a second on the capture's export"),
    ("fs_paused_commits_per_s", "the same, the process server and master target stopped"),
    ("fs_bare_commits_per_s", "the same on a bare NBD export, nothing replicated"),
    ("fs_tags_whole", "tags recovered clean (e2fsck), mounted, database whole"),
    ("fs_tags", "tags taken, app-consistent (fsfreeze)"),
    ("resync_s", "resync of a changed image (s)"),
    ("rsync_s", "rsync of the same change (s)"),
    ("initial_copy_s", "initial copy of an image (s)"),
    ("initial_rsync_s", "rsync of the same image (s)"),
    ("initial_restic_s", "restic backup of the same image (s)"),
)


def table(result: Mapping[str, Any]) -> str:
    """The figures and the targets as aligned text."""
    lines = [f"{'figure':<28}{'value':>12}  what"]
    for key, what in ROWS:
        value = result.get(key)
        lines.append(f"{key:<28}{'-' if value is None else value!s:>12}  {what}")
    lines.append("")
    lines.append(f"{'target':<28}{'held':>12}  rule")
    for target in TARGETS:
        held = result.get("targets", {}).get(target.name)
        text = "not run" if held is None else ("yes" if held else "NO")
        lines.append(f"{target.name:<28}{text:>12}  {target.text}")
    return "\n".join(lines)


def timeline(runners: Sequence[Runner], t0: float) -> dict[str, Any]:
    """What the plot draws, in seconds from ``t0``: the master target's applied
    rate and RPO at each scrape, acked bytes per second of each phase, and the
    phases' windows."""
    samples: list[dict[str, Any]] = []
    acked: list[dict[str, Any]] = []
    phases: list[dict[str, Any]] = []
    for runner in runners:
        samples.extend(_mt_points(runner.label, runner.sampler.mt, t0))
        for phase in runner.phases:
            phases.append(_phase_span(runner.label, phase, t0))
            acked.extend(_acked_per_second(phase, t0))
    return {"samples": samples, "acked": acked, "phases": phases}


def _mt_points(site: str, samples: Sequence[MtSample], t0: float) -> list[dict[str, Any]]:
    out = []
    previous = None
    for s in samples:
        if previous is not None and s.t - previous.t > SILENT_S:
            # The master target did not answer (frozen): a gap, not a line across it.
            out.append(_point(site, previous.t - t0 + SAMPLE_S, None, []))
            previous = None
        rate = None
        if previous is not None:
            rate = (s.applied_bytes - previous.applied_bytes) / (s.t - previous.t) / 1e6
        out.append(_point(site, s.t - t0, rate, sorted(s.rpo_s.values())))
        previous = s
    return out


def _point(site: str, t: float, rate: float | None, rpo: list[float]) -> dict[str, Any]:
    return {
        "site": site, "t": round(t, 2), "applied_MBps": None if rate is None else round(rate, 1),
        "rpo_max_s": round(rpo[-1], 2) if rpo else None,
        "rpo_median_s": round(rpo[len(rpo) // 2], 2) if rpo else None,
    }  # fmt: skip


def _acked_per_second(phase: Phase, t0: float) -> list[dict[str, Any]]:
    start = int(phase.started - t0)
    seconds = [0] * (int(phase.ended - t0) - start + 1)
    for tally in phase.tallies:
        for t, _, n in tally.acks:
            seconds[int(t - t0) - start] += n
    return [
        {"phase": phase.name, "t": start + i + 0.5, "acked_MBps": round(n / 1e6, 1)}
        for i, n in enumerate(seconds)
    ]


def _phase_span(site: str, phase: Phase, t0: float) -> dict[str, Any]:
    return {
        "site": site, "name": phase.name, "started": round(phase.started - t0, 2),
        "measured_from": round(phase.measured_from - t0, 2), "ended": round(phase.ended - t0, 2),
    }  # fmt: skip


def headline(figures: dict[str, Any]) -> dict[str, Any]:
    """The top-level keys: each figure from the phase that measures it."""
    full, half = figures.get("full", {}), figures.get("half", {})
    down, many = figures.get("mt_down", {}), figures.get("many", {})
    resync, initial = figures.get("resync", {}), figures.get("initial", {})
    small, fs = figures.get("smallwrite", {}), figures.get("fs", {})
    limit = figures["limit"]["limit_MBps"]
    floor = figures.get("floor", {})
    e2e = full.get("e2e_MBps")
    return {
        "e2e_MBps": e2e, "limit_MBps": limit,
        "e2e_vs_limit": round(e2e / limit, 3) if e2e is not None else None,
        **{k: floor.get(k) for k in ("floor_MBps", "ps_floor_s_per_GB", "mt_floor_s_per_GB")},
        "acked_MBps": full.get("acked_MBps"),
        **{k: half.get(k) for k in ("ack_p50_ms", "ack_p99_ms", "ack_p999_ms", "rpo_p50_s",
                                    "rpo_p99_s", "rpo_max_s")},
        "ps_cpu_s_per_GB": full.get("ps_cpu_s_per_GB"),
        "mt_cpu_s_per_GB": full.get("mt_cpu_s_per_GB"),
        "ps_rss_MiB": full.get("ps_rss_MiB"),
        "ps_rss_mt_down_MiB": down.get("ps_rss_MiB"),
        "mt_rss_MiB": half.get("mt_rss_MiB", full.get("mt_rss_MiB")),
        "compression_ratio": full.get("compression_ratio"),
        "wire_in_MB": _mb(full.get("wire_in_bytes")),
        "wire_out_MB": _mb(full.get("wire_out_bytes")),
        "many_rpo_worst_over_median": many.get("rpo_worst_over_median"),
        **{k: small.get(k) for k in ("smallwrite_rpo_p99_s", "smallwrite_rpo_max_s",
                                     "smallwrite_drain_s", "agent_backlog_peak_MiB",
                                     "ps_backlog_peak_MiB")},
        "smallwrite_commits_per_s": small.get("commits_per_s"),
        **{k: fs.get(k) for k in ("fs_rpo_p99_s", "fs_rpo_max_s", "fs_drain_s", "fs_tags",
                                  "fs_tags_whole", "fs_commits_per_s", "fs_paused_commits_per_s",
                                  "fs_bare_commits_per_s")},
        "resync_s": resync.get("resync_s"), "rsync_s": resync.get("rsync_s"),
        "resync_speedup": resync.get("speedup"),
        "initial_copy_s": initial.get("copy_s"), "initial_rsync_s": initial.get("rsync_s"),
        "initial_restic_s": initial.get("restic_s"),
    }  # fmt: skip


def _mb(count: int | None) -> float | None:
    return None if count is None else round(count / 1e6, 1)


def write_results(folder: Path, result: Mapping[str, Any], timeline: Mapping[str, Any]) -> str:
    """``results.json`` (the result and its timeline) and ``throughput-rpo.png`` in
    ``folder``; returns what became of the plot."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "results.json").open("w") as out:
        json.dump({**result, "timeline": timeline}, out, indent=1)
    if not timeline["samples"]:
        return "plot skipped: no load phase ran"
    try:
        import matplotlib  # noqa: PLC0415 - optional: the run must not need it

        matplotlib.use("Agg")
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install -e '.[bench]')"
    path = folder / "throughput-rpo.png"
    _plot(path, timeline)
    return f"plot: {path}"


def _plot(path: Path, timeline: Mapping[str, Any]) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    samples: Sequence[Mapping[str, Any]] = timeline["samples"]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5))
    for site in sorted({s["site"] for s in samples}):
        mine = [s for s in samples if s["site"] == site]
        t = [s["t"] for s in mine]
        top.plot(t, [s["applied_MBps"] for s in mine], label=f"applied at the MT ({site})")
        bottom.plot(t, [s["rpo_max_s"] for s in mine], label=f"worst disk ({site})")
        bottom.plot(t, [s["rpo_median_s"] for s in mine], "--", label=f"median disk ({site})")
    for n, name in enumerate(dict.fromkeys(a["phase"] for a in timeline["acked"])):
        acked = [a for a in timeline["acked"] if a["phase"] == name]
        top.plot(
            [a["t"] for a in acked], [a["acked_MBps"] for a in acked], ":", color="grey",
            label=None if n else "acked by the PS",
        )  # fmt: skip
    for phase in timeline["phases"]:
        for axis in (top, bottom):
            axis.axvspan(phase["measured_from"], phase["ended"], alpha=0.08)
        top.annotate(
            phase["name"], (phase["measured_from"], 1.0), xycoords=("data", "axes fraction"),
            va="top", fontsize=8,
        )  # fmt: skip
    top.set_ylabel("MB/s")
    bottom.set_ylabel("RPO (s), as the MT evaluates it")
    bottom.set_xlabel("seconds into the run (shaded: measured windows)")
    top.legend(fontsize=8, loc="upper right")
    bottom.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
