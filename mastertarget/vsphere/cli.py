"""``mastertarget vsphere discover|preflight|attach|detach|create-vm``.

Every command reads the vSphere config file (``--config``), takes the
password from its ``password_file`` or from ``BLOCKREPL_VSPHERE_PASSWORD``
(never from the command line), logs in, reads the inventory, and does one
thing. ``--json`` prints one JSON object on standard output instead of text.
pyvmomi is imported only when one of these commands runs, so the daemon and
the other commands never load it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from runtime.command import CommandResult
from runtime.errors import InvalidArgumentError

if TYPE_CHECKING:
    from mastertarget.vsphere.config import VsphereConfig
    from mastertarget.vsphere.inventory import Inventory
    from mastertarget.vsphere.session import VsphereSession

#: Size suffixes of --disk-size: binary, as disk sizes are.
SIZE_UNITS: Final = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE: Final = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
#: Defaults of a new VM: the smallest useful machine; the operator sizes it
#: like the failed-over server.
DEFAULT_CPUS: Final = 2
DEFAULT_MEMORY_MIB: Final = 4096
DEFAULT_GUEST_ID: Final = "otherGuest64"
#: Bounds of a new VM's CPUs and memory (vSphere 8: 768 vCPUs, 24 TiB).
MAX_CPUS: Final = 768
MIN_MEMORY_MIB: Final = 4
MAX_MEMORY_MIB: Final = 24 * 2**20
#: The exit status of a preflight that ran and found a check failed: an
#: answer, not an error (docs/operations.md, "Exit statuses of mastertarget vsphere").
PREFLIGHT_FAILED: Final = 1

Handler = Callable[
    ["VsphereConfig", "VsphereSession", "Inventory", argparse.Namespace], CommandResult
]


def add_commands(commands: Any) -> None:
    """Add ``vsphere`` and its commands to the ``mastertarget`` sub-parsers ``commands``."""
    vsphere = commands.add_parser(
        "vsphere", help="vCenter: discovery, preflight checks, disks of the master target VM"
    )
    sub = vsphere.add_subparsers(dest="vsphere_command", required=True, metavar="COMMAND")

    def command(name: str, helptext: str, handler: Handler) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=helptext)
        parser.add_argument("--config", required=True, type=Path, help="the vSphere TOML config")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.set_defaults(handler=lambda args: _run(args, handler))
        return parser

    command("discover", "list hosts, datastores and VMs, and what the account may do", _discover)
    preflight = command("preflight", "check that failback can work", _preflight)
    preflight.add_argument("--vm", help="the VM to fail back to (its snapshots, power, datastores)")
    for name, helptext, handler in (
        ("attach", "attach a VM's disks to the master target and find them inside it", _attach),
        ("detach", "detach a VM's disks from the master target, keeping their files", _detach),
    ):
        parser = command(name, helptext, handler)
        parser.add_argument("--vm", required=True, help="the VM whose disks move")
        parser.add_argument(
            "--disk",
            action="append",
            default=[],
            metavar="FILE",
            help="only this disk of the VM ('[datastore] folder/file.vmdk'; repeatable)",
        )
        parser.add_argument(
            "--no-guest",
            action="store_true",
            help="do not look for the disks inside this machine (not run on the master target)",
        )
    create = command("create-vm", "create the VM of a failed-back physical server", _create_vm)
    create.add_argument("--name", required=True, help="the new VM's name")
    create.add_argument(
        "--disk-size",
        action="append",
        required=True,
        type=_size_argument,
        metavar="SIZE",
        help="a disk's size: bytes, or with K, M, G, T (binary); repeat for each disk",
    )
    create.add_argument("--cpus", type=int, default=DEFAULT_CPUS)
    create.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB)
    create.add_argument("--guest-id", default=DEFAULT_GUEST_ID, help="vSphere guest OS id")
    create.add_argument("--firmware", choices=("bios", "efi"), default="bios")
    create.add_argument("--provisioning", choices=("thick", "thin"), default="thick")
    create.add_argument("--datastore", help="its datastore (the master target's by default)")
    create.add_argument("--network", help="a port group to connect it to (none by default)")


def parse_size(text: str) -> int:
    """``100G`` as bytes (binary units; ``GiB`` and ``GB`` read as G too).

    Raises:
        InvalidArgumentError: not a number with an optional K, M, G or T.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise InvalidArgumentError(
            f"disk size {text!r}: expected a number of bytes, or one with K, M, G or T (100G)"
        )
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _run(args: argparse.Namespace, handler: Handler) -> CommandResult:
    from mastertarget.vsphere import config as vsphere_config  # noqa: PLC0415 - see the module doc
    from mastertarget.vsphere.inventory_reader import load_inventory  # noqa: PLC0415
    from mastertarget.vsphere.session import VsphereSession  # noqa: PLC0415
    from runtime.logs import setup_logging  # noqa: PLC0415

    config = vsphere_config.load(args.config)
    setup_logging(config.logging)
    password = vsphere_config.load_password(config, os.environ)
    with VsphereSession.connect(config, password) as session:
        inventory = load_inventory(session, config.datacenter)
        return handler(config, session, inventory, args)


def _discover(
    config: VsphereConfig, session: VsphereSession, inventory: Inventory, args: argparse.Namespace
) -> CommandResult:
    from mastertarget.vsphere.discovery import discover, discovery_text  # noqa: PLC0415

    report = discover(session, inventory)
    return CommandResult("\n".join(discovery_text(report)), report.to_json(), report.exit_code)


def _preflight(
    config: VsphereConfig, session: VsphereSession, inventory: Inventory, args: argparse.Namespace
) -> CommandResult:
    from mastertarget.vsphere.operations import master_target  # noqa: PLC0415
    from mastertarget.vsphere.preflight import Plan, failures, run_preflight  # noqa: PLC0415

    mt = master_target(config, inventory)
    vm = inventory.vm(args.vm) if args.vm else None
    checks = run_preflight(session, inventory, Plan(mt, failback_vm=vm))
    failed = failures(checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status.value.upper():4} {check.id:26} {check.message}")
        if check.remedy:
            lines.append(f"     to do: {check.remedy}")
    lines.append(f"{len(checks)} checks, {len(failed)} failed")
    data = {
        "master_target": mt.name,
        "vm": args.vm,
        "ok": not failed,
        "checks": [c.to_json() for c in checks],
    }
    return CommandResult("\n".join(lines), data, PREFLIGHT_FAILED if failed else 0)


def _attach(
    config: VsphereConfig, session: VsphereSession, inventory: Inventory, args: argparse.Namespace
) -> CommandResult:
    from mastertarget.vsphere.operations import attach  # noqa: PLC0415

    look = not args.no_guest
    if look and sys.stderr.isatty():
        print(
            f"attaching; then waiting up to {config.guest.device_wait_s:g} s for the disks to"
            " appear inside this machine ...",
            file=sys.stderr,
        )
    _, disks = attach(
        session, inventory, config, vm_name=args.vm, files=args.disk, look_inside=look
    )
    lines = [
        f"{'attached' if d.changed else 'already attached'} {d.file} ({_gib(d.capacity_bytes)})"
        f" at SCSI{d.bus}:{d.unit}, identity {d.identity}"
        + (f" -> {d.device} ({d.link})" if d.device else "")
        for d in disks
    ]
    lines.append(
        f"{len(disks)} disk(s) of {args.vm} on {config.master_target_vm}"
        f" ({sum(d.changed for d in disks)} newly attached)"
    )
    data = {
        "master_target": config.master_target_vm,
        "vm": args.vm,
        "disks": [d.to_json() for d in disks],
    }
    return CommandResult("\n".join(lines), data)


def _detach(
    config: VsphereConfig, session: VsphereSession, inventory: Inventory, args: argparse.Namespace
) -> CommandResult:
    from mastertarget.vsphere.operations import detach  # noqa: PLC0415

    disks = detach(
        session, inventory, config, vm_name=args.vm, files=args.disk, look_inside=not args.no_guest
    )
    lines = [f"{'detached' if d.changed else 'was not attached:'} {d.file}" for d in disks]
    lines.append(
        f"{sum(d.changed for d in disks)} disk(s) of {args.vm} detached from"
        f" {config.master_target_vm}; their files are kept"
    )
    data = {
        "master_target": config.master_target_vm,
        "vm": args.vm,
        "disks": [d.to_json() for d in disks],
    }
    return CommandResult("\n".join(lines), data)


def _create_vm(
    config: VsphereConfig, session: VsphereSession, inventory: Inventory, args: argparse.Namespace
) -> CommandResult:
    from mastertarget.vsphere.operations import create_vm  # noqa: PLC0415
    from mastertarget.vsphere.specs import Firmware, NewVm, Provisioning  # noqa: PLC0415

    if not 1 <= args.cpus <= MAX_CPUS:
        raise InvalidArgumentError(f"--cpus: expected 1..{MAX_CPUS}, found {args.cpus}")
    if not MIN_MEMORY_MIB <= args.memory_mib <= MAX_MEMORY_MIB:
        raise InvalidArgumentError(
            f"--memory-mib: expected {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}, found {args.memory_mib}"
        )
    request = NewVm(
        name=args.name,
        disk_bytes=tuple(args.disk_size),
        cpus=args.cpus,
        memory_mib=args.memory_mib,
        guest_id=args.guest_id,
        firmware=Firmware(args.firmware),
        provisioning=Provisioning(args.provisioning),
    )
    _, vm, disks = create_vm(
        session,
        inventory,
        config,
        request,
        datastore_name=args.datastore,
        network_name=args.network,
    )
    lines = [f"created VM {vm.name} ({vm.ref.value}) in {vm.vmx_path}, powered off, with:"]
    lines += [f"  {d.file} ({_gib(d.capacity_bytes)}), identity {d.identity}" for d in disks]
    lines.append(f"next: mastertarget vsphere attach --config {args.config} --vm {vm.name}")
    data = {
        "vm": vm.name,
        "ref": vm.ref.value,
        "vmx": vm.vmx_path,
        "disks": [d.to_json() for d in disks],
    }
    return CommandResult("\n".join(lines), data)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
