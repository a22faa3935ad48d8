"""What a site's daemons report about themselves, sampled over a run.

The figures of benchmarks/run.py that describe the replication itself are
read from the daemons, not from what the load generator sent: bytes applied
and each disk's RPO from the master target's Prometheus metrics
(docs/api.md, "Metrics listeners"), bytes received, sealed and shipped from
the process server's. A :class:`Sampler` scrapes both every
:data:`SAMPLE_S` and keeps every sample, so any window of the run can be
read afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

#: Seconds between scrapes: finer than any phase, coarse enough to cost the
#: daemons nothing to speak of (one metrics page each).
SAMPLE_S: Final = 1.0
#: A scrape that takes longer is dropped (a paused master target answers
#: nothing at all).
SCRAPE_TIMEOUT_S: Final = 2.0

MT: Final = "blockrepl_mastertarget_"
PS: Final = "blockrepl_processserver_"
#: The series read, by the name the text format gives them.
MT_APPLIED: Final = (MT + "applied_bytes_total", MT + "zeroed_bytes_total")
MT_RPO: Final = MT + "rpo_seconds"
MT_APPLIED_SEQ: Final = MT + "applied_seq"
MT_TARGET_SIZE: Final = MT + "target_size_bytes"
PS_IN: Final = PS + "in_bytes_total"
PS_SEALED: Final = PS + "sealed_bytes_total"
PS_OUT: Final = PS + "out_bytes_total"
PS_CACHE: Final = PS + "cache_bytes"
WANTED: Final = (*MT_APPLIED, MT_RPO, MT_APPLIED_SEQ, PS_IN, PS_SEALED, PS_OUT, PS_CACHE)


def parse(text: str, names: Iterable[str] = WANTED) -> dict[str, dict[str, float]]:
    """The samples of ``names`` in a Prometheus text page: name -> disk label -> value.

    A series without a disk label is under ``""``; series with other labels
    are left out. Only lines of the wanted series are parsed.
    """
    wanted = tuple(names)
    lines = "\n".join(line for line in text.splitlines() if line.startswith(wanted))
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(lines + "\n"):
        for sample in family.samples:
            if set(sample.labels) <= {"disk"}:
                out.setdefault(sample.name, {})[sample.labels.get("disk", "")] = sample.value
    return out


@dataclass(frozen=True)
class MtSample:
    """One scrape of the master target.

    Attributes:
        t: ``time.monotonic()`` when it answered.
        applied_bytes: bytes it wrote or zeroed on the disks.
        rpo_s: each disk's RPO as it last evaluated it.
        applied_seq: each disk's last seq applied to its target.
    """

    t: float
    applied_bytes: float
    rpo_s: dict[str, float]
    applied_seq: dict[str, int]


@dataclass(frozen=True)
class PsSample:
    """One scrape of the process server: its totals (``PS_*`` names, over the disks)."""

    t: float
    totals: dict[str, float]


@dataclass
class Sampler:
    """Scrapes a master target (and a process server) every SAMPLE_S, for ``disks``.

    Each daemon is scraped on its own, so one that does not answer (a frozen
    master target) leaves a gap in its samples only.
    """

    mt_url: str
    ps_url: str | None
    disks: Sequence[str]
    mt: list[MtSample] = field(default_factory=list)
    ps: list[PsSample] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        """Scrape until ``stop`` is set."""
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            loops = [self._every(session, self.mt_url, self._mt_sample, stop)]
            if self.ps_url:
                loops.append(self._every(session, self.ps_url, self._ps_sample, stop))
            await asyncio.gather(*loops)

    async def _every(
        self, session: aiohttp.ClientSession, url: str, take: Callable[[str], None],
        stop: asyncio.Event,
    ) -> None:  # fmt: skip
        while not stop.is_set():
            text = await _fetch(session, url)
            if text is not None:
                take(text)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)

    def _mt_sample(self, text: str) -> None:
        mt = parse(text)
        disks = set(self.disks)
        self.mt.append(
            MtSample(
                time.monotonic(),
                sum(v for name in MT_APPLIED for d, v in mt.get(name, {}).items() if d in disks),
                {d: v for d, v in mt.get(MT_RPO, {}).items() if d in disks},
                {d: int(v) for d, v in mt.get(MT_APPLIED_SEQ, {}).items() if d in disks},
            )
        )

    def _ps_sample(self, text: str) -> None:
        ps = parse(text)
        disks = set(self.disks)
        totals: dict[str, float] = {
            name: sum(v for d, v in ps[name].items() if d in disks or d == "")
            for name in (PS_IN, PS_SEALED, PS_OUT, PS_CACHE)
            if name in ps
        }
        self.ps.append(PsSample(time.monotonic(), totals))

    def applied_rate(self, since: float, until: float) -> float:
        """Bytes per second the master target applied from ``since`` to ``until``, its
        counter read at each end between the samples around it (0.0 if it was not
        sampled on both sides of the window)."""
        start, end = self._applied_at(since), self._applied_at(until)
        if start is None or end is None or until <= since:
            return 0.0
        return (end - start) / (until - since)

    def latest_applied_rate(self) -> float:
        """Bytes per second applied between the last two samples (0.0 before two)."""
        if len(self.mt) < 2:
            return 0.0
        a, b = self.mt[-2], self.mt[-1]
        return (b.applied_bytes - a.applied_bytes) / (b.t - a.t)

    def _applied_at(self, t: float) -> float | None:
        before = [s for s in self.mt if s.t <= t]
        after = [s for s in self.mt if s.t >= t]
        if not before or not after:
            return None
        a, b = before[-1], after[0]
        if b.t == a.t:
            return a.applied_bytes
        return a.applied_bytes + (b.applied_bytes - a.applied_bytes) * (t - a.t) / (b.t - a.t)

    async def sampled_after(self, t: float) -> None:
        """Wait for a master target sample taken after ``t`` (or until one is overdue)."""
        deadline = time.monotonic() + SAMPLE_S + SCRAPE_TIMEOUT_S
        while not (self.mt and self.mt[-1].t > t) and time.monotonic() < deadline:
            await asyncio.sleep(SAMPLE_S / 10)

    def ps_delta(self, name: str, since: float, until: float) -> float | None:
        """How much a process server total grew over the window (None: not scraped)."""
        inside = [s for s in self.ps if since <= s.t <= until and name in s.totals]
        if len(inside) < 2:
            return None
        return inside[-1].totals[name] - inside[0].totals[name]

    def ps_peak(self, name: str, since: float, until: float) -> float | None:
        """The highest a process server gauge was seen in the window (None: not scraped)."""
        inside = [s.totals[name] for s in self.ps if since <= s.t <= until and name in s.totals]
        return max(inside, default=None)

    def rpo_evaluations(self, since: float, until: float) -> dict[str, list[float]]:
        """Each disk's RPO at each evaluation the master target made in the window.

        The gauge changes only when the master target evaluates (every few
        seconds) while it is scraped more often: a value counts once, when
        it changed. A value already there when the window opened is of an
        evaluation before it, and does not count.
        """
        last: dict[str, float] = {}
        out: dict[str, list[float]] = {}
        for sample in self.mt:
            if sample.t > until:
                break
            for disk, value in sample.rpo_s.items():
                if last.get(disk) != value and sample.t >= since:
                    out.setdefault(disk, []).append(value)
                last[disk] = value
        return out

    def applied_up_to(self, acked: dict[str, int]) -> bool:
        """Whether the newest sample shows every disk applied up to its ``acked`` seq."""
        if not self.mt:
            return False
        applied = self.mt[-1].applied_seq
        return all(applied.get(disk, 0) >= seq for disk, seq in acked.items())


async def _fetch(session: aiohttp.ClientSession, url: str) -> str | None:
    """The metrics page at ``url``, or None if it was not there in time."""
    try:
        async with session.get(f"{url}/metrics") as response:
            if response.status != 200:
                return None
            return await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0 < q < 100, inclusive method), None without values."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return float(cuts[round(q * 10) - 1])
