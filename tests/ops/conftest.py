"""vcsim for the pyvmomi tests: govmomi's vCenter simulator, built by ./scripts/test.

Each test starts its own simulator (half a second) on 127.0.0.1, so no test
sees another's changes. The inventory is simulator.VPX(): datacenter DC0, a
standalone host DC0_H0 and a cluster DC0_C0 of three hosts, datastore
LocalDS_0 on every host, VMs DC0_H0_VM0/1 and DC0_C0_RP0_VM0/1 (powered on,
one disk each). The launcher (tests/ops/vcsim/launcher.go) adds accounts with
roles, host licence editions and a storage vMotion in progress.

The other operations tests start the daemons as processes: none may outlive
its test.
"""

from __future__ import annotations

import json
import os
import selectors
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from mastertarget.vsphere.config import PASSWORD_ENV
from tests.conftest import missing_peer
from tests.faults.daemons import RUNNING

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / ".cache" / "vcsim" / "vcsim-launcher"
#: The simulator prints its address within a second; a minute means it hangs.
START_TIMEOUT_S = 60.0
#: A command against the simulator takes about a second (imports, login, inventory).
COMMAND_TIMEOUT_S = 120.0

ADMIN = ("svc-admin", "Adm1n-pa55-d0nt-l3ak")
READ_ONLY = ("svc-readonly", "R3ad-0nly-pa55")
NO_DATASTORES = ("svc-nods", "N0-ds-pa55")

#: The master target VM and the VM failed back to, on two hosts of the cluster.
MASTER_TARGET = "DC0_C0_RP0_VM0"
FAILBACK_VM = "DC0_C0_RP0_VM1"


@dataclass
class Vcsim:
    """A running simulator: where it is, and a way to set its scene through the real API."""

    url: str
    ca_file: Path
    root: Path
    process: subprocess.Popen[bytes]
    _admin: Any = None

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlparse(self.url).port or 443

    def admin(self) -> Any:
        """A pyvmomi ServiceInstance logged in as the administrator (for setting scenes)."""
        if self._admin is None:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            self._admin = SmartConnect(
                host=self.host, port=self.port, user=ADMIN[0], pwd=ADMIN[1], sslContext=context
            )
        return self._admin

    def find(self, kind: Any, name: str) -> Any:
        content = self.admin().content
        view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
        return next(item for item in view.view if item.name == name)

    def wait(self, task: Any) -> Any:
        """Wait for a simulator task (they end at once) and return its result."""
        state = task.info.state
        assert state == "success", f"{task.info.descriptionId}: {state} {task.info.error}"
        return task.info.result

    def create_vm(self, name: str, host: str, datastore: str, *, folder: Any = None) -> Any:
        """A powered-off VM on ``host`` with one 1 MiB disk on ``datastore``, in
        ``folder`` (the datacenter's VM folder by default)."""
        machine = self.find(vim.HostSystem, host)
        folder = folder or self.admin().content.rootFolder.childEntity[0].vmFolder
        controller = vim.vm.device.ParaVirtualSCSIController(
            key=-1, busNumber=0, sharedBus="noSharing"
        )
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[{datastore}]", diskMode="persistent"
        )
        disk = vim.vm.device.VirtualDisk(
            key=-2, controllerKey=-1, unitNumber=0, capacityInKB=1024, backing=backing
        )
        spec = vim.vm.ConfigSpec(
            name=name,
            guestId="otherGuest64",
            numCPUs=1,
            memoryMB=64,
            files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"),
            deviceChange=[
                vim.vm.device.VirtualDeviceSpec(operation="add", device=controller),
                vim.vm.device.VirtualDeviceSpec(
                    operation="add", fileOperation="create", device=disk
                ),
            ],
        )
        pool = machine.parent.resourcePool
        return self.wait(folder.CreateVM_Task(config=spec, pool=pool, host=machine))

    def ready_master_target(self, vm: str = MASTER_TARGET) -> None:
        """disk.EnableUUID = TRUE on the master target VM, as the seed asks."""
        option = vim.option.OptionValue(key="disk.EnableUUID", value="TRUE")
        self.wait(
            self.find(vim.VirtualMachine, vm).ReconfigVM_Task(
                spec=vim.vm.ConfigSpec(extraConfig=[option])
            )
        )

    def power_off(self, vm: str = FAILBACK_VM) -> None:
        self.wait(self.find(vim.VirtualMachine, vm).PowerOffVM_Task())

    def disk_identity(self, vm: str, index: int = 0) -> tuple[str, str]:
        """(file, 32 hex digits of the UUID) of a VM's disk, read by the test's own calls."""
        machine = self.find(vim.VirtualMachine, vm)
        disks = [
            d for d in machine.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
        ]
        file = disks[index].backing.fileName
        content = self.admin().content
        datacenter = content.rootFolder.childEntity[0]
        uuid = content.virtualDiskManager.QueryVirtualDiskUuid(name=file, datacenter=datacenter)
        return file, uuid.replace(" ", "").replace("-", "").lower()

    def write_config(
        self,
        directory: Path,
        *,
        user: tuple[str, str] = ADMIN,
        password_in_file: bool = True,
        master_target_vm: str = MASTER_TARGET,
        device_wait_s: float = 5.0,
        ca_file: Path | None = None,
        level: str = "info",
    ) -> Path:
        """A vSphere config file, its password file (0600), and the guest's folders."""
        for name in ("by-id", "scsi_host/host0", "scsi_host/host1", "block", "dev"):
            (directory / name).mkdir(parents=True, exist_ok=True)
        for host in ("host0", "host1"):
            (directory / "scsi_host" / host / "scan").touch()
        lines = [
            f'host = "{self.host}"',
            f"port = {self.port}",
            f'user = "{user[0]}"',
            f'ca_file = "{ca_file or self.ca_file}"',
            f'master_target_vm = "{master_target_vm}"',
        ]
        if password_in_file:
            secret = directory / "vsphere.password"
            secret.write_text(user[1] + "\n")
            secret.chmod(0o600)
            lines.append(f'password_file = "{secret}"')
        lines += [
            "[guest]",
            f'device_dir = "{directory / "by-id"}"',
            f'scsi_host_dir = "{directory / "scsi_host"}"',
            f'block_dir = "{directory / "block"}"',
            f"device_wait_s = {device_wait_s}",
            "[logging]",
            f'level = "{level}"',
        ]
        config = directory / "vsphere.toml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def close(self) -> None:
        if self._admin is not None:
            Disconnect(self._admin)
        if self.process.stdin is not None:
            self.process.stdin.close()  # the launcher stops when its standard input closes
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_vcsim(tmp_path: Path) -> Iterator[Callable[..., Vcsim]]:
    """Start simulators: ``start_vcsim(host_editions={HOST: EDITION}, relocating=(VM,))``."""
    if not LAUNCHER.is_file():
        missing_peer(
            f"{LAUNCHER} is not built (./scripts/test builds it with golang-go and"
            " golang-github-vmware-govmomi-dev)"
        )
    started: list[Vcsim] = []

    def start(
        *, host_editions: dict[str, str] | None = None, relocating: tuple[str, ...] = ()
    ) -> Vcsim:
        root = tmp_path / f"vcsim{len(started)}"
        (root / "tmp").mkdir(parents=True)
        args = [str(LAUNCHER), "-dir", str(root)]
        for (name, password), role in (
            (ADMIN, "Admin"),
            (READ_ONLY, "ReadOnly"),
            (NO_DATASTORES, "NoDatastoreAccess"),
        ):
            args += ["-account", f"{name}:{password}:{role}"]
        for host, edition in (host_editions or {}).items():
            args += ["-host-edition", f"{host}={edition}"]
        for vm in relocating:
            args += ["-relocating", vm]
        with (root / "vcsim.log").open("wb") as log:
            process = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, "TMPDIR": str(root / "tmp")},
            )
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(START_TIMEOUT_S):
                process.kill()
                pytest.fail(f"vcsim did not start within {START_TIMEOUT_S} s: {root / 'vcsim.log'}")
        ready = json.loads(process.stdout.readline() or b"null")
        if ready is None:
            pytest.fail(f"vcsim exited at start: {(root / 'vcsim.log').read_text()}")
        vcsim = Vcsim(ready["url"], Path(ready["ca_file"]), root, process)
        started.append(vcsim)
        return vcsim

    yield start
    for vcsim in started:
        vcsim.close()


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_vsphere(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """Run ``mastertarget vsphere ARGS`` as an operator would; its exit status and output."""
    done = subprocess.run(
        [sys.executable, "-m", "mastertarget.cli", "vsphere", *map(str, args)],
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
        cwd=ROOT,
        check=False,
        env={**{k: v for k, v in os.environ.items() if k != PASSWORD_ENV}, **(env or {})},
    )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    yield
    while RUNNING:
        RUNNING.pop().kill_if_running()
