"""Load phases on one site, and the figures each yields.

A :class:`Runner` keeps a :class:`~benchmarks.sitemetrics.Sampler` scraping
the site and a live line on the terminal for as long as the site is
driven; :meth:`Runner.load` runs sources for a warm-up and then a measured
window. Figures come from the window only: from the master target's own
metrics (bytes applied, RPO), the process server's (bytes received, sealed,
shipped), the daemons' /proc entries (CPU, peak memory) and, for the ack
latency, from each POST as the source timed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

from benchmarks.site import Site
from benchmarks.sitemetrics import PS_CACHE, PS_IN, PS_OUT, PS_SEALED, Sampler, percentile
from benchmarks.workload import Source, Tally, connected, run_sources
from runtime.progress import TerminalLine, human_bytes

#: Seconds between redraws of the live line.
REDRAW_S: Final = 0.5
#: Seconds between checks that the master target applied everything acked.
DRAIN_POLL_S: Final = 0.25


@dataclass
class Phase:
    """One load phase: its sources' tallies and the times that bound it.

    ``measured_from`` is the end of the warm-up: figures come from
    ``measured_from`` to ``ended``.
    """

    name: str
    started: float
    planned_s: float
    tallies: list[Tally]
    measured_from: float = 0.0
    ended: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def measured_s(self) -> float:
        return max(1e-9, self.ended - self.measured_from)

    def acked_bytes(self) -> int:
        return sum(t.acked_bytes(self.measured_from) for t in self.tallies)

    def latencies_s(self) -> list[float]:
        return [x for t in self.tallies for x in t.latencies_s(self.measured_from)]


class Runner:
    """Drives one site: load phases with the sampler and the live line running.

    Use as ``async with Runner(site) as runner:``.
    """

    def __init__(self, site: Site, *, label: str) -> None:
        self.site = site
        self.label = label
        self.sampler = Sampler(site.mt_metrics, site.ps_metrics, [d for d, _ in site.disks])
        self.phases: list[Phase] = []
        self._line = TerminalLine()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Runner:
        self._tasks = [
            asyncio.create_task(self.sampler.run(self._stop)),
            asyncio.create_task(self._redraw()),
        ]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self._line.erase()

    def say(self, message: str) -> None:
        """A line on stderr, the live line erased first (it is drawn again after)."""
        self._line.erase()
        print(message, file=sys.stderr, flush=True)

    async def load(
        self, name: str, sources: Sequence[Source], *, seconds: float, warmup_s: float,
        during: Callable[[], Awaitable[None]] | None = None,
    ) -> Phase:  # fmt: skip
        """Run ``sources`` for ``warmup_s`` then ``seconds`` measured; ``during`` runs
        at the start of the measured window."""
        async with connected(sources) as sessions:
            phase = Phase(name, time.monotonic(), warmup_s + seconds, [Tally() for _ in sources])
            self.phases.append(phase)
            task = asyncio.create_task(
                run_sources(sources, sessions, phase.tallies, warmup_s + seconds)
            )
            try:
                await asyncio.sleep(warmup_s)
                before = {**self.site.cpu_s(), "load": time.process_time()}
                phase.measured_from = time.monotonic()
                if during is not None:
                    await during()
                await task
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            phase.ended = time.monotonic()
        await self.sampler.sampled_after(phase.ended)  # the window's end, read at both sides
        after = {**self.site.cpu_s(), "load": time.process_time()}
        phase.cpu_s = {name: after[name] - before[name] for name in after}
        return phase

    async def drain(self, sources: Sequence[Source], timeout_s: float) -> float | None:
        """Seconds until the master target applied all that ``sources`` got acked;
        None if it did not within ``timeout_s``."""
        acked = {s.disk: s.next_seq - 1 for s in sources}
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.sampler.applied_up_to(acked):
                return round(time.monotonic() - started, 2)
            await asyncio.sleep(DRAIN_POLL_S)
        return None

    async def _redraw(self) -> None:
        while not self._stop.is_set():
            if self.phases and not self.phases[-1].ended:
                self._line.draw(self._status(self.phases[-1]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), REDRAW_S)

    def _status(self, phase: Phase) -> str:
        now = time.monotonic()
        recent = now - 3.0
        acked = sum(t.acked_bytes(recent) for t in phase.tallies) / 3.0
        applied = self.sampler.latest_applied_rate()
        text = (
            f"{self.label} {phase.name}: {now - phase.started:4.0f}/{phase.planned_s:.0f} s  "
            f"acked {acked / 1e6:6.1f} MB/s  applied {applied / 1e6:6.1f} MB/s"
        )
        if self.sampler.mt and self.sampler.mt[-1].rpo_s:
            text += f"  RPO max {max(self.sampler.mt[-1].rpo_s.values()):5.1f} s"
        if self.sampler.ps and PS_CACHE in self.sampler.ps[-1].totals:
            text += f"  PS cache {human_bytes(self.sampler.ps[-1].totals[PS_CACHE])}"
        return text


def load_figures(runner: Runner, phase: Phase) -> dict[str, object]:
    """The figures of one phase's measured window."""
    since, until = phase.measured_from, phase.ended
    sampler = runner.sampler
    applied_Bps = sampler.applied_rate(since, until)
    acked = phase.acked_bytes()
    latencies = phase.latencies_s()
    rpo = [x for values in sampler.rpo_evaluations(since, until).values() for x in values]
    sealed, received = (
        sampler.ps_delta(PS_SEALED, since, until),
        sampler.ps_delta(PS_IN, since, until),
    )
    figures: dict[str, object] = {
        "e2e_MBps": round(applied_Bps / 1e6, 1),
        "acked_MBps": round(acked / phase.measured_s / 1e6, 1),
        "ack_p50_ms": _ms(percentile(latencies, 50)),
        "ack_p99_ms": _ms(percentile(latencies, 99)),
        "ack_p999_ms": _ms(percentile(latencies, 99.9)),
        "acks": len(latencies),
        "rpo_p50_s": _round(percentile(rpo, 50), 2),
        "rpo_p99_s": _round(percentile(rpo, 99), 2),
        "rpo_max_s": _round(max(rpo) if rpo else None, 2),
        "rpo_evaluations": len(rpo),
        "compression_ratio": round(received / sealed, 3) if received and sealed else None,
        "wire_in_bytes": sum(t.wire_bytes(since) for t in phase.tallies),
        "wire_out_bytes": _int(sampler.ps_delta(PS_OUT, since, until)),
        "refusals_503": sum(t.refusals_503 for t in phase.tallies),
        "errors": sum(t.errors for t in phase.tallies),
        "measured_s": round(phase.measured_s, 1),
    }
    if "ps" in phase.cpu_s:
        figures["ps_cpu_s_per_GB"] = round(phase.cpu_s["ps"] / max(acked / 1e9, 1e-9), 2)
    if "mt" in phase.cpu_s:
        applied = applied_Bps * phase.measured_s
        figures["mt_cpu_s_per_GB"] = round(phase.cpu_s["mt"] / max(applied / 1e9, 1e-9), 2)
    # The load generator shares the cores with the daemons: its cost, to read the above by.
    figures["load_cpu_s_per_GB"] = round(phase.cpu_s["load"] / max(acked / 1e9, 1e-9), 2)
    return figures


def per_disk_rpo(runner: Runner, phase: Phase) -> dict[str, object]:
    """Each disk's worst sampled RPO in the window, and how far the worst disk is
    from the median disk."""
    worst = {
        disk: max(values)
        for disk, values in runner.sampler.rpo_evaluations(phase.measured_from, phase.ended).items()
    }
    if not worst:
        return {"disks_with_rpo": 0, "rpo_worst_over_median": None}
    median = statistics.median(worst.values())
    top = max(worst, key=worst.__getitem__)
    return {
        "disks_with_rpo": len(worst),
        "rpo_median_disk_s": round(median, 2),
        "rpo_worst_disk": top,
        "rpo_worst_disk_s": round(worst[top], 2),
        "rpo_worst_over_median": round(worst[top] / median, 2) if median > 0 else None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
