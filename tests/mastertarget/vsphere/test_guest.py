"""Finding disks inside the master target by SCSI identity; what holds a disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mastertarget.errors import GuestDeviceError, VsphereError
from mastertarget.vsphere.config import GuestConfig
from mastertarget.vsphere.guest import (
    GuestDisk,
    find_device,
    forget_device,
    scsi_identity,
    uses_of,
    wait_for_devices,
)
from runtime.mounts import parse_mountinfo

IDENTITY = "6000c29d2c3b1e6c8c7f584d5d2e4e1b"


@pytest.mark.parametrize(
    "text",
    [
        "6000C29d-2c3b-1e6c-8c7f-584d5d2e4e1b",  # VirtualDisk.backing.uuid
        "60 00 C2 9d 2c 3b 1e 6c-8c 7f 58 4d 5d 2e 4e 1b",  # VirtualDiskManager
        "6000c29d2c3b1e6c8c7f584d5d2e4e1b",
    ],
)
def test_both_forms_of_a_disk_uuid_give_one_identity(text: str) -> None:
    assert scsi_identity(text, disk="[ds] a.vmdk") == IDENTITY


@pytest.mark.parametrize(
    "text", ["", "6000c29d", IDENTITY + "00", "6000c29d2c3b1e6c8c7f584d5d2e4e1g"]
)
def test_a_malformed_uuid_is_refused_with_the_disk_named(text: str) -> None:
    with pytest.raises(VsphereError, match=r"disk \[ds\] a.vmdk has the UUID .*expected 32 hex"):
        scsi_identity(text, disk="[ds] a.vmdk")


def _guest(tmp_path: Path, wait: float = 1.0) -> GuestConfig:
    for name in ("by-id", "block", "scsi_host/host0", "dev"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / "scsi_host/host0/scan").touch()
    return GuestConfig(
        device_dir=tmp_path / "by-id",
        scsi_host_dir=tmp_path / "scsi_host",
        block_dir=tmp_path / "block",
        device_wait_s=wait,
    )


@pytest.mark.parametrize("prefix", ["wwn-0x", "scsi-3"])
def test_a_disk_is_found_by_either_udev_link(tmp_path: Path, prefix: str) -> None:
    guest = _guest(tmp_path)
    (tmp_path / "dev" / "sdc").touch()
    (guest.device_dir / f"{prefix}{IDENTITY}").symlink_to("../dev/sdc")
    found = find_device(guest.device_dir, IDENTITY)
    assert found == GuestDisk(
        IDENTITY, guest.device_dir / f"{prefix}{IDENTITY}", tmp_path / "dev" / "sdc"
    )
    assert find_device(guest.device_dir, "0" * 32) is None


def test_waiting_rescans_and_gives_up_after_device_wait_s(tmp_path: Path) -> None:
    guest = _guest(tmp_path, wait=2.0)
    now = [0.0]
    with pytest.raises(GuestDeviceError) as missing:
        wait_for_devices(
            guest, [IDENTITY], clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
        )
    assert f"no device with SCSI identity {IDENTITY} appeared" in missing.value.message
    assert missing.value.details == {"missing": [IDENTITY]}
    assert 2.0 <= now[0] < 2.5
    assert (tmp_path / "scsi_host/host0/scan").read_text() == "- - -"


def test_waiting_returns_once_every_disk_appears(tmp_path: Path) -> None:
    guest = _guest(tmp_path)
    (tmp_path / "dev" / "sdd").touch()
    other = "1" * 32
    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        (guest.device_dir / f"wwn-0x{other}").symlink_to("../dev/sdd")

    (guest.device_dir / f"wwn-0x{IDENTITY}").symlink_to("../dev/sdd")
    found = wait_for_devices(guest, [IDENTITY, other], sleep=sleep)
    assert set(found) == {IDENTITY, other}
    assert len(sleeps) == 1


def _block(guest: GuestConfig, name: str, dev: str, *, holders: tuple[str, ...] = ()) -> Path:
    path = guest.block_dir / name
    (path / "holders").mkdir(parents=True)
    (path / "device").mkdir()
    (path / "device" / "delete").touch()
    (path / "dev").write_text(dev + "\n")
    for holder in holders:
        (path / "holders" / holder).touch()
    return path


def test_a_disk_in_use_says_how(tmp_path: Path) -> None:
    guest = _guest(tmp_path)
    base = _block(guest, "sde", "8:64")
    part = base / "sde1"
    (part / "holders").mkdir(parents=True)
    (part / "partition").write_text("1\n")
    (part / "dev").write_text("8:65\n")
    (part / "holders" / "dm-3").touch()
    disk = GuestDisk(IDENTITY, guest.device_dir / "x", Path("/dev/sde"))
    mounts = parse_mountinfo(
        b"36 25 8:65 / /srv/data rw,relatime shared:1 - ext4 /dev/sde1 rw\n"
        b"37 25 8:80 / /other rw shared:2 - ext4 /dev/sdf rw\n"
    )
    assert uses_of(guest, disk, mounts) == [
        "sde1 is mounted at /srv/data",
        "sde1 is held by dm-3 (LVM, md or dm-crypt)",
    ]
    assert uses_of(guest, disk, mounts[1:]) == ["sde1 is held by dm-3 (LVM, md or dm-crypt)"]


def test_a_free_disk_is_forgotten_by_the_kernel(tmp_path: Path) -> None:
    guest = _guest(tmp_path)
    base = _block(guest, "sdg", f"{os.major(1)}:{os.minor(1)}")
    disk = GuestDisk(IDENTITY, guest.device_dir / "x", Path("/dev/sdg"))
    assert uses_of(guest, disk, []) == []
    assert forget_device(guest, disk) is True
    assert (base / "device" / "delete").read_text() == "1"
    assert (
        forget_device(guest, GuestDisk(IDENTITY, guest.device_dir / "y", Path("/dev/sdz"))) is False
    )
