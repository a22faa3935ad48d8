"""Reading the inventory from vCenter: one property-collector pass per kind of object.

Each kind is read with explicit property paths (never whole objects) into
the frozen records of :mod:`mastertarget.vsphere.inventory`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from mastertarget.errors import VsphereNotFoundError
from mastertarget.vsphere.inventory import (
    Controller,
    Datacenter,
    Datastore,
    Disk,
    Host,
    Inventory,
    Mount,
    Network,
    Vm,
)
from mastertarget.vsphere.session import Found, Ref, VsphereSession, to_ref

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
        about=session.about,
        user=session.config.user,
        datacenters=tuple(centers),
        hosts=tuple(hosts),
        datastores=tuple(datastores),
        vms=tuple(vms),
        networks=tuple(networks),
    )


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


def _refs(value: Any) -> tuple[Ref, ...]:
    """A reference list as read (a tuple of Ref, or an empty pyvmomi array)."""
    return tuple(item for item in (value or ()) if isinstance(item, Ref))


def _ref(value: Any) -> Ref | None:
    return value if isinstance(value, Ref) else None


def _datacenter(item: Found) -> Datacenter:
    return Datacenter(
        ref=item.ref,
        name=str(item.get("name", "")),
        vm_folder=item.get("vmFolder"),
        datastore_folder=item.get("datastoreFolder"),
    )


def _host(item: Found, datacenter: str, pool: Any) -> Host:
    return Host(
        ref=item.ref,
        name=str(item.get("name", "")),
        datacenter=datacenter,
        connection_state=str(item.get("runtime.connectionState", "unknown")),
        maintenance=bool(item.get("runtime.inMaintenanceMode", False)),
        product=str(item.get("summary.config.product.fullName", "")),
        datastores=_refs(item.get("datastore")),
        resource_pool=_ref(pool),
    )


def _datastore(item: Found, datacenter: str) -> Datastore:
    mounts = tuple(_mount(mount) for mount in item.get("host") or ())
    return Datastore(
        ref=item.ref,
        name=str(item.get("name", "")),
        datacenter=datacenter,
        type=str(item.get("summary.type", "")),
        capacity_bytes=int(item.get("summary.capacity", 0)),
        free_bytes=int(item.get("summary.freeSpace", 0)),
        accessible=bool(item.get("summary.accessible", False)),
        mounts=mounts,
    )


def _mount(mount: Any) -> Mount:
    info = mount.mountInfo
    return Mount(
        host=_ref_of_key(mount.key),
        mounted=bool(info.mounted),
        accessible=bool(info.accessible),
        read_only=str(info.accessMode) == "readOnly",
    )


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
        ref=item.ref,
        name=str(item.get("name", "")),
        datacenter=datacenter,
        template=bool(item.get("config.template", False)),
        power_state=str(item.get("runtime.powerState", "unknown")),
        host=_ref(item.get("runtime.host")),
        datastores=_refs(item.get("datastore")),
        vmx_path=str(item.get("config.files.vmPathName", "")),
        extra_config={str(o.key): str(o.value) for o in item.get("config.extraConfig") or ()},
        disks=tuple(_disk(d) for d in devices if d._wsdlName == "VirtualDisk"),
        controllers=controllers,
        used_units={k: frozenset(v) for k, v in used.items()},
        snapshots=tuple(_snapshot_names(getattr(item.get("snapshot"), "rootSnapshotList", ()))),
        recent_tasks=_refs(item.get("recentTask")),
        resource_pool=_ref(item.get("resourcePool")),
        bios_uuid=str(item.get("config.uuid", "")),
    )


def _disk(device: Any) -> Disk:
    backing = device.backing
    datastore = getattr(backing, "datastore", None)
    capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024
    return Disk(
        key=int(device.key),
        label=str(getattr(device.deviceInfo, "label", "") or ""),
        file=str(getattr(backing, "fileName", "") or ""),
        datastore=_ref_of_key(datastore) if datastore is not None else None,
        capacity_bytes=int(capacity),
        uuid=str(getattr(backing, "uuid", "") or ""),
        controller_key=int(device.controllerKey or 0),
        unit=int(device.unitNumber) if device.unitNumber is not None else None,
        mode=str(getattr(backing, "diskMode", "") or ""),
    )


def _snapshot_names(trees: Iterable[Any]) -> Iterable[str]:
    for tree in trees or ():
        yield str(tree.name)
        yield from _snapshot_names(tree.childSnapshotList)
