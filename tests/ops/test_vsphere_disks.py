"""mastertarget vsphere attach, detach and create-vm against vcsim.

Inside the master target, udev links each disk by its SCSI identity in
/dev/disk/by-id; the tests give the commands a folder laid out the same way
(a ``wwn-0x<identity>`` link to a device node stand-in) and a sysfs folder
of SCSI hosts and block devices, and check what the commands did to them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from mastertarget.errors import VspherePermissionError
from mastertarget.vsphere import specs
from mastertarget.vsphere.config import Secret, load
from mastertarget.vsphere.inventory_reader import load_inventory
from mastertarget.vsphere.session import VsphereSession

from .conftest import FAILBACK_VM, MASTER_TARGET, READ_ONLY, Vcsim, run_vsphere


def _disks(vcsim: Vcsim, vm: str) -> list[Any]:
    machine = vcsim.find(vim.VirtualMachine, vm)
    return [d for d in machine.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def _link(root: Path, identity: str, device: str) -> Path:
    """A udev-style by-id link to a device node stand-in, and its sysfs entry."""
    node = root / "dev" / device
    node.touch()
    (root / "by-id" / f"wwn-0x{identity}").symlink_to(node)
    (root / "block" / device / "device").mkdir(parents=True)
    (root / "block" / device / "device" / "delete").touch()
    (root / "block" / device / "holders").mkdir()
    (root / "block" / device / "dev").write_text("259:4077\n")  # a number nothing mounts
    return node


def _ready(vcsim: Vcsim) -> None:
    vcsim.ready_master_target()
    vcsim.power_off(FAILBACK_VM)


def test_attach_finds_the_disk_by_scsi_identity_and_detach_keeps_its_file(
    start_vcsim,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    vcsim = start_vcsim()
    _ready(vcsim)
    config = vcsim.write_config(tmp_path)
    file, identity = vcsim.disk_identity(FAILBACK_VM)
    node = _link(tmp_path, identity, "sdq")
    disks_before = len(_disks(vcsim, MASTER_TARGET))

    attached = run_vsphere("attach", "--config", config, "--vm", FAILBACK_VM, "--json")

    assert attached.code == 0, attached.err
    (disk,) = attached.json()["disks"]
    assert disk["file"] == file
    assert disk["scsi_identity"] == identity
    assert disk["device"] == str(node)
    assert disk["link"] == str(tmp_path / "by-id" / f"wwn-0x{identity}")
    assert disk["changed"] is True
    on_mt = [d for d in _disks(vcsim, MASTER_TARGET) if d.backing.fileName == file]
    assert len(on_mt) == 1
    assert on_mt[0].backing.diskMode == "independent_persistent"
    assert (disk["bus"], disk["unit"]) != (None, None)
    assert (tmp_path / "scsi_host" / "host0" / "scan").read_text() == "- - -"

    again = run_vsphere("attach", "--config", config, "--vm", FAILBACK_VM, "--json")
    assert again.code == 0, again.err
    assert again.json()["disks"][0]["changed"] is False
    assert len(_disks(vcsim, MASTER_TARGET)) == disks_before + 1

    detached = run_vsphere("detach", "--config", config, "--vm", FAILBACK_VM, "--json")

    assert detached.code == 0, detached.err
    assert [d["changed"] for d in detached.json()["disks"]] == [True]
    assert len(_disks(vcsim, MASTER_TARGET)) == disks_before
    assert [d.backing.fileName for d in _disks(vcsim, FAILBACK_VM)] == [file]
    datastore_dir = Path(vcsim.find(vim.Datastore, "LocalDS_0").summary.url)
    assert (datastore_dir / FAILBACK_VM / "disk1.vmdk").exists()
    assert (tmp_path / "block" / "sdq" / "device" / "delete").read_text() == "1"
    text = run_vsphere("detach", "--config", config, "--vm", FAILBACK_VM)
    assert text.code == 0, text.err
    assert f"was not attached: {file}" in text.out


def test_attach_changes_nothing_when_preflight_fails(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    _ready(vcsim)
    vm = vcsim.find(vim.VirtualMachine, FAILBACK_VM)
    vcsim.wait(vm.CreateSnapshot_Task(name="pre-patch", memory=False, quiesce=False))
    config = vcsim.write_config(tmp_path)
    disks_before = len(_disks(vcsim, MASTER_TARGET))

    result = run_vsphere("attach", "--config", config, "--vm", FAILBACK_VM)

    assert result.code == 1
    assert "nothing was changed" in result.err
    assert "failback-vm-snapshots" in result.err
    assert "'pre-patch'" in result.err
    assert len(_disks(vcsim, MASTER_TARGET)) == disks_before


def test_attach_says_when_the_disk_does_not_appear_inside(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    _ready(vcsim)
    config = vcsim.write_config(tmp_path, device_wait_s=0.3)
    _, identity = vcsim.disk_identity(FAILBACK_VM)

    result = run_vsphere("attach", "--config", config, "--vm", FAILBACK_VM)

    assert result.code == 69
    assert f"no device with SCSI identity {identity} appeared" in result.err
    assert "the disks stay attached" in result.err
    assert len(_disks(vcsim, MASTER_TARGET)) == 2  # its own and the attached one


def test_detach_refuses_a_disk_mounted_inside(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    _ready(vcsim)
    config = vcsim.write_config(tmp_path)
    _, identity = vcsim.disk_identity(FAILBACK_VM)
    _link(tmp_path, identity, "sdq")
    assert run_vsphere("attach", "--config", config, "--vm", FAILBACK_VM).code == 0
    # The stand-in device now has the number of a file system that is mounted here.
    mounted = os.stat(tmp_path).st_dev
    (tmp_path / "block" / "sdq" / "dev").write_text(f"{os.major(mounted)}:{os.minor(mounted)}\n")

    result = run_vsphere("detach", "--config", config, "--vm", FAILBACK_VM)

    assert result.code == 69
    assert "nothing was detached" in result.err
    assert "sdq is mounted at" in result.err
    assert len(_disks(vcsim, MASTER_TARGET)) == 2
    assert (tmp_path / "block" / "sdq" / "device" / "delete").read_text() == ""


def test_create_vm_makes_a_failback_vm_on_the_master_targets_datastore(
    start_vcsim,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    vcsim = start_vcsim()
    vcsim.ready_master_target()
    config = vcsim.write_config(tmp_path)

    result = run_vsphere(
        "create-vm",
        "--config",
        config,
        "--name",
        "fs01-failback",
        "--disk-size",
        "1G",
        "--disk-size",
        "512M",
        "--cpus",
        "4",
        "--memory-mib",
        "8192",
        "--firmware",
        "efi",
        "--network",
        "VM Network",
        "--json",
    )

    assert result.code == 0, result.err
    created = result.json()
    assert created["vmx"].startswith("[LocalDS_0] fs01-failback/")
    assert [d["capacity_bytes"] for d in created["disks"]] == [2**30, 2**29]
    assert all(len(d["scsi_identity"]) == 32 for d in created["disks"])
    vm = vcsim.find(vim.VirtualMachine, "fs01-failback")
    mt = vcsim.find(vim.VirtualMachine, MASTER_TARGET)
    assert vm.runtime.host == mt.runtime.host
    assert vm.runtime.powerState == "poweredOff"
    assert (vm.config.hardware.numCPU, vm.config.hardware.memoryMB, vm.config.firmware) == (
        4,
        8192,
        "efi",
    )
    assert {o.key: o.value for o in vm.config.extraConfig}["disk.EnableUUID"] == "TRUE"
    assert [d.backing.thinProvisioned for d in _disks(vcsim, "fs01-failback")] == [False, False]
    nics = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualVmxnet3)]
    assert [n.backing.deviceName for n in nics] == ["VM Network"]

    attached = run_vsphere(
        "attach", "--config", config, "--vm", "fs01-failback", "--no-guest", "--json"
    )
    assert attached.code == 0, attached.err
    assert [d["file"] for d in attached.json()["disks"]] == [d["file"] for d in created["disks"]]

    again = run_vsphere(
        "create-vm", "--config", config, "--name", "fs01-failback", "--disk-size", "1G"
    )
    assert again.code == 1
    assert "vm-name: a VM named 'fs01-failback' exists already" in again.err


def test_create_vm_refuses_what_the_datastore_cannot_hold(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    vcsim.ready_master_target()
    config = vcsim.write_config(tmp_path)
    free = vcsim.find(vim.Datastore, "LocalDS_0").summary.freeSpace
    too_big = (free // 2**30 + 1) * 2**30

    result = run_vsphere(
        "create-vm", "--config", config, "--name", "huge", "--disk-size", str(too_big)
    )
    bad_size = run_vsphere("create-vm", "--config", config, "--name", "odd", "--disk-size", "1000")
    bad_unit = run_vsphere("create-vm", "--config", config, "--name", "odd", "--disk-size", "10Q")

    assert result.code == 1
    assert "datastore-space: datastore LocalDS_0 has" in result.err
    assert f"expected at least {too_big}" in result.err
    assert bad_size.code == 64
    assert "expected a positive multiple of 1024 bytes" in bad_size.err
    assert bad_unit.code == 2
    assert "expected a number of bytes" in bad_unit.err
    names = {
        vm.name
        for vm in vcsim.admin()
        .content.viewManager.CreateContainerView(
            vcsim.admin().content.rootFolder, [vim.VirtualMachine], True
        )
        .view
    }
    assert "huge" not in names
    assert "odd" not in names


def test_a_refused_change_names_the_missing_privilege(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    _ready(vcsim)
    config = load(vcsim.write_config(tmp_path, user=READ_ONLY))
    with VsphereSession.connect(config, Secret(READ_ONLY[1])) as session:
        inventory = load_inventory(session)
        mt, owner = inventory.vm(MASTER_TARGET), inventory.vm(FAILBACK_VM)
        slots, buses = specs.plan_slots(mt, 1)
        with pytest.raises(VspherePermissionError) as refused:
            session.reconfigure(mt.ref, specs.attach_spec(owner.disks, slots, buses), "attaching")
    assert refused.value.details["privilege"] == "VirtualMachine.Config.AddExistingDisk"
    assert f"attaching: the account {READ_ONLY[0]} lacks the privilege" in refused.value.message
    assert refused.value.exit_code == 77
