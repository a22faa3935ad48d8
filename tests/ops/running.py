"""Both daemons as real processes on loopback, configured from files a test can rewrite.

A test writes a config with :func:`ps_config_text` or :func:`mt_config_text`,
starts it with :class:`~tests.faults.daemons.Daemon`, waits with
:func:`wait_ready`, reads metrics with :func:`scrape` and polls with
:func:`wait_until` (never a fixed sleep: each poll has a deadline).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Deployment
from tests.faults.daemons import Daemon, free_port

T = TypeVar("T")

#: Seconds a daemon may take to open its ports: a cold Python start and a
#: scan of an empty cache take about one.
START_TIMEOUT_S = 30.0
#: Seconds a poll waits for a condition before the test fails.
POLL_TIMEOUT_S = 20.0
POLL_STEP_S = 0.05


@dataclass
class Ports:
    data: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}"


def own_pki(deployment: Deployment, root: Path) -> Path:
    """A copy of the deployment's PKI that a test may overwrite (rotation, renewal)."""
    copy = root / "pki"
    shutil.copytree(deployment.pki, copy)
    return copy


def ps_config_text(
    deployment: Deployment,
    root: Path,
    ports: Ports,
    *,
    pki: Path | None = None,
    master_target_port: int = 9,
    level: str = "info",
    **top: object,
) -> str:
    """A process server config serving machine vm01 (disk vm01-d0) on ``ports``."""
    pki = pki or deployment.pki
    values = {"cache_high_bytes": 2**30, "cache_low_bytes": 2**29, **top}
    return "\n".join(
        [
            f'key_file = "{deployment.key_file}"',
            f'cache_dir = "{root / "cache"}"',
            'host = "127.0.0.1"',
            f"port = {ports.data}",
            *(f"{key} = {_toml(value)}" for key, value in values.items()),
            "[tls]",
            f'ca_file = "{pki / "ca.pem"}"',
            f'cert_file = "{pki / "processserver.pem"}"',
            f'key_file = "{pki / "processserver.key"}"',
            "[master_target]",
            f'url = "https://127.0.0.1:{master_target_port}"',
            "[master_target.tls]",
            f'ca_file = "{pki / "ca.pem"}"',
            f'cert_file = "{pki / "machine-ps01.pem"}"',
            f'key_file = "{pki / "machine-ps01.key"}"',
            "[metrics]",
            f"port = {ports.metrics}",
            "[logging]",
            f'level = "{level}"',
            "[[machines]]",
            'id = "vm01"',
            'disks = ["vm01-d0"]',
            "",
        ]
    )


def mt_config_text(
    deployment: Deployment,
    root: Path,
    ports: Ports,
    *,
    pki: Path | None = None,
    level: str = "info",
    process_servers: tuple[str, ...] = ("ps01",),
    retention: Mapping[str, object] | None = None,
    size_bytes: int = 2**20,
    key_file: Path | None = None,
    **top: object,
) -> str:
    """A master target config with one raw disk vm01-d0 (created) on ``ports``."""
    pki = pki or deployment.pki
    (root / "retention").mkdir(parents=True, exist_ok=True)
    return "\n".join(
        [
            f"process_servers = {_toml(list(process_servers))}",
            f'key_file = "{key_file or deployment.key_file}"',
            f'cache_dir = "{root / "cache"}"',
            f'admin_socket = "{root / "admin.sock"}"',
            *(f"{key} = {_toml(value)}" for key, value in top.items()),
            "[listen]",
            'host = "127.0.0.1"',
            f"port = {ports.data}",
            "[tls]",
            f'ca_file = "{pki / "ca.pem"}"',
            f'cert_file = "{pki / "mastertarget.pem"}"',
            f'key_file = "{pki / "mastertarget.key"}"',
            "[metrics]",
            f"port = {ports.metrics}",
            "[logging]",
            f'level = "{level}"',
            "[retention]",
            f'dir = "{root / "retention"}"',
            "allow_shared_volume = true",
            *(f"{key} = {_toml(value)}" for key, value in (retention or {}).items()),
            "[[disks]]",
            'id = "vm01-d0"',
            f'target = "{root / "vm01-d0.raw"}"',
            "create = true",
            f"size_bytes = {size_bytes}",
            "",
        ]
    )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value)


def start_daemon(module: str, config: Path, log: Path) -> Daemon:
    """Start ``processserver.cli`` or ``mastertarget.cli`` serving ``config``."""
    daemon = Daemon(config, log, module=module)
    daemon.start()
    return daemon


async def wait_until(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = POLL_TIMEOUT_S
) -> T:
    """Poll ``probe`` until it returns something other than None; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(POLL_STEP_S)


async def wait_ready(daemon: Daemon, ports: Ports) -> None:
    """Wait until the daemon answers ``/readyz`` with 200; fail early if it exited."""

    async def ready() -> bool | None:
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(
                f"the daemon exited with {daemon.proc.returncode}: {daemon.log.read_text()[-3000:]}"
            )
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{ports.metrics_url}/readyz") as response,
            ):
                return True if response.status == 200 else None
        except aiohttp.ClientError:
            return None

    await wait_until(ready, f"{daemon.module} to be ready", START_TIMEOUT_S)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> Samples:
    """``GET url/metrics`` parsed: (sample name, sorted labels) -> value."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def wait_metric(
    url: str, name: str, expected: float, what: str = "", **labels: str
) -> Samples:
    """Poll the metrics until ``name{labels}`` equals ``expected``; returns that scrape."""

    async def probe() -> Samples | None:
        samples = await scrape(url)
        return samples if value(samples, name, **labels) == expected else None

    return await wait_until(probe, what or f"{name}{labels} == {expected}")


async def wait_log(log: Path, text: str) -> str:
    """Poll a daemon's log until it holds ``text``; returns the log."""

    async def probe() -> str | None:
        content = log.read_text(errors="replace")
        return content if text in content else None

    return await wait_until(probe, f"{text!r} in {log}")
