"""Finding an attached disk inside this machine (the master target VM) by its SCSI identity.

With ``disk.EnableUUID = TRUE``, ESXi gives each SCSI disk its VMDK's UUID
as identity: 16 bytes, shown by Linux as the NAA WWN ``0x6000c29...``, and
linked by udev as ``/dev/disk/by-id/wwn-0x<32 hex>`` and ``scsi-3<32 hex>``.
That name is stable across reboots and rescans, unlike ``/dev/sdX``, so it
is the one a ``[[disks]] target`` should use.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mastertarget.errors import GuestDeviceError, VsphereError
from mastertarget.vsphere.config import GuestConfig
from runtime.mounts import MountEntry

#: Hex digits of a disk UUID: 16 bytes.
UUID_HEX_DIGITS: Final = 32
#: How udev names a disk by its NAA identity (60-persistent-storage.rules).
LINK_PREFIXES: Final = ("wwn-0x", "scsi-3")
#: What a SCSI host's ``scan`` file takes to look for new disks on every
#: channel, target and LUN (Documentation/scsi/scsi-parameters).
RESCAN_ALL: Final = "- - -"
#: Pause between two looks for an awaited device: short against the second
#: or two a hot-added disk takes to appear.
POLL_S: Final = 0.2
#: A rescan is repeated this often while waiting: a disk that arrived between
#: a rescan and vSphere finishing the reconfigure is caught by the next one.
RESCAN_EVERY_S: Final = 5.0
_SEPARATORS: Final = re.compile(r"[\s-]")
_HEX: Final = re.compile(rf"[0-9a-f]{{{UUID_HEX_DIGITS}}}")

log = logging.getLogger("blockrepl.mastertarget.vsphere")


def scsi_identity(uuid: str, *, disk: str) -> str:
    """The 32 lower-case hex digits of a disk UUID as vSphere writes it.

    Accepts the backing's form (``6000C29d-2c3b-1e6c-8c7f-584d5d2e4e1b``) and
    VirtualDiskManager's (``60 00 C2 9d 2c 3b 1e 6c-8c 7f 58 4d 5d 2e 4e 1b``).

    Raises:
        VsphereError: not 32 hex digits.
    """
    digits = _SEPARATORS.sub("", uuid).lower()
    if not _HEX.fullmatch(digits):
        raise VsphereError(
            f"disk {disk} has the UUID {uuid!r}: expected {UUID_HEX_DIGITS} hex digits"
        )
    return digits


@dataclass(frozen=True)
class GuestDisk:
    """A disk as this machine sees it: the udev link by identity and the device it names."""

    identity: str
    link: Path
    device: Path


def find_device(device_dir: Path, identity: str) -> GuestDisk | None:
    """The device whose SCSI identity is ``identity``, or None if none is linked."""
    for prefix in LINK_PREFIXES:
        link = device_dir / f"{prefix}{identity}"
        if link.exists():
            return GuestDisk(identity, link, link.resolve())
    return None


def rescan_scsi(scsi_host_dir: Path) -> int:
    """Ask every SCSI host to look for new disks; the number of hosts asked.

    A host that refuses (not root, a read-only sysfs in a container) is
    logged: vSphere's hot-add is seen by the kernel without a rescan too.
    """
    asked = 0
    for scan in sorted(scsi_host_dir.glob("host*/scan")):
        try:
            scan.write_text(RESCAN_ALL)
        except OSError as exc:
            log.warning("cannot rescan %s: %s", scan.parent.name, exc.strerror or exc)
        else:
            asked += 1
    return asked


def wait_for_devices(
    guest: GuestConfig,
    identities: Sequence[str],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, GuestDisk]:
    """Wait until a device is linked for every identity; them, by identity.

    Raises:
        GuestDeviceError: some did not appear within ``device_wait_s``.
    """
    deadline = clock() + guest.device_wait_s
    next_rescan = clock()
    while True:
        if clock() >= next_rescan:
            rescan_scsi(guest.scsi_host_dir)
            next_rescan = clock() + RESCAN_EVERY_S
        found = {i: d for i in identities if (d := find_device(guest.device_dir, i)) is not None}
        if len(found) == len(set(identities)):
            return found
        if clock() >= deadline:
            missing = ", ".join(sorted(set(identities) - set(found)))
            raise GuestDeviceError(
                f"no device with SCSI identity {missing} appeared in {guest.device_dir} within"
                f" {guest.device_wait_s:g} s (device_wait_s); the disks stay attached. Is this"
                " command running on the master target VM, and is disk.EnableUUID = TRUE on it?"
                " Run `mastertarget vsphere detach` to take the disks back",
                details={"missing": sorted(set(identities) - set(found))},
            )
        sleep(POLL_S)


def uses_of(guest: GuestConfig, disk: GuestDisk, mounts: Iterable[MountEntry]) -> list[str]:
    """Why ``disk`` cannot be taken away now: mounts and holders (LVM, md, dm) of it
    or of its partitions; empty when nothing uses it."""
    name = disk.device.name
    base = guest.block_dir / name
    parts = [base, *sorted(p.parent for p in base.glob(f"{name}*/partition"))]
    numbers = {_dev_number(p / "dev"): p.name for p in parts}
    uses = [
        f"{numbers[m.device]} is mounted at {m.mount_point}" for m in mounts if m.device in numbers
    ]
    for part in parts:
        holders = sorted(h.name for h in (part / "holders").glob("*"))
        if holders:
            uses.append(f"{part.name} is held by {', '.join(holders)} (LVM, md or dm-crypt)")
    return uses


def forget_device(guest: GuestConfig, disk: GuestDisk) -> bool:
    """Tell the kernel to drop ``disk`` before vSphere removes it; False if it was gone."""
    delete = guest.block_dir / disk.device.name / "device" / "delete"
    try:
        delete.write_text("1")
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise GuestDeviceError(
            f"cannot remove {disk.device} from this machine before detaching it: writing {delete}"
            f" failed: {exc.strerror or exc} (expected to run as root)"
        ) from None
    return True


def _dev_number(path: Path) -> int:
    """``MAJOR:MINOR`` of a sysfs ``dev`` file as one device number; -1 if unreadable."""
    try:
        major, _, minor = path.read_text().strip().partition(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return -1
