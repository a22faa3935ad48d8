"""``mastertarget vsphere discover``: what the account sees, and what it may do with it.

An account that cannot use datastores is a permissions problem, and is
reported as one: the seed's read-only account sees its reprotect fail with
no datastore listed. vCenter leaves out of a listing what the account may not
view, so "no datastore" is told apart from "not allowed to see them" by
asking which privileges the account holds on each datacenter's datastore
folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mastertarget.errors import VspherePermissionError
from mastertarget.vsphere.inventory import ENABLE_UUID_OPTION, Inventory
from mastertarget.vsphere.preflight import (
    DATASTORE_PRIVILEGES,
    VIEW_PRIVILEGE,
    is_free_edition,
)
from mastertarget.vsphere.session import Licence, Ref, VsphereSession


@dataclass(frozen=True)
class Problem:
    """Something that stops failback, found by discovery: ``kind`` is
    ``permissions`` or ``no-datastores``."""

    kind: str
    message: str


@dataclass
class Report:
    inventory: Inventory
    licences: dict[Ref, tuple[Licence, ...]] = field(default_factory=dict)
    datastore_missing: dict[Ref, tuple[str, ...]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """77 (EX_NOPERM) when the account lacks permissions failback needs, else 0."""
        if any(p.kind == "permissions" for p in self.problems):
            return VspherePermissionError.exit_code
        return 0

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (sizes in bytes, references as ``type:id``)."""
        inv = self.inventory
        names = {d.ref: d.name for d in inv.datastores} | {h.ref: h.name for h in inv.hosts}
        return {
            "server": {
                "name": inv.about.full_name,
                "api_type": inv.about.api_type,
                "api_version": inv.about.api_version,
                "instance_uuid": inv.about.instance_uuid,
            },
            "user": inv.user,
            "datacenters": [dc.name for dc in inv.datacenters],
            "hosts": [
                {
                    "name": h.name,
                    "ref": str(h.ref),
                    "datacenter": h.datacenter,
                    "connection_state": h.connection_state,
                    "maintenance": h.maintenance,
                    "product": h.product,
                    "datastores": [names.get(r, str(r)) for r in h.datastores],
                    "licences": [
                        {"edition": lic.edition_key, "name": lic.name, "free": is_free_edition(lic)}
                        for lic in self.licences.get(h.ref, ())
                    ],
                }
                for h in inv.hosts
            ],
            "datastores": [
                {
                    "name": d.name,
                    "ref": str(d.ref),
                    "datacenter": d.datacenter,
                    "type": d.type,
                    "capacity_bytes": d.capacity_bytes,
                    "free_bytes": d.free_bytes,
                    "accessible": d.accessible,
                    "mounted_on": [h.name for h in inv.hosts_mounting(d)],
                    "missing_privileges": list(self.datastore_missing.get(d.ref, ())),
                }
                for d in inv.datastores
            ],
            "vms": [
                {
                    "name": vm.name,
                    "ref": str(vm.ref),
                    "datacenter": vm.datacenter,
                    "power_state": vm.power_state,
                    "template": vm.template,
                    "bios_uuid": vm.bios_uuid,
                    "host": names.get(vm.host, str(vm.host)) if vm.host else None,
                    "disk_enable_uuid": vm.option(ENABLE_UUID_OPTION),
                    "snapshots": list(vm.snapshots),
                    "disks": [
                        {
                            "file": disk.file,
                            "capacity_bytes": disk.capacity_bytes,
                            "uuid": disk.uuid or None,
                        }
                        for disk in vm.disks
                    ],
                }
                for vm in inv.vms
            ],
            "networks": [{"name": n.name, "datacenter": n.datacenter} for n in inv.networks],
            "problems": [{"kind": p.kind, "message": p.message} for p in self.problems],
        }


def discover(session: VsphereSession, inventory: Inventory) -> Report:
    """The inventory, each host's licence, and what the account may not do with datastores."""
    report = Report(inventory)
    for host in inventory.hosts:
        report.licences[host.ref] = session.host_licences(host.ref)
    if inventory.datastores:
        _check_datastore_privileges(session, report)
    else:
        _explain_no_datastores(session, report)
    return report


def _check_datastore_privileges(session: VsphereSession, report: Report) -> None:
    datastores = report.inventory.datastores
    granted = session.granted([d.ref for d in datastores], DATASTORE_PRIVILEGES)
    for datastore in datastores:
        have = granted.get(datastore.ref, frozenset())
        missing = tuple(p for p in DATASTORE_PRIVILEGES if p not in have)
        if missing:
            report.datastore_missing[datastore.ref] = missing
    if len(report.datastore_missing) == len(datastores):
        user = report.inventory.user
        why = (
            f"the account {user} sees {len(datastores)} datastore(s) but lacks"
            f" {', '.join(DATASTORE_PRIVILEGES)} on every one: failback can neither place nor"
            " attach disks (the seed's read-only account symptom); give the account a role"
            " with these privileges on the datastores"
        )
        report.problems.append(Problem("permissions", why))


def _explain_no_datastores(session: VsphereSession, report: Report) -> None:
    inventory = report.inventory
    folders = [dc.datastore_folder for dc in inventory.datacenters]
    granted = session.granted(folders, [VIEW_PRIVILEGE])
    for dc in inventory.datacenters:
        if VIEW_PRIVILEGE in granted.get(dc.datastore_folder, frozenset()):
            report.problems.append(
                Problem(
                    "no-datastores", f"datacenter {dc.name} has no datastore: failback needs one"
                )
            )
        else:
            report.problems.append(
                Problem(
                    "permissions",
                    (
                        f"the account {inventory.user} cannot list the datastores of datacenter"
                        f" {dc.name}: it lacks {VIEW_PRIVILEGE} on its datastore folder, so vCenter"
                        " shows it none (the seed's read-only account symptom, not an empty"
                        " datacenter); give the account a role with"
                        f" {', '.join(DATASTORE_PRIVILEGES)} on the datastores"
                    ),
                )
            )


def discovery_text(report: Report) -> list[str]:
    """The report for a terminal: one line per object, then the problems."""
    inv = report.inventory
    names = {d.ref: d.name for d in inv.datastores} | {h.ref: h.name for h in inv.hosts}
    lines = [f"{inv.about.full_name} (API {inv.about.api_version}), as {inv.user}", "hosts:"]
    for h in inv.hosts:
        licences = ", ".join(
            f"{lic.name or lic.edition_key}{' (FREE EDITION)' if is_free_edition(lic) else ''}"
            for lic in report.licences.get(h.ref, ())
        )
        lines.append(f"  {h.name:24} {h.connection_state:12} {h.product:36} {licences}")
    lines.append("datastores:")
    for d in inv.datastores:
        missing = report.datastore_missing.get(d.ref)
        lines.append(
            f"  {d.name:24} {d.type:8} {d.capacity_bytes / 2**30:10.1f} GiB"
            f" {d.free_bytes / 2**30:10.1f} GiB free, on {len(inv.hosts_mounting(d))} host(s)"
            + (f"; account lacks {', '.join(missing)}" if missing else "")
        )
    lines.append("VMs:")
    for vm in inv.vms:
        host = names.get(vm.host, str(vm.host)) if vm.host else "-"
        uuid = vm.option(ENABLE_UUID_OPTION)
        lines.append(
            f"  {vm.name:24} {vm.power_state:11} {host:16} {len(vm.disks)} disk(s),"
            f" {len(vm.snapshots)} snapshot(s), {ENABLE_UUID_OPTION}={uuid}"
        )
    lines += [f"PROBLEM ({p.kind}): {p.message}" for p in report.problems]
    return lines
