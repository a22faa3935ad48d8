"""What the account sees of vCenter: datacenters, hosts, datastores, VMs, networks.

Read once per command, with explicit property paths, into frozen records
that the checks and operations work on without talking to vCenter again.
Names in vCenter are unique per folder only, so a lookup by name that finds
two objects is refused with both named, never resolved by a guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from mastertarget.errors import VsphereAmbiguousError, VsphereNotFoundError
from mastertarget.vsphere.session import About, Ref

#: The option that makes a VM's disks show their UUID as their SCSI serial
#: number to the guest (the failback seed: "disk.EnableUUID = TRUE").
ENABLE_UUID_OPTION: Final = "disk.EnableUUID"
#: Device types of the SCSI controllers vSphere offers: disks on them are
#: seen by the guest with their UUID as SCSI identity (IDE, SATA and NVMe
#: disks are not).
SCSI_CONTROLLER_TYPES: Final = frozenset({
    "ParaVirtualSCSIController", "VirtualLsiLogicSASController", "VirtualLsiLogicController",
    "VirtualBusLogicController",
})  # fmt: skip

T = TypeVar("T")


@dataclass(frozen=True)
class Datacenter:
    ref: Ref
    name: str
    vm_folder: Ref
    datastore_folder: Ref


@dataclass(frozen=True)
class Host:
    ref: Ref
    name: str
    datacenter: str
    connection_state: str
    maintenance: bool
    product: str
    datastores: tuple[Ref, ...]
    resource_pool: Ref | None


@dataclass(frozen=True)
class Mount:
    """How one host mounts a datastore."""

    host: Ref
    mounted: bool
    accessible: bool
    read_only: bool


@dataclass(frozen=True)
class Datastore:
    ref: Ref
    name: str
    datacenter: str
    type: str
    capacity_bytes: int
    free_bytes: int
    accessible: bool
    mounts: tuple[Mount, ...]

    def mount_on(self, host: Ref) -> Mount | None:
        """How ``host`` mounts this datastore, or None if it does not."""
        return next((m for m in self.mounts if m.host == host), None)


@dataclass(frozen=True)
class Controller:
    key: int
    bus: int
    kind: str

    @property
    def scsi(self) -> bool:
        """Whether disks on it show their UUID to the guest as SCSI identity."""
        return self.kind in SCSI_CONTROLLER_TYPES


@dataclass(frozen=True)
class Disk:
    """A virtual disk of a VM.

    Args:
        key: the device key in the VM.
        file: the datastore path of its descriptor (``[ds] vm/vm.vmdk``).
        datastore: the datastore it is on, when vSphere says.
        capacity_bytes: its size.
        uuid: its UUID as vSphere reports it in the backing (empty when it
            does not; ask VirtualDiskManager then).
        controller_key: the key of its controller.
        unit: its unit number on that controller.
        mode: ``persistent``, ``independent_persistent``...
    """

    key: int
    label: str
    file: str
    datastore: Ref | None
    capacity_bytes: int
    uuid: str
    controller_key: int
    unit: int | None
    mode: str


@dataclass(frozen=True)
class Vm:
    ref: Ref
    name: str
    datacenter: str
    template: bool
    power_state: str
    host: Ref | None
    datastores: tuple[Ref, ...]
    vmx_path: str
    extra_config: Mapping[str, str]
    disks: tuple[Disk, ...]
    controllers: tuple[Controller, ...]
    used_units: Mapping[int, frozenset[int]]
    snapshots: tuple[str, ...]
    recent_tasks: tuple[Ref, ...]
    resource_pool: Ref | None
    bios_uuid: str

    def option(self, key: str) -> str | None:
        """An advanced setting (extraConfig) by key, compared without case as ESXi does."""
        wanted = key.lower()
        return next((v for k, v in self.extra_config.items() if k.lower() == wanted), None)


@dataclass(frozen=True)
class Network:
    """A network a VM adapter can join: a standard port group, or a distributed one
    (``portgroup_key`` and ``switch_uuid`` set)."""

    ref: Ref
    name: str
    datacenter: str
    portgroup_key: str = ""
    switch_uuid: str = ""


@dataclass(frozen=True)
class Inventory:
    """Everything the account can see, datacenter by datacenter."""

    about: About
    user: str
    datacenters: tuple[Datacenter, ...]
    hosts: tuple[Host, ...]
    datastores: tuple[Datastore, ...]
    vms: tuple[Vm, ...]
    networks: tuple[Network, ...]
    _by_ref: dict[Ref, object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        items: tuple[Datacenter | Host | Datastore | Vm | Network, ...] = (
            *self.datacenters,
            *self.hosts,
            *self.datastores,
            *self.vms,
            *self.networks,
        )
        for item in items:
            self._by_ref[item.ref] = item

    def host(self, ref: Ref | None) -> Host | None:
        """The host of ``ref``, None when unknown or not visible."""
        found = self._by_ref.get(ref) if ref is not None else None
        return found if isinstance(found, Host) else None

    def datastore(self, ref: Ref | None) -> Datastore | None:
        """The datastore of ``ref``, None when not visible to the account."""
        found = self._by_ref.get(ref) if ref is not None else None
        return found if isinstance(found, Datastore) else None

    def mount(self, host: Ref | None, datastore: Datastore) -> Mount | None:
        """How ``host`` mounts ``datastore``, None if it does not.

        The datastore's mount list says it first (mounted, accessible, read-only);
        a host that lists the datastore among its own without a mount entry
        there (some vCenter versions leave the list short) mounts it read-write.
        """
        mount = datastore.mount_on(host) if host is not None else None
        if mount is not None:
            return mount
        owner = self.host(host)
        if owner is not None and datastore.ref in owner.datastores:
            return Mount(host=owner.ref, mounted=True, accessible=True, read_only=False)
        return None

    def hosts_mounting(self, datastore: Datastore) -> list[Host]:
        """The visible hosts that mount ``datastore``."""
        return [
            h for h in self.hosts if (m := self.mount(h.ref, datastore)) is not None and m.mounted
        ]

    def datacenter(self, name: str) -> Datacenter:
        """The datacenter called ``name`` (every object records its datacenter's name)."""
        return next(dc for dc in self.datacenters if dc.name == name)

    def vm(self, name: str) -> Vm:
        """The VM called ``name``.

        Raises:
            VsphereNotFoundError: no VM has that name (or the account cannot see it).
            VsphereAmbiguousError: several have it.
        """
        return _one("VM", name, [vm for vm in self.vms if vm.name == name and not vm.template])

    def network_named(self, name: str, datacenter: str) -> Network:
        """The network (port group) called ``name`` in ``datacenter``."""
        found = [n for n in self.networks if n.name == name and n.datacenter == datacenter]
        return _one("network", name, found)


def datastore_of_path(path: str) -> str:
    """The datastore name of a datastore path ``[name] folder/file``; empty if none."""
    if path.startswith("[") and "]" in path:
        return path[1 : path.index("]")]
    return ""


def _one(what: str, name: str, found: Sequence[T]) -> T:
    if not found:
        raise VsphereNotFoundError(
            f"no {what} named {name!r} in the inventory this account can see (check the name,"
            " the config's datacenter, and the account's permissions on it)"
        )
    if len(found) > 1:
        refs = ", ".join(str(getattr(item, "ref", item)) for item in found)
        raise VsphereAmbiguousError(
            f"{len(found)} {what}s are named {name!r} ({refs}): rename one, or set the"
            " config's datacenter to the one meant"
        )
    return found[0]
