"""Preflight: what must hold in vSphere before disks move between VMs.

Each check answers one condition of the failback seed with pass or fail, a
message saying what was expected and what was found, and what to do. The
operations (attach, create-vm) run the checks that concern them first and
change nothing when one fails.

| check | seed condition |
|---|---|
| ``master-target-disk-uuid`` | disk.EnableUUID = TRUE on the master target VM |
| ``master-target-snapshots`` | no snapshots on the master target VM |
| ``master-target-relocation`` | the master target VM is not being storage-vMotioned |
| ``master-target-host`` | its host is connected and not in maintenance mode |
| ``licence`` | no host involved runs a free ESXi edition |
| ``failback-vm-snapshots`` | no snapshots on the VM to fail back to |
| ``failback-vm-power`` | that VM is powered off (ESXi locks a running VM's disks) |
| ``datastore-access`` | the master target's host reaches every datastore involved |
| ``datastore-space`` | the datastore of a new VM has room for its disks |
| ``vm-name`` | the name of a new VM is free |
| ``permissions`` | the account holds the privileges the operation needs |
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from mastertarget.errors import VspherePermissionError
from mastertarget.vsphere.inventory import (
    ENABLE_UUID_OPTION,
    Datastore,
    Inventory,
    Network,
    Vm,
    datastore_of_path,
)
from mastertarget.vsphere.session import TASK_UNFINISHED, Licence, Ref, VsphereSession

#: What the master target VM's account must be allowed on it: add the
#: replicated disks, remove them after failback, add a SCSI controller.
MASTER_TARGET_PRIVILEGES: Final = (
    "VirtualMachine.Config.AddExistingDisk", "VirtualMachine.Config.RemoveDisk",
    "VirtualMachine.Config.AddRemoveDevice",
)  # fmt: skip
#: On every datastore holding disks that move: find them, give them space, and
#: work on their files. A read-only account lacks these: the seed's symptom of
#: "datastores cannot be discovered" during reprotect.
DATASTORE_PRIVILEGES: Final = (
    "Datastore.Browse", "Datastore.AllocateSpace", "Datastore.FileManagement",
)  # fmt: skip
#: On the datacenter's VM folder, to create the VM of a failed-back physical server.
VM_FOLDER_PRIVILEGES: Final = (
    "VirtualMachine.Inventory.Create",
    "VirtualMachine.Config.AddNewDisk",
)
#: On the resource pool of the master target's host, for that new VM.
RESOURCE_POOL_PRIVILEGES: Final = ("Resource.AssignVMToPool",)
#: On the network the new VM is connected to.
NETWORK_PRIVILEGES: Final = ("Network.Assign",)
#: The privilege to see an object at all; without it vCenter leaves it out.
VIEW_PRIVILEGE: Final = "System.View"
#: Edition keys of the free ESXi (vSphere Hypervisor): its API is read-only,
#: so failover works and failback fails (the seed). Newer free editions end
#: their key in ".free" (esx.hypervisor.free).
FREE_EDITION_KEYS: Final = frozenset({"esxBasic"})
FREE_EDITION_SUFFIX: Final = ".free"
#: Task types that move a VM: storage vMotion (relocate) and vMotion (migrate).
RELOCATION_TASKS: Final = frozenset({"VirtualMachine.relocate", "VirtualMachine.migrate"})


class Status(enum.StrEnum):
    PASS = "pass"  # noqa: S105 - a check outcome, not a password
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """The outcome of one check; ``remedy`` says what to do when it failed."""

    id: str
    status: Status
    message: str
    remedy: str = ""

    def to_json(self) -> dict[str, str]:
        """The check as JSON."""
        return {"id": self.id, "status": self.status.value, "message": self.message,
                "remedy": self.remedy}  # fmt: skip


def passed(check_id: str, message: str) -> Check:
    return Check(check_id, Status.PASS, message)


def failed(check_id: str, message: str, remedy: str) -> Check:
    return Check(check_id, Status.FAIL, message, remedy)


@dataclass(frozen=True)
class Plan:
    """What is about to happen, so the checks know what concerns it.

    Args:
        master_target: this master target's VM.
        failback_vm: the VM whose disks are attached to the master target
            (the VM failed back to), if any.
        new_vm_name: the name of a VM about to be created, if any.
        datastore_name: the datastore of that new VM.
        new_bytes: the size of its disks.
        network: the network of its adapter, if any.
    """

    master_target: Vm
    failback_vm: Vm | None = None
    new_vm_name: str | None = None
    datastore_name: str | None = None
    new_bytes: int = 0
    network: Network | None = None


def run_preflight(session: VsphereSession, inventory: Inventory, plan: Plan) -> list[Check]:
    """Every check that concerns ``plan``, in the order of the table above."""
    mt = plan.master_target
    checks = [
        _check_enable_uuid(mt),
        _check_no_snapshots("master-target-snapshots", mt, "the master target VM"),
        _check_not_relocating(session, mt),
        _check_host(inventory, mt),
        _check_licences(session, inventory, plan),
    ]
    if plan.failback_vm is not None:
        checks += [
            _check_no_snapshots(
                "failback-vm-snapshots", plan.failback_vm, "the VM to fail back to"
            ),
            _check_powered_off(plan.failback_vm),
        ]
    checks.append(_check_datastores(inventory, plan))
    if plan.new_vm_name is not None:
        checks += [_check_space(inventory, plan), _check_name_free(inventory, plan)]
    checks.append(_check_permissions(session, inventory, plan))
    return checks


def is_free_edition(licence: Licence) -> bool:
    """Whether a host licence is a free ESXi edition."""
    key = licence.edition_key
    return key in FREE_EDITION_KEYS or key.endswith(FREE_EDITION_SUFFIX)


def _check_enable_uuid(mt: Vm) -> Check:
    value = mt.option(ENABLE_UUID_OPTION)
    if value is not None and value.strip().lower() == "true":
        return passed("master-target-disk-uuid", f"{ENABLE_UUID_OPTION} = {value} on VM {mt.name}")
    found = "is not set" if value is None else f"is {value!r}"
    return failed(
        "master-target-disk-uuid",
        f"{ENABLE_UUID_OPTION} {found} on the master target VM {mt.name}: expected TRUE, without"
        " which the disks attached to it show no stable SCSI identity to find them by",
        f"shut {mt.name} down, add {ENABLE_UUID_OPTION} = TRUE in Edit Settings > VM Options >"
        " Advanced > Configuration Parameters, and power it on",
    )


def _check_no_snapshots(check_id: str, vm: Vm, role: str) -> Check:
    if not vm.snapshots:
        return passed(check_id, f"{role} {vm.name} has no snapshots")
    names = ", ".join(repr(name) for name in vm.snapshots)
    return failed(
        check_id,
        f"{role} {vm.name} has {len(vm.snapshots)} snapshot(s): {names}; expected none (writing"
        " to the base disks of a VM with snapshots corrupts it, and failback fails)",
        f"delete the snapshots of {vm.name} (Snapshots > Manage Snapshots > Delete All) and"
        " wait for the consolidation to end",
    )


def _check_not_relocating(session: VsphereSession, mt: Vm) -> Check:
    manager = session.collect_refs([session.task_manager], ["recentTask"])
    recent = manager[0].get("recentTask", ()) if manager else ()
    tasks = sorted({*mt.recent_tasks, *(t for t in recent if isinstance(t, Ref))})
    paths = ("info.entity", "info.descriptionId", "info.state")
    moving = [
        task
        for task in session.collect_refs(tasks, paths)
        if task.get("info.entity") == mt.ref
        and task.get("info.descriptionId") in RELOCATION_TASKS
        and task.get("info.state") in TASK_UNFINISHED
    ]
    if not moving:
        return passed("master-target-relocation", f"no migration of VM {mt.name} is under way")
    described = ", ".join(
        f"{t.get('info.descriptionId')} ({t.ref.value}, {t.get('info.state')})" for t in moving
    )
    return failed(
        "master-target-relocation",
        f"the master target VM {mt.name} is being moved: {described}; expected no storage vMotion"
        " (the seed: a master target that is storage-vMotioned loses the disks attached to it)",
        f"wait for the migration of {mt.name} to end, and exclude it from Storage DRS"
        " (VM Overrides: Storage DRS automation = Disabled)",
    )


def _check_host(inventory: Inventory, mt: Vm) -> Check:
    host = inventory.host(mt.host)
    if host is None:
        return failed(
            "master-target-host",
            f"the host of the master target VM {mt.name} ({mt.host}) is not visible to"
            f" {inventory.user}",
            f"grant {inventory.user} at least Read-only on the host of {mt.name}",
        )
    if host.connection_state != "connected" or host.maintenance:
        state = "in maintenance mode" if host.maintenance else host.connection_state
        return failed(
            "master-target-host",
            f"host {host.name} of the master target VM is {state}: expected connected",
            f"reconnect host {host.name} or take it out of maintenance mode",
        )
    return passed("master-target-host", f"host {host.name} is connected ({host.product})")


def _check_licences(session: VsphereSession, inventory: Inventory, plan: Plan) -> Check:
    vms = [plan.master_target, *([plan.failback_vm] if plan.failback_vm else [])]
    refs = sorted({vm.host for vm in vms if vm.host is not None})
    free: list[str] = []
    for ref in refs:
        host = inventory.host(ref)
        name = host.name if host else str(ref)
        free += [
            f"{name} ({lic.name or lic.edition_key})"
            for lic in session.host_licences(ref)
            if is_free_edition(lic)
        ]
    if free:
        return failed(
            "licence",
            f"host {', '.join(free)} runs a free ESXi edition: its API is read-only, so failover"
            " works and failback fails (expected an evaluation or paid licence)",
            "assign an evaluation or a paid vSphere licence to the host (Configure > Licensing)",
        )
    hosts = ", ".join(h.name for h in (inventory.host(r) for r in refs) if h)
    return passed("licence", f"no free ESXi edition on {hosts or 'the hosts involved'}")


def _check_powered_off(vm: Vm) -> Check:
    if vm.power_state == "poweredOff":
        return passed("failback-vm-power", f"VM {vm.name} is powered off")
    return failed(
        "failback-vm-power",
        f"the VM to fail back to, {vm.name}, is {vm.power_state}: expected poweredOff (ESXi locks"
        " the disks of a running VM, and the master target must write them)",
        f"shut down {vm.name}; it is powered on again after failback",
    )


def _involved(inventory: Inventory, plan: Plan) -> Iterable[tuple[str, Datastore | None]]:
    """The datastores that disks move on, by name, with their record when visible."""
    names = [plan.datastore_name] if plan.datastore_name else []
    if plan.failback_vm is not None:
        names += [datastore_of_path(disk.file) for disk in plan.failback_vm.disks]
    datacenter = plan.master_target.datacenter
    for name in dict.fromkeys(n for n in names if n):
        yield (
            name,
            next(
                (d for d in inventory.datastores if d.name == name and d.datacenter == datacenter),
                None,
            ),
        )


def _check_datastores(inventory: Inventory, plan: Plan) -> Check:
    mt = plan.master_target
    host = inventory.host(mt.host)
    host_name = host.name if host else str(mt.host)
    problems: list[str] = []
    names: list[str] = []
    for name, datastore in _involved(inventory, plan):
        names.append(name)
        if datastore is None:
            problems.append(
                f"datastore {name} is not in the inventory {inventory.user} sees in datacenter"
                f" {mt.datacenter} (a wrong name, or the account lacks {VIEW_PRIVILEGE} on it: the"
                " read-only account symptom of the seed)"
            )
            continue
        mount = inventory.mount(mt.host, datastore)
        if not datastore.accessible:
            problems.append(f"datastore {name} is inaccessible")
        elif mount is None or not mount.mounted:
            problems.append(f"datastore {name} is not mounted on host {host_name}")
        elif not mount.accessible or mount.read_only:
            problems.append(f"host {host_name} mounts datastore {name} but cannot write it")
    if problems:
        return failed(
            "datastore-access",
            f"the master target's host {host_name} must reach every datastore involved: "
            + "; ".join(problems),
            f"mount the datastore on host {host_name} (or move the VM's disks to one it"
            " mounts), and grant the account access to it",
        )
    return passed(
        "datastore-access", f"host {host_name} reaches {', '.join(names) or 'every datastore'}"
    )


def _check_space(inventory: Inventory, plan: Plan) -> Check:
    datastore = next((d for _, d in _involved(inventory, plan) if d is not None), None)
    if datastore is None or datastore.name != plan.datastore_name:
        return failed(
            "datastore-space",
            f"the free space of datastore {plan.datastore_name} is not known: it is not visible",
            "see datastore-access",
        )
    if datastore.free_bytes >= plan.new_bytes:
        return passed(
            "datastore-space",
            f"datastore {datastore.name} has {datastore.free_bytes} bytes free for"
            f" {plan.new_bytes}",
        )
    return failed(
        "datastore-space",
        f"datastore {datastore.name} has {datastore.free_bytes} bytes free: expected at least"
        f" {plan.new_bytes} for the new disks (failback writes every block of them)",
        f"free space on {datastore.name}, or give --datastore another one that the master"
        " target's host mounts",
    )


def _check_name_free(inventory: Inventory, plan: Plan) -> Check:
    name = plan.new_vm_name or ""
    taken = [
        vm
        for vm in inventory.vms
        if vm.name == name and vm.datacenter == plan.master_target.datacenter
    ]
    if not taken:
        return passed("vm-name", f"no VM is named {name!r} yet")
    return failed(
        "vm-name",
        f"a VM named {name!r} exists already ({taken[0].ref}): expected a new name",
        "choose another --name, or fail back to that VM with attach --vm",
    )


def required_privileges(inventory: Inventory, plan: Plan) -> dict[Ref, tuple[str, tuple[str, ...]]]:
    """The privileges ``plan`` needs, by entity: (how to name the entity, privileges)."""
    mt = plan.master_target
    needed: dict[Ref, tuple[str, tuple[str, ...]]] = {
        mt.ref: (f"VM {mt.name}", MASTER_TARGET_PRIVILEGES)
    }
    for name, datastore in _involved(inventory, plan):
        if datastore is not None:
            needed[datastore.ref] = (f"datastore {name}", DATASTORE_PRIVILEGES)
    if plan.new_vm_name is not None:
        center = inventory.datacenter(mt.datacenter)
        needed[center.vm_folder] = (f"the VM folder of {center.name}", VM_FOLDER_PRIVILEGES)
        host = inventory.host(mt.host)
        if host is not None and host.resource_pool is not None:
            needed[host.resource_pool] = (
                f"the resource pool of {host.name}",
                RESOURCE_POOL_PRIVILEGES,
            )
        if plan.network is not None:
            needed[plan.network.ref] = (f"network {plan.network.name}", NETWORK_PRIVILEGES)
    return needed


def missing_privileges(
    session: VsphereSession, needed: dict[Ref, tuple[str, tuple[str, ...]]]
) -> list[tuple[str, tuple[str, ...]]]:
    """Per entity (by its description), the privileges of ``needed`` the session lacks."""
    every = sorted({p for _, privileges in needed.values() for p in privileges})
    granted = session.granted(list(needed), every)
    lacking = []
    for ref, (described, privileges) in needed.items():
        missing = tuple(p for p in privileges if p not in granted.get(ref, frozenset()))
        if missing:
            lacking.append((described, missing))
    return lacking


def _check_permissions(session: VsphereSession, inventory: Inventory, plan: Plan) -> Check:
    try:
        lacking = missing_privileges(session, required_privileges(inventory, plan))
    except VspherePermissionError as exc:
        lacking = [("the entities involved", (str(exc.details.get("privilege", "System.Read")),))]
    if not lacking:
        return passed("permissions", f"{inventory.user} holds every privilege needed")
    described = "; ".join(f"{', '.join(p)} on {what}" for what, p in lacking)
    return failed(
        "permissions",
        f"the account {inventory.user} lacks {described}",
        f"give {inventory.user} a role with these privileges (docs/operations.md, vSphere:"
        " the account), or use another account",
    )


def failures(checks: Sequence[Check]) -> list[Check]:
    """The checks that failed."""
    return [check for check in checks if check.status is Status.FAIL]
