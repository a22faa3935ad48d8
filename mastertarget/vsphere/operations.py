"""Attach, detach and create: the changes ``mastertarget vsphere`` makes in vSphere.

Each runs the preflight checks that concern it first and changes nothing
when one fails. Attach and detach are idempotent: a disk already attached is
reported, not attached twice; detaching what is not attached does nothing.
Nothing here ever deletes a disk file: detach keeps it, and the only files
made are the new disks of :func:`create_vm`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from mastertarget.errors import (
    GuestDeviceError,
    PreflightFailedError,
    VsphereError,
    VsphereNotFoundError,
)
from mastertarget.vsphere import guest, specs
from mastertarget.vsphere.config import VsphereConfig
from mastertarget.vsphere.inventory import (
    Disk,
    Inventory,
    Vm,
    datastore_of_path,
)
from mastertarget.vsphere.inventory_reader import reload_vm
from mastertarget.vsphere.preflight import Check, Plan, failures, run_preflight
from mastertarget.vsphere.session import VsphereSession
from runtime.errors import InvalidArgumentError
from runtime.mounts import read_mount_table

#: vSphere sizes disks in KiB (capacityInKB).
DISK_SIZE_UNIT: Final = 1024
#: The largest VMDK vSphere makes: 62 TiB.
MAX_DISK_BYTES: Final = 62 * 2**40

log = logging.getLogger("blockrepl.mastertarget.vsphere")


@dataclass(frozen=True)
class MovedDisk:
    """A disk attached to (or detached from) the master target, and where this machine sees it.

    Args:
        file: the VMDK's datastore path.
        capacity_bytes: its size.
        identity: its SCSI identity (32 hex digits).
        bus, unit: its place on the master target's SCSI controllers (attach).
        device: ``/dev/sdX`` inside this machine; None when not looked for.
        link: the stable ``/dev/disk/by-id/wwn-0x...`` link to use as a target.
        changed: False when it already was as asked (attached, or not attached).
    """

    file: str
    capacity_bytes: int
    identity: str
    bus: int | None = None
    unit: int | None = None
    device: str | None = None
    link: str | None = None
    changed: bool = True

    def to_json(self) -> dict[str, object]:
        """The disk as JSON."""
        return {
            "file": self.file,
            "capacity_bytes": self.capacity_bytes,
            "scsi_identity": self.identity,
            "bus": self.bus,
            "unit": self.unit,
            "device": self.device,
            "link": self.link,
            "changed": self.changed,
        }


def require(checks: Sequence[Check], what: str) -> None:
    """Refuse ``what`` when a check failed: every failure, with what to do, in the message.

    Raises:
        PreflightFailedError: a check failed.
    """
    failed = failures(checks)
    if failed:
        lines = "; ".join(f"{c.id}: {c.message} (to do: {c.remedy})" for c in failed)
        raise PreflightFailedError(
            f"{what}: nothing was changed, {len(failed)} preflight check(s) failed: {lines}",
            details={"checks": [c.to_json() for c in checks]},
        )


def master_target(config: VsphereConfig, inventory: Inventory) -> Vm:
    """This master target's VM, named in the config."""
    return inventory.vm(config.master_target_vm)


def chosen_disks(vm: Vm, files: Sequence[str]) -> list[Disk]:
    """The disks of ``vm`` named by ``files``; every disk when none is named.

    Raises:
        VsphereNotFoundError: a file is not a disk of ``vm``.
    """
    if not files:
        return list(vm.disks)
    by_file = {disk.file: disk for disk in vm.disks}
    unknown = [f for f in files if f not in by_file]
    if unknown:
        have = ", ".join(by_file) or "none"
        raise VsphereNotFoundError(
            f"{', '.join(unknown)} is not a disk of VM {vm.name}; its disks: {have}"
        )
    return [by_file[f] for f in files]


def moved_disk(
    session: VsphereSession,
    inventory: Inventory,
    vm: Vm,
    disk: Disk,
    *,
    bus: int | None = None,
    unit: int | None = None,
    changed: bool = True,
) -> MovedDisk:
    """``disk`` of ``vm`` with its SCSI identity: from its backing, or read from its
    descriptor (vSphere versions that leave the backing's UUID out)."""
    text = disk.uuid or session.disk_uuid(inventory.datacenter(vm.datacenter).ref, disk.file)
    identity = guest.scsi_identity(text, disk=disk.file)
    return MovedDisk(disk.file, disk.capacity_bytes, identity, bus, unit, changed=changed)


def attach(
    session: VsphereSession,
    inventory: Inventory,
    config: VsphereConfig,
    *,
    vm_name: str,
    files: Sequence[str],
    look_inside: bool,
) -> tuple[list[Check], list[MovedDisk]]:
    """Attach the disks of VM ``vm_name`` (or those in ``files``) to the master target.

    Args:
        look_inside: wait for the disks to appear inside this machine (it
            runs on the master target VM) and report their devices.

    Raises:
        PreflightFailedError: a check failed; nothing was changed.
        GuestDeviceError: attached, but a disk did not appear inside this machine.
    """
    mt = master_target(config, inventory)
    owner = _other_vm(inventory, mt, vm_name)
    disks = chosen_disks(owner, files)
    checks = run_preflight(session, inventory, Plan(mt, failback_vm=owner))
    require(checks, f"attaching the disks of {owner.name} to {mt.name}")
    attached = {disk.file for disk in mt.disks}
    new = [disk for disk in disks if disk.file not in attached]
    if new:
        slots, buses = specs.plan_slots(mt, len(new))
        what = f"attaching {len(new)} disk(s) of VM {owner.name} to master target {mt.name}"
        session.reconfigure(mt.ref, specs.attach_spec(new, slots, buses), what)
        log.info("%s: %s", what, ", ".join(d.file for d in new))
    now = reload_vm(session, mt.ref, mt.datacenter)
    places = {d.file: d for d in now.disks}
    buses_by_key = {c.key: c.bus for c in now.controllers}
    result = []
    for disk in disks:
        placed = places.get(disk.file)
        if placed is None:
            raise VsphereError(f"{disk.file} is not on {mt.name} after the reconfigure ended")
        bus = buses_by_key.get(placed.controller_key)
        changed = disk.file not in attached
        result.append(
            moved_disk(session, inventory, owner, disk, bus=bus, unit=placed.unit, changed=changed)
        )
    if look_inside:
        found = guest.wait_for_devices(config.guest, [d.identity for d in result])
        result = [_with_device(d, found.get(d.identity)) for d in result]
    return checks, result


def detach(
    session: VsphereSession,
    inventory: Inventory,
    config: VsphereConfig,
    *,
    vm_name: str,
    files: Sequence[str],
    look_inside: bool,
) -> list[MovedDisk]:
    """Detach from the master target the disks of VM ``vm_name`` (or those in ``files``),
    keeping their files.

    Args:
        look_inside: refuse a disk still in use inside this machine (mounted,
            held by LVM, md or dm-crypt), and remove it from the kernel before
            vSphere takes it away.

    Raises:
        GuestDeviceError: a disk is in use inside this machine; nothing was changed.
    """
    mt = master_target(config, inventory)
    owner = _other_vm(inventory, mt, vm_name)
    wanted = {disk.file for disk in chosen_disks(owner, files)}
    on_mt = [disk for disk in mt.disks if disk.file in wanted]
    moved = [moved_disk(session, inventory, mt, disk) for disk in on_mt]
    if look_inside and moved:
        _release_inside(config, moved)
    if on_mt:
        what = f"detaching {len(on_mt)} disk(s) of VM {owner.name} from master target {mt.name}"
        session.reconfigure(mt.ref, specs.detach_spec(on_mt), what)
        log.info("%s: %s (files kept)", what, ", ".join(d.file for d in on_mt))
    kept = sorted(wanted - {d.file for d in on_mt})
    return moved + [MovedDisk(file=f, capacity_bytes=0, identity="", changed=False) for f in kept]


def _release_inside(config: VsphereConfig, moved: Sequence[MovedDisk]) -> None:
    """Refuse if a disk is in use here; otherwise make the kernel forget each one."""
    present = [
        found for d in moved if (found := guest.find_device(config.guest.device_dir, d.identity))
    ]
    mounts = read_mount_table()
    busy = [
        f"{d.device} ({use})" for d in present for use in guest.uses_of(config.guest, d, mounts)
    ]
    if busy:
        raise GuestDeviceError(
            f"nothing was detached: {'; '.join(busy)}. Stop replicating to the disk (remove its"
            " [[disks]] table and restart mastertarget), unmount it, and try again"
        )
    for device in present:
        guest.forget_device(config.guest, device)


def create_vm(
    session: VsphereSession,
    inventory: Inventory,
    config: VsphereConfig,
    request: specs.NewVm,
    *,
    datastore_name: str | None,
    network_name: str | None,
) -> tuple[list[Check], Vm, list[MovedDisk]]:
    """Create ``request`` on the master target's host and datastore (or ``datastore_name``).

    Raises:
        PreflightFailedError: a check failed; nothing was created.
    """
    check_sizes(request.disk_bytes)
    mt = master_target(config, inventory)
    datastore_name = datastore_name or datastore_of_path(mt.vmx_path)
    network = inventory.network_named(network_name, mt.datacenter) if network_name else None
    plan = Plan(
        mt,
        new_vm_name=request.name,
        datastore_name=datastore_name,
        new_bytes=sum(request.disk_bytes),
        network=network,
    )
    checks = run_preflight(session, inventory, plan)
    require(checks, f"creating VM {request.name}")
    host = inventory.host(mt.host)
    if host is None or host.resource_pool is None or mt.host is None:
        raise VsphereError(
            f"the host of {mt.name} has no resource pool visible to {inventory.user}"
        )
    spec = specs.new_vm_spec(request, datastore_name, network, session.managed)
    what = f"creating VM {request.name} on host {host.name}, datastore {datastore_name}"
    ref = session.create_vm(
        inventory.datacenter(mt.datacenter).vm_folder, spec, host.resource_pool, mt.host, what
    )
    log.info("%s: %s", what, ref)
    vm = reload_vm(session, ref, mt.datacenter)
    return checks, vm, [moved_disk(session, inventory, vm, disk) for disk in vm.disks]


def check_sizes(sizes: Sequence[int]) -> None:
    """Refuse disk sizes vSphere cannot make.

    Raises:
        InvalidArgumentError: no size, or one not a positive whole KiB up to 62 TiB.
    """
    if not sizes:
        raise InvalidArgumentError("expected at least one --disk-size, found none")
    for size in sizes:
        if size <= 0 or size % DISK_SIZE_UNIT or size > MAX_DISK_BYTES:
            raise InvalidArgumentError(
                f"disk size {size} bytes: expected a positive multiple of {DISK_SIZE_UNIT} bytes"
                f" up to {MAX_DISK_BYTES} (62 TiB)"
            )


def _other_vm(inventory: Inventory, mt: Vm, name: str) -> Vm:
    vm = inventory.vm(name)
    if vm.ref == mt.ref:
        raise InvalidArgumentError(
            f"--vm {name} is the master target itself: expected the VM whose disks are replicated"
        )
    return vm


def _with_device(disk: MovedDisk, found: guest.GuestDisk | None) -> MovedDisk:
    if found is None:
        return disk
    return dataclasses.replace(disk, device=str(found.device), link=str(found.link))
