"""The site a load test drives: daemons it starts on loopback, or running ones.

Either way a :class:`Site` gives what the load and the figures need: the
process server's data URL, both metrics URLs, the disks with their
machine's client certificate, and, when the daemons' process ids are known,
their CPU time and peak memory and a way to freeze the master target.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from benchmarks.deploy import Deployment, cpu_seconds, peak_rss_mib
from benchmarks.deploy import deploy as deploy_site
from benchmarks.sitemetrics import MT_TARGET_SIZE, SCRAPE_TIMEOUT_S, parse
from benchmarks.workload import Profile, Source
from runtime.config import TlsFiles

#: The process server's cache marks on a site of ours: the cache fills to
#: the high mark within seconds of the master target going down (sealed
#: data at about 50 MB/s on two cores), so that phase measures memory with
#: a full cache refusing batches; the low mark is above the 32 MiB floor
#: the config requires.
CACHE_HIGH_BYTES: Final = 256 * 2**20
CACHE_LOW_BYTES: Final = 192 * 2**20
#: How long the master target of a site of ours keeps recovery points: in
#: steady state it prunes as fast as it journals (as with the 24-hour
#: default after a day), and the journal stays small enough for RAM.
RETENTION_WINDOW_S: Final = 30.0


@dataclass(frozen=True)
class Site:
    """A process server and a master target, and the disks to drive.

    Attributes:
        ps_url: ``https://HOST:PORT`` of the process server's data API.
        mt_metrics: ``http://HOST:PORT`` of the master target's metrics listener.
        ps_metrics: the same for the process server, if known.
        disks: each disk with its machine's client certificate files.
        disk_bytes: the size of the smallest of the disks.
        ps_pid / mt_pid: the daemons' process ids on this machine, if known.
        deployment: the daemons this site started, if it did.
    """

    ps_url: str
    mt_metrics: str
    ps_metrics: str | None
    disks: Sequence[tuple[str, TlsFiles]]
    disk_bytes: int
    ps_pid: int | None = None
    mt_pid: int | None = None
    deployment: Deployment | None = None

    def sources(self, blocks: Sequence[bytes], profile: Profile) -> list[Source]:
        """A source per disk; writes fall in the first ``profile.disk_bytes`` of each.

        Raises:
            SystemExit: the profile's disk is larger than the site's disks.
        """
        if profile.disk_bytes > self.disk_bytes:
            raise SystemExit(
                f"expected disks of at least {profile.disk_bytes} bytes to write in, "
                f"found {self.disk_bytes}"
            )
        return [
            Source(disk, n, blocks, profile, self.ps_url, tls)
            for n, (disk, tls) in enumerate(self.disks)
        ]

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of each daemon whose process id is known."""
        pids = {"ps": self.ps_pid, "mt": self.mt_pid}
        return {name: cpu_seconds(pid) for name, pid in pids.items() if pid is not None}

    def peak_rss_mib(self, daemon: str) -> float | None:
        pid = self.ps_pid if daemon == "ps" else self.mt_pid
        return None if pid is None else round(peak_rss_mib(pid), 1)

    def freeze_mt(self, frozen: bool) -> None:
        """SIGSTOP (a hung host: its sockets open, nothing answered) or SIGCONT it."""
        if self.mt_pid is None:
            raise SystemExit("expected the master target's process id to freeze it, found none")
        os.kill(self.mt_pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        """Stop the daemons this site started (and thaw a frozen master target first)."""
        if self.deployment is None:
            return
        if self.deployment.mt.proc is not None and self.deployment.mt.proc.poll() is None:
            self.freeze_mt(False)
        self.deployment.ps.stop()
        self.deployment.mt.stop()


def start_site(
    root: Path,
    disks: int,
    *,
    disk_bytes: int,
    before_start: Callable[[Deployment], None] | None = None,
) -> Site:
    """Deploy and start a master target and a process server under ``root`` with
    ``disks`` disks, one protected machine each (``vmNNN`` with ``vmNNN-disk0``);
    ``before_start`` may change the deployment's configs first."""
    width = len(str(disks - 1))
    dep = deploy_site(
        root, {f"vm{n:0{width}d}": f"vm{n:0{width}d}-disk0" for n in range(disks)},
        disk_bytes=disk_bytes, cache_high_bytes=CACHE_HIGH_BYTES,
        cache_low_bytes=CACHE_LOW_BYTES, retention_window_s=RETENTION_WINDOW_S,
    )  # fmt: skip
    site = Site(
        ps_url=f"https://127.0.0.1:{dep.ps_port}",
        mt_metrics=f"http://127.0.0.1:{dep.mt.metrics_port}",
        ps_metrics=f"http://127.0.0.1:{dep.ps.metrics_port}",
        disks=[(disk, dep.client_tls(machine)) for machine, disk in dep.disks_of.items()],
        disk_bytes=disk_bytes,
        deployment=dep,
    )
    try:
        if before_start is not None:
            before_start(dep)
        dep.mt.start()
        dep.ps.start()
        dep.mt.wait_healthy()
        dep.ps.wait_healthy()
    except BaseException:
        site.stop()
        raise
    return dataclasses.replace(site, ps_pid=dep.ps.pid, mt_pid=dep.mt.pid)


def running_site(
    *, ps_url: str, mt_metrics: str, ps_metrics: str | None, tls: TlsFiles,
    disks: Sequence[str], ps_pid: int | None, mt_pid: int | None,
) -> Site:  # fmt: skip
    """Running daemons, driven with one machine's certificate for its ``disks``.

    Raises:
        SystemExit: no disks, or a disk the master target's metrics do not show.
    """
    if not disks:
        raise SystemExit("expected the ids of the disks to drive (--disk-ids), found none")
    mt_metrics = mt_metrics.rstrip("/")
    if not mt_metrics.startswith(("http://", "https://")):
        raise SystemExit(
            f"expected an http:// URL of the master target's metrics, found {mt_metrics}"
        )
    try:
        with urllib.request.urlopen(  # noqa: S310 - the scheme is checked above
            f"{mt_metrics}/metrics", timeout=SCRAPE_TIMEOUT_S
        ) as page:
            sizes = parse(page.read().decode(), [MT_TARGET_SIZE]).get(MT_TARGET_SIZE, {})
    except OSError as exc:
        raise SystemExit(
            f"expected the master target's metrics at {mt_metrics}/metrics, found: {exc}"
        ) from None
    missing = [d for d in disks if d not in sizes]
    if missing:
        raise SystemExit(
            f"expected disks {', '.join(missing)} in the master target's metrics at "
            f"{mt_metrics}, found {', '.join(sorted(sizes)) or 'none'}"
        )
    return Site(
        ps_url=ps_url.rstrip("/"), mt_metrics=mt_metrics,
        ps_metrics=ps_metrics.rstrip("/") if ps_metrics else None,
        disks=[(disk, tls) for disk in disks], disk_bytes=int(min(sizes[d] for d in disks)),
        ps_pid=ps_pid, mt_pid=mt_pid,
    )  # fmt: skip
