"""mastertarget vsphere discover and preflight against vcsim: each seed condition
fails the check that names it, and only that one."""

from __future__ import annotations

from pathlib import Path

from pyVmomi import vim

from .conftest import FAILBACK_VM, MASTER_TARGET, NO_DATASTORES, READ_ONLY, run_vsphere


def _checks(result_json: dict[str, object]) -> dict[str, dict[str, str]]:
    checks = result_json["checks"]
    assert isinstance(checks, list)
    return {check["id"]: check for check in checks}


def _failed(result_json: dict[str, object]) -> set[str]:
    return {i for i, c in _checks(result_json).items() if c["status"] == "fail"}


def test_discover_lists_hosts_datastores_and_vms(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    config = vcsim.write_config(tmp_path)

    result = run_vsphere("discover", "--config", config, "--json")

    assert result.code == 0, result.err
    report = result.json()
    assert sorted(h["name"] for h in report["hosts"]) == [
        "DC0_C0_H0",
        "DC0_C0_H1",
        "DC0_C0_H2",
        "DC0_H0",
    ]
    assert all(h["licences"][0]["free"] is False for h in report["hosts"])
    (datastore,) = report["datastores"]
    assert datastore["name"] == "LocalDS_0"
    assert sorted(datastore["mounted_on"]) == ["DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2", "DC0_H0"]
    assert datastore["missing_privileges"] == []
    assert datastore["capacity_bytes"] > datastore["free_bytes"] > 0
    vms = {vm["name"]: vm for vm in report["vms"]}
    assert set(vms) == {"DC0_H0_VM0", "DC0_H0_VM1", MASTER_TARGET, FAILBACK_VM}
    assert vms[FAILBACK_VM]["disks"][0]["file"] == f"[LocalDS_0] {FAILBACK_VM}/disk1.vmdk"
    assert vms[FAILBACK_VM]["power_state"] == "poweredOn"
    assert "VM Network" in {n["name"] for n in report["networks"]}
    assert report["problems"] == []

    text = run_vsphere("discover", "--config", config)
    assert text.code == 0, text.err
    assert "LocalDS_0" in text.out
    assert MASTER_TARGET in text.out


def test_preflight_passes_when_the_seed_conditions_hold(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    vcsim.ready_master_target()
    vcsim.power_off(FAILBACK_VM)
    config = vcsim.write_config(tmp_path)

    result = run_vsphere("preflight", "--config", config, "--vm", FAILBACK_VM, "--json")

    assert result.code == 0, result.out + result.err
    assert result.json()["ok"] is True
    assert set(_checks(result.json())) == {
        "master-target-disk-uuid",
        "master-target-snapshots",
        "master-target-relocation",
        "master-target-host",
        "licence",
        "failback-vm-snapshots",
        "failback-vm-power",
        "datastore-access",
        "permissions",
    }
    assert _failed(result.json()) == set()


def test_a_snapshot_on_the_vm_to_fail_back_to_fails_preflight(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    vcsim.ready_master_target()
    vcsim.power_off(FAILBACK_VM)
    vm = vcsim.find(vim.VirtualMachine, FAILBACK_VM)
    vcsim.wait(
        vm.CreateSnapshot_Task(name="before-upgrade", description="", memory=False, quiesce=False)
    )
    config = vcsim.write_config(tmp_path)

    result = run_vsphere("preflight", "--config", config, "--vm", FAILBACK_VM, "--json")

    assert result.code == 1
    assert _failed(result.json()) == {"failback-vm-snapshots"}
    check = _checks(result.json())["failback-vm-snapshots"]
    assert "'before-upgrade'" in check["message"]
    assert "Delete All" in check["remedy"]
    text = run_vsphere("preflight", "--config", config, "--vm", FAILBACK_VM)
    assert text.code == 1
    assert "FAIL failback-vm-snapshots" in text.out
    assert "9 checks, 1 failed" in text.out


def test_master_target_without_disk_enable_uuid_fails_preflight(
    start_vcsim, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    config = vcsim.write_config(tmp_path)

    unset = run_vsphere("preflight", "--config", config, "--json")
    option = vim.option.OptionValue(key="disk.EnableUUID", value="FALSE")
    vm = vcsim.find(vim.VirtualMachine, MASTER_TARGET)
    vcsim.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=[option])))
    false = run_vsphere("preflight", "--config", config, "--json")

    assert (unset.code, false.code) == (1, 1)
    assert _failed(unset.json()) == _failed(false.json()) == {"master-target-disk-uuid"}
    assert (
        "disk.EnableUUID is not set" in _checks(unset.json())["master-target-disk-uuid"]["message"]
    )
    assert (
        "disk.EnableUUID is 'FALSE'" in _checks(false.json())["master-target-disk-uuid"]["message"]
    )


def test_a_datastore_the_master_targets_host_cannot_reach_fails_preflight(
    start_vcsim,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    vcsim = start_vcsim()
    vcsim.ready_master_target()
    # A VM on the standalone host, on a datastore only that host mounts.
    host = vcsim.find(vim.HostSystem, "DC0_H0")
    (tmp_path / "local").mkdir()
    local = host.configManager.datastoreSystem.CreateLocalDatastore(
        name="LocalOnly_H0", path=str(tmp_path / "local")
    )
    vcsim.create_vm("onlyOnH0", "DC0_H0", "LocalOnly_H0")
    assert local.name == "LocalOnly_H0"
    config = vcsim.write_config(tmp_path)

    result = run_vsphere("preflight", "--config", config, "--vm", "onlyOnH0", "--json")

    assert result.code == 1
    assert _failed(result.json()) == {"datastore-access"}
    message = _checks(result.json())["datastore-access"]["message"]
    mt_host = vcsim.find(vim.VirtualMachine, MASTER_TARGET).runtime.host.name
    assert f"datastore LocalOnly_H0 is not mounted on host {mt_host}" in message


def test_a_master_target_being_storage_vmotioned_fails_preflight(
    start_vcsim, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim(relocating=(MASTER_TARGET,))
    vcsim.ready_master_target()
    config = vcsim.write_config(tmp_path)

    result = run_vsphere("preflight", "--config", config, "--json")

    assert result.code == 1
    assert _failed(result.json()) == {"master-target-relocation"}
    check = _checks(result.json())["master-target-relocation"]
    assert "VirtualMachine.relocate" in check["message"]
    assert "running" in check["message"]
    assert "Storage DRS" in check["remedy"]


def test_a_free_esxi_licence_fails_preflight(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The simulator places VMs on the cluster's hosts at random: make them all free.
    cluster = {f"DC0_C0_H{i}": "esxBasic" for i in range(3)}
    vcsim = start_vcsim(host_editions=cluster)
    mt_host = vcsim.find(vim.VirtualMachine, MASTER_TARGET).runtime.host.name
    vcsim.ready_master_target()
    config = vcsim.write_config(tmp_path)

    result = run_vsphere("preflight", "--config", config, "--json")
    discovered = run_vsphere("discover", "--config", config, "--json")

    assert result.code == 1
    assert _failed(result.json()) == {"licence"}
    assert (
        f"host {mt_host} (VMware vSphere Hypervisor) runs a free ESXi edition"
        in (_checks(result.json())["licence"]["message"])
    )
    hosts = {h["name"]: h for h in discovered.json()["hosts"]}
    assert hosts[mt_host]["licences"] == [
        {"edition": "esxBasic", "name": "VMware vSphere Hypervisor", "free": True}
    ]
    assert hosts["DC0_H0"]["licences"][0]["free"] is False


def test_a_read_only_account_is_a_permissions_problem(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    vcsim.ready_master_target()
    vcsim.power_off(FAILBACK_VM)
    config = vcsim.write_config(tmp_path, user=READ_ONLY)

    discovered = run_vsphere("discover", "--config", config, "--json")
    checked = run_vsphere("preflight", "--config", config, "--vm", FAILBACK_VM, "--json")

    assert discovered.code == 77  # EX_NOPERM
    report = discovered.json()
    assert report["datastores"][0]["missing_privileges"] == [
        "Datastore.Browse",
        "Datastore.AllocateSpace",
        "Datastore.FileManagement",
    ]
    (problem,) = report["problems"]
    assert problem["kind"] == "permissions"
    assert "read-only account" in problem["message"]
    assert READ_ONLY[0] in problem["message"]
    assert checked.code == 1
    assert _failed(checked.json()) == {"permissions"}
    message = _checks(checked.json())["permissions"]["message"]
    assert "Datastore.AllocateSpace" in message
    assert "VirtualMachine.Config.AddExistingDisk" in message


def test_an_account_that_cannot_list_datastores_is_not_told_there_are_none(
    start_vcsim,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    vcsim = start_vcsim()
    vcsim.ready_master_target()
    vcsim.power_off(FAILBACK_VM)
    config = vcsim.write_config(tmp_path, user=NO_DATASTORES)

    discovered = run_vsphere("discover", "--config", config, "--json")
    text = run_vsphere("discover", "--config", config)
    checked = run_vsphere("preflight", "--config", config, "--vm", FAILBACK_VM, "--json")

    assert discovered.code == 77
    report = discovered.json()
    assert report["datastores"] == []
    assert [p["kind"] for p in report["problems"]] == ["permissions"]
    message = report["problems"][0]["message"]
    assert "cannot list the datastores of datacenter DC0" in message
    assert "lacks System.View" in message
    assert "not an empty datacenter" in message
    assert text.code == 77
    assert "PROBLEM (permissions)" in text.out
    assert checked.code == 1
    assert (
        "datastore LocalDS_0 is not in the inventory"
        in (_checks(checked.json())["datastore-access"]["message"])
    )
