"""What the account sees of vCenter: datacenters, hosts, datastores, VMs, networks.

Read once per command, with explicit property paths, into frozen records
that the checks and operations work on without talking to vCenter again.
Names in vCenter are unique per folder only, so a lookup by name that finds
two objects is refused with both named, never resolved by a guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from mastertarget.errors import VsphereAmbiguousError, VsphereNotFoundError
from mastertarget.vsphere.session import About, Found, Ref, VsphereSession, to_ref

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

_DATACENTER_PATHS: Final = ("name", "vmFolder", "hostFolder", "datastoreFolder")
_COMPUTE_PATHS: Final = ("name", "resourcePool", "host")
_HOST_PATHS: Final = (
    "name", "parent", "datastore", "runtime.connectionState", "runtime.inMaintenanceMode",
    "summary.config.product.fullName",
)  # fmt: skip
_DATASTORE_PATHS: Final = (
    "name", "summary.type", "summary.capacity", "summary.freeSpace", "summary.accessible", "host",
)  # fmt: skip
_VM_PATHS: Final = (
    "name", "config.template", "config.uuid", "config.files.vmPathName", "config.extraConfig",
    "config.hardware.device", "runtime.powerState", "runtime.host", "datastore", "snapshot",
    "resourcePool", "parent", "recentTask",
)  # fmt: skip
_NETWORK_PATHS: Final = ("name",)
_PORTGROUP_PATHS: Final = ("key", "config.distributedVirtualSwitch")

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
            *self.datacenters, *self.hosts, *self.datastores, *self.vms, *self.networks,
        )  # fmt: skip
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


def load_inventory(session: VsphereSession, datacenter: str | None = None) -> Inventory:
    """Read the inventory the account can see, in every datacenter or in ``datacenter``.

    Raises:
        VsphereNotFoundError: ``datacenter`` is given and not visible.
        VsphereError: vCenter failed to answer.
    """
    found = session.collect(session.root_folder, "Datacenter", _DATACENTER_PATHS)
    centers = [_datacenter(item) for item in found]
    if datacenter is not None:
        chosen = [dc for dc in centers if dc.name == datacenter]
        if not chosen:
            names = ", ".join(sorted(dc.name for dc in centers)) or "none"
            raise VsphereNotFoundError(
                f"datacenter {datacenter!r} (the config's datacenter) is not in the inventory"
                f" seen by {session.config.user}; datacenters seen: {names}"
            )
        centers = chosen
    hosts: list[Host] = []
    datastores: list[Datastore] = []
    vms: list[Vm] = []
    networks: list[Network] = []
    for dc in centers:
        pools = {
            host: item.get("resourcePool")
            for item in session.collect(dc.ref, "ComputeResource", _COMPUTE_PATHS)
            for host in _refs(item.get("host"))
        }
        hosts += [
            _host(item, dc.name, pools.get(item.ref))
            for item in session.collect(dc.ref, "HostSystem", _HOST_PATHS)
        ]
        datastores += [
            _datastore(item, dc.name)
            for item in session.collect(dc.ref, "Datastore", _DATASTORE_PATHS)
        ]
        vms += [_vm(item, dc.name) for item in session.collect(dc.ref, "VirtualMachine", _VM_PATHS)]
        networks += _networks(session, dc)
    return Inventory(
        about=session.about, user=session.config.user, datacenters=tuple(centers),
        hosts=tuple(hosts), datastores=tuple(datastores), vms=tuple(vms), networks=tuple(networks),
    )  # fmt: skip


def reload_vm(session: VsphereSession, ref: Ref, datacenter: str) -> Vm:
    """The VM ``ref`` read again (after a change), in ``datacenter``.

    Raises:
        VsphereNotFoundError: it is gone, or the account cannot see it.
    """
    found = session.collect_refs([ref], _VM_PATHS)
    if not found:
        raise VsphereNotFoundError(f"VM {ref} is not visible to {session.config.user}")
    return _vm(found[0], datacenter)


def _networks(session: VsphereSession, dc: Datacenter) -> list[Network]:
    switches = {
        item.ref: str(item.get("uuid", ""))
        for item in session.collect(dc.ref, "DistributedVirtualSwitch", ("uuid",))
    }
    portgroups = {
        item.ref: (
            str(item.get("key", "")),
            switches.get(item.get("config.distributedVirtualSwitch"), ""),
        )
        for item in session.collect(dc.ref, "DistributedVirtualPortgroup", _PORTGROUP_PATHS)
    }
    return [
        Network(item.ref, str(item.get("name", "")), dc.name, *portgroups.get(item.ref, ("", "")))
        for item in session.collect(dc.ref, "Network", _NETWORK_PATHS)
    ]


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


def _refs(value: Any) -> tuple[Ref, ...]:
    """A reference list as read (a tuple of Ref, or an empty pyvmomi array)."""
    return tuple(item for item in (value or ()) if isinstance(item, Ref))


def _ref(value: Any) -> Ref | None:
    return value if isinstance(value, Ref) else None


def _datacenter(item: Found) -> Datacenter:
    return Datacenter(
        ref=item.ref, name=str(item.get("name", "")), vm_folder=item.get("vmFolder"),
        datastore_folder=item.get("datastoreFolder"),
    )  # fmt: skip


def _host(item: Found, datacenter: str, pool: Any) -> Host:
    return Host(
        ref=item.ref, name=str(item.get("name", "")), datacenter=datacenter,
        connection_state=str(item.get("runtime.connectionState", "unknown")),
        maintenance=bool(item.get("runtime.inMaintenanceMode", False)),
        product=str(item.get("summary.config.product.fullName", "")),
        datastores=_refs(item.get("datastore")), resource_pool=_ref(pool),
    )  # fmt: skip


def _datastore(item: Found, datacenter: str) -> Datastore:
    mounts = tuple(_mount(mount) for mount in item.get("host") or ())
    return Datastore(
        ref=item.ref, name=str(item.get("name", "")), datacenter=datacenter,
        type=str(item.get("summary.type", "")), capacity_bytes=int(item.get("summary.capacity", 0)),
        free_bytes=int(item.get("summary.freeSpace", 0)),
        accessible=bool(item.get("summary.accessible", False)), mounts=mounts,
    )  # fmt: skip


def _mount(mount: Any) -> Mount:
    info = mount.mountInfo
    return Mount(
        host=_ref_of_key(mount.key), mounted=bool(info.mounted), accessible=bool(info.accessible),
        read_only=str(info.accessMode) == "readOnly",
    )  # fmt: skip


def _ref_of_key(managed: Any) -> Ref:
    # HostMount.key is a managed object inside a data object: not turned into a Ref by the
    # session, which converts top-level property values only.
    return managed if isinstance(managed, Ref) else to_ref(managed)


def _vm(item: Found, datacenter: str) -> Vm:
    devices = list(item.get("config.hardware.device") or ())
    controllers = tuple(
        Controller(int(d.key), int(d.busNumber), str(d._wsdlName))
        for d in devices
        if hasattr(d, "busNumber") and hasattr(d, "device")
    )
    used: dict[int, set[int]] = {}
    for device in devices:
        if device.unitNumber is not None and device.controllerKey is not None:
            used.setdefault(int(device.controllerKey), set()).add(int(device.unitNumber))
    return Vm(
        ref=item.ref, name=str(item.get("name", "")), datacenter=datacenter,
        template=bool(item.get("config.template", False)),
        power_state=str(item.get("runtime.powerState", "unknown")),
        host=_ref(item.get("runtime.host")), datastores=_refs(item.get("datastore")),
        vmx_path=str(item.get("config.files.vmPathName", "")),
        extra_config={str(o.key): str(o.value) for o in item.get("config.extraConfig") or ()},
        disks=tuple(_disk(d) for d in devices if d._wsdlName == "VirtualDisk"),
        controllers=controllers, used_units={k: frozenset(v) for k, v in used.items()},
        snapshots=tuple(_snapshot_names(getattr(item.get("snapshot"), "rootSnapshotList", ()))),
        recent_tasks=_refs(item.get("recentTask")), resource_pool=_ref(item.get("resourcePool")),
        bios_uuid=str(item.get("config.uuid", "")),
    )  # fmt: skip


def _disk(device: Any) -> Disk:
    backing = device.backing
    datastore = getattr(backing, "datastore", None)
    capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024
    return Disk(
        key=int(device.key), label=str(getattr(device.deviceInfo, "label", "") or ""),
        file=str(getattr(backing, "fileName", "") or ""),
        datastore=_ref_of_key(datastore) if datastore is not None else None,
        capacity_bytes=int(capacity), uuid=str(getattr(backing, "uuid", "") or ""),
        controller_key=int(device.controllerKey or 0),
        unit=int(device.unitNumber) if device.unitNumber is not None else None,
        mode=str(getattr(backing, "diskMode", "") or ""),
    )  # fmt: skip


def _snapshot_names(trees: Iterable[Any]) -> Iterable[str]:
    for tree in trees or ():
        yield str(tree.name)
        yield from _snapshot_names(tree.childSnapshotList)
