"""The daemons and the agent's capture run as the units run them: without any capability
(CapabilityBoundingSet= empty), without gaining privileges (NoNewPrivileges=)
and without writable-and-executable memory (MemoryDenyWriteExecute=). No
systemd runs here, so setpriv(1) and prctl(2) impose the same limits."""

from __future__ import annotations

import asyncio
import ctypes
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Deployment, require_binary, require_root
from tests.e2e.capture import (
    CaptureProcess,
    require_capture_peers,
)
from tests.e2e.conftest import build_site, make_source, start
from tests.faults.daemons import Daemon

from .running import Ports, mt_config_text, ps_config_text, wait_ready

#: prctl(2): refuse any mapping that is or becomes writable and executable
#: (Linux 6.3): what systemd's MemoryDenyWriteExecute= enforces by seccomp.
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _deny_write_execute() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


#: What a JIT does: ask for memory that is writable and executable at once.
WRITE_EXECUTE_MAP = (
    "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
)


def _mdwe_supported() -> bool:
    """Whether the limit can be set here, and bites: a W+X mapping fails under it."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", WRITE_EXECUTE_MAP], preexec_fn=_deny_write_execute,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except subprocess.SubprocessError:
        return False  # prctl failed in the child: no PR_SET_MDWE on this kernel
    assert "PermissionError" in probe.stderr, probe.stderr  # the limit is in force
    return True


class ConfinedDaemon(Daemon):
    """A daemon started through setpriv with no capability at all."""

    def start(self) -> None:
        setpriv = require_binary("setpriv")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    setpriv, "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
                    "--ambient-caps=-all", "--", sys.executable, "-m", self.module, "serve",
                    "--config", str(self.config),
                ],
                stdout=out, stderr=out, preexec_fn=self.preexec,  # noqa: PLW1509 - prctl only
            )  # fmt: skip
        self.starts += 1


def capabilities(pid: int) -> dict[str, str]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t") for line in status if line.startswith(("Cap", "NoNewPrivs")))


@pytest.mark.parametrize("module", ["processserver.cli", "mastertarget.cli"])
async def test_the_daemons_need_no_capability_and_no_writable_code(
    deployment: Deployment, tmp_path: Path, module: str
) -> None:
    require_root("setpriv empties the capability bounding set")
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 and later)")
    ports = Ports()
    config = tmp_path / "daemon.toml"
    text = ps_config_text if module == "processserver.cli" else mt_config_text
    config.write_text(text(deployment, tmp_path, ports))
    daemon = ConfinedDaemon(config, tmp_path / "daemon.log", module=module)
    daemon.preexec = _deny_write_execute
    daemon.start()
    await wait_ready(daemon, ports)
    assert daemon.proc is not None
    caps = capabilities(daemon.proc.pid)
    assert {caps[k] for k in ("CapPrm", "CapEff", "CapBnd", "CapAmb")} == {"0000000000000000"}
    assert caps["NoNewPrivs"] == "1"
    # It serves: a TLS handshake and an answer on the data port, a scrape.
    machine = "vm01" if module == "processserver.cli" else "ps01"
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls(machine))
    url = f"https://127.0.0.1:{ports.data}/v1/disks/vm01-d0/state"
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as answer:
        assert answer.status == 200
    async with aiohttp.ClientSession() as plain, plain.get(f"{ports.metrics_url}/metrics") as m:
        assert b"process_start_time_seconds" in await m.read()
    assert daemon.stop() == 0


async def test_the_capture_runs_without_capability_and_writable_code(
    deployment: Deployment, tmp_path: Path
) -> None:
    """nbdkit, its embedded Python and the plugin's ctypes calls, as blockrepl-agent@ runs them."""
    require_root("setpriv empties the capability bounding set")
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 and later)")
    require_capture_peers()
    setpriv = require_binary("setpriv")
    site = build_site(deployment, tmp_path, size=8 * 2**20)
    source = tmp_path / "source.raw"
    make_source(source, 8 * 2**20, [(0, b"data" * 1024)])
    await asyncio.to_thread(start, site)
    capture = CaptureProcess(
        site, source, preexec=_deny_write_execute,
        wrapper=(setpriv, "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
                 "--ambient-caps=-all", "--"),
    )  # fmt: skip
    await asyncio.to_thread(capture.start)
    assert capture.proc is not None
    caps = capabilities(capture.proc.pid)
    assert {caps[k] for k in ("CapPrm", "CapEff", "CapBnd", "CapAmb")} == {"0000000000000000"}
    await asyncio.to_thread(capture.qemu_io, "write -P 3 0 64k", "write -z 1M 1M", "discard 2M 1M")
    await asyncio.to_thread(capture.settle)
    site.assert_identical(source)
    status, report = await asyncio.to_thread(capture.stop)
    assert status == 0
    assert report["clean_stop"] is True
