"""The requests sent to vCenter: where attached disks go, and the config specs.

The specs are pyvmomi data objects, untyped in its stubs; they are built
here from typed inputs and handed to :class:`~mastertarget.vsphere.session.VsphereSession`
as ``Any``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from mastertarget.errors import VsphereError
from mastertarget.vsphere.inventory import ENABLE_UUID_OPTION, Disk, Network, Vm
from mastertarget.vsphere.session import VIM, Ref

#: Unit numbers on a SCSI controller: 0..15, where 7 is the controller itself.
UNITS_PER_CONTROLLER: Final = 16
CONTROLLER_OWN_UNIT: Final = 7
#: A VM has at most four SCSI controllers (buses 0..3): 60 disks.
MAX_SCSI_CONTROLLERS: Final = 4
#: Keys of devices created by a spec are negative and unique within it; the
#: server gives them real keys.
NEW_CONTROLLER_KEY: Final = -100
NEW_DISK_KEY: Final = -200
NEW_NIC_KEY: Final = -300
#: Disks attached to the master target are independent: a snapshot of the
#: master target (a backup job) must never turn them into delta files, nor
#: take them back to an old state when it is reverted.
ATTACHED_DISK_MODE: Final = "independent_persistent"


class Provisioning(enum.StrEnum):
    """How the disks of a new VM hold their space. Thick (lazily zeroed) reserves
    it at creation, so a failback cannot fail half-way on a full datastore."""

    THICK = "thick"
    THIN = "thin"


class Firmware(enum.StrEnum):
    BIOS = "bios"
    EFI = "efi"


@dataclass(frozen=True)
class Slot:
    """Where a disk goes: a controller (a new one has a negative key), its bus, a unit."""

    controller_key: int
    bus: int
    unit: int


@dataclass(frozen=True)
class NewVm:
    """The VM of a failed-back physical server.

    Args:
        name: its name in the inventory.
        disk_bytes: the size of each disk, in order (the server's disks).
        cpus: virtual CPUs.
        memory_mib: memory.
        guest_id: vSphere's guest OS id (``otherGuest64``, ``rhel9_64Guest``...).
        firmware: BIOS or EFI, as the server booted.
        provisioning: thick or thin disks.
    """

    name: str
    disk_bytes: tuple[int, ...]
    cpus: int
    memory_mib: int
    guest_id: str
    firmware: Firmware
    provisioning: Provisioning


def plan_slots(vm: Vm, count: int) -> tuple[list[Slot], list[int]]:
    """Free SCSI slots for ``count`` disks on ``vm``: the slots, and the buses of
    the controllers to add for them (existing controllers are filled first).

    Raises:
        VsphereError: the VM has no room for that many more SCSI disks.
    """
    slots: list[Slot] = []
    scsi = sorted((c for c in vm.controllers if c.scsi), key=lambda c: c.bus)
    for controller in scsi:
        used = vm.used_units.get(controller.key, frozenset())
        slots += [Slot(controller.key, controller.bus, u) for u in _units() if u not in used]
    free_buses = sorted(set(range(MAX_SCSI_CONTROLLERS)) - {c.bus for c in scsi})
    new_buses: list[int] = []
    while len(slots) < count and free_buses:
        bus = free_buses.pop(0)
        key = NEW_CONTROLLER_KEY - len(new_buses)
        new_buses.append(bus)
        slots += [Slot(key, bus, u) for u in _units()]
    if len(slots) < count:
        raise VsphereError(
            f"VM {vm.name} has room for {len(slots)} more SCSI disks, {count} were asked: a VM"
            f" takes at most {MAX_SCSI_CONTROLLERS} SCSI controllers of"
            f" {UNITS_PER_CONTROLLER - 1} disks; detach disks no longer replicated first"
        )
    taken = slots[:count]
    return taken, [bus for bus in new_buses if any(s.bus == bus for s in taken)]


def _units() -> Iterator[int]:
    return (u for u in range(UNITS_PER_CONTROLLER) if u != CONTROLLER_OWN_UNIT)


def attach_spec(disks: Sequence[Disk], slots: Sequence[Slot], new_buses: Sequence[int]) -> Any:
    """A ConfigSpec adding the existing ``disks`` at ``slots``, and new controllers first."""
    changes = [
        _add(
            VIM.vm.device.ParaVirtualSCSIController(
                key=NEW_CONTROLLER_KEY - index, busNumber=bus, sharedBus="noSharing"
            )
        )
        for index, bus in enumerate(new_buses)
    ]
    for index, (disk, slot) in enumerate(zip(disks, slots, strict=True)):
        backing = VIM.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=disk.file, diskMode=ATTACHED_DISK_MODE
        )
        device = VIM.vm.device.VirtualDisk(
            key=NEW_DISK_KEY - index,
            controllerKey=slot.controller_key,
            unitNumber=slot.unit,
            capacityInKB=disk.capacity_bytes // 1024,
            backing=backing,
        )
        changes.append(_add(device))  # no fileOperation: the disk exists
    return VIM.vm.ConfigSpec(deviceChange=changes)


def detach_spec(disks: Sequence[Disk]) -> Any:
    """A ConfigSpec removing ``disks`` from a VM and keeping their files."""
    changes = [
        VIM.vm.device.VirtualDeviceSpec(
            operation="remove",
            device=VIM.vm.device.VirtualDisk(
                key=disk.key,
                controllerKey=disk.controller_key,
                unitNumber=disk.unit,
                capacityInKB=0,
            ),
        )
        for disk in disks
    ]
    return VIM.vm.ConfigSpec(deviceChange=changes)


def new_vm_spec(
    request: NewVm, datastore: str, network: Network | None, managed: Callable[[Ref], Any]
) -> Any:
    """A ConfigSpec creating ``request`` on ``datastore``, its disks on one paravirtual
    SCSI controller per 15, with disk.EnableUUID = TRUE so that its disks can be
    found by their identity when attached to the master target."""
    buses = -(-len(request.disk_bytes) // (UNITS_PER_CONTROLLER - 1))
    changes = [
        _add(
            VIM.vm.device.ParaVirtualSCSIController(
                key=NEW_CONTROLLER_KEY - bus, busNumber=bus, sharedBus="noSharing"
            )
        )
        for bus in range(buses)
    ]
    places = [(bus, unit) for bus in range(buses) for unit in _units()]
    for index, (size, (bus, unit)) in enumerate(zip(request.disk_bytes, places, strict=False)):
        backing = VIM.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[{datastore}]",
            diskMode="persistent",
            thinProvisioned=request.provisioning is Provisioning.THIN,
        )
        disk = VIM.vm.device.VirtualDisk(
            key=NEW_DISK_KEY - index,
            controllerKey=NEW_CONTROLLER_KEY - bus,
            unitNumber=unit,
            capacityInKB=size // 1024,
            capacityInBytes=size,
            backing=backing,
        )
        changes.append(_add(disk, create=True))
    if network is not None:
        changes.append(_add(_nic(network, managed)))
    return VIM.vm.ConfigSpec(
        name=request.name,
        guestId=request.guest_id,
        numCPUs=request.cpus,
        memoryMB=request.memory_mib,
        firmware=request.firmware.value,
        files=VIM.vm.FileInfo(vmPathName=f"[{datastore}]"),
        deviceChange=changes,
        extraConfig=[VIM.option.OptionValue(key=ENABLE_UUID_OPTION, value="TRUE")],
    )


def _nic(network: Network, managed: Callable[[Ref], Any]) -> Any:
    if network.portgroup_key:
        port = VIM.dvs.PortConnection(
            portgroupKey=network.portgroup_key, switchUuid=network.switch_uuid
        )
        backing = VIM.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
    else:
        backing = VIM.vm.device.VirtualEthernetCard.NetworkBackingInfo(
            deviceName=network.name, network=managed(network.ref)
        )
    connect = VIM.vm.device.VirtualDevice.ConnectInfo(startConnected=True, allowGuestControl=True)
    return VIM.vm.device.VirtualVmxnet3(key=NEW_NIC_KEY, backing=backing, connectable=connect)


def _add(device: Any, *, create: bool = False) -> Any:
    change = VIM.vm.device.VirtualDeviceSpec(operation="add", device=device)
    if create:
        change.fileOperation = "create"
    return change
