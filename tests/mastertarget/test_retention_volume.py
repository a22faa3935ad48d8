"""Retention volume checks: every refusal criterion of the failback seed, on real directories.

Volumes: ``tmp_path`` and a directory on ``/dev/shm`` are two real file
systems, so "same volume" and "other volume" are told apart by the kernel, not
by a fake. A fake mount table is used only to present a file system type or a
read-only flag that the test machine does not have; when root, the same
refusals are also shown on real tmpfs mounts inside a private mount namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import pytest

from mastertarget.errors import RetentionCriterion, RetentionVolumeError
from mastertarget.retention_lock import LOCK_FILE_NAME
from mastertarget.retention_volume import (
    check_retention_volume,
    installed_package_dir,
    usage,
)
from runtime.errors import MountTableError
from runtime.mounts import MountEntry, find_mount, parse_mountinfo, read_mount_table, whole_disk

#: A mount table as the kernel writes it: optional fields (shared:, master:),
#: none at all, octal escapes for space, tab and backslash, an empty source,
#: and a FUSE type.
FAKE_MOUNTINFO = rb"""27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
40 27 8:17 / /mnt/usb\040stick rw,nosuid,relatime shared:12 master:3 - vfat /dev/sdb1 rw,fmask=0022
41 27 0:45 /sub /mnt/tab\011and\134back ro,relatime - tmpfs  rw,size=1024k
42 27 0:46 / /mnt/exfat rw - fuseblk.exfat /dev/sdc1 rw,user_id=0
"""

#: The unprivileged user a root test drops to (nobody on Debian).
NOBODY = 65534

#: A child that takes the lock and keeps it until its standard input closes.
HOLD_LOCK = """
import sys
from mastertarget.retention_volume import check_retention_volume
volume = check_retention_volume(
    sys.argv[1], cache_dir=sys.argv[2], install_dir=sys.argv[2], targets=[]
)
print("locked", flush=True)
sys.stdin.read()
"""

#: A child that runs the check and prints the result or the refusal as JSON;
#: given a third argument, it first drops to that uid and gid (from root).
CHECK_AND_REPORT = """
import json, os, sys
from mastertarget.errors import RetentionVolumeError
from mastertarget.retention_volume import check_retention_volume
if len(sys.argv) > 3:
    os.setgroups([])
    os.setgid(int(sys.argv[3]))
    os.setuid(int(sys.argv[3]))
try:
    volume = check_retention_volume(
        sys.argv[1], cache_dir=sys.argv[2], install_dir=sys.argv[2], targets=[]
    )
except RetentionVolumeError as exc:
    print(json.dumps(exc.to_json()))
else:
    print(json.dumps({"fstype": volume.fstype, "capacity": volume.capacity_bytes}))
"""


class LocalDirs(TypedDict):
    """The cache and install directories passed to every check."""

    cache_dir: Path
    install_dir: Path


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture
def other_volume(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system other than ``tmp_path``'s (tmpfs at /dev/shm)."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("/dev/shm is not mounted: no second volume for the test")
    directory = Path(tempfile.mkdtemp(prefix="retention-", dir="/dev/shm"))
    try:
        if directory.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm and the test's tmp_path are on one volume")
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def local_dirs(tmp_path: Path) -> LocalDirs:
    """A cache and an install directory on ``tmp_path``'s volume (the cache not made yet)."""
    install = tmp_path / "opt" / "blockrepl"
    install.mkdir(parents=True)
    return {"cache_dir": tmp_path / "var" / "cache", "install_dir": install}


def _refusal(directory: Path | str, **kwargs: object) -> RetentionVolumeError:
    """The error ``check_retention_volume`` raises for ``directory``."""
    with pytest.raises(RetentionVolumeError) as caught:
        check_retention_volume(directory, **kwargs)  # type: ignore[arg-type]
    assert caught.value.exit_code == 78
    assert caught.value.code == "retention-volume"
    return caught.value


def _fake_table(tmp_path: Path, *lines: str) -> Path:
    """A mountinfo file made of ``lines``."""
    path = tmp_path / "mountinfo"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _escape(path: Path) -> str:
    """A path written as the kernel writes it in mountinfo."""
    text = str(path)
    for char in "\\ \t\n":
        text = text.replace(char, f"\\{ord(char):03o}")
    return text


# --- the mount table ----------------------------------------------------------------


def test_mountinfo_fields_escapes_and_optional_fields() -> None:
    root, usb, tab, exfat = parse_mountinfo(FAKE_MOUNTINFO)
    assert root == MountEntry(
        mount_id=27,
        parent_id=1,
        device=os.makedev(254, 0),
        root="/",
        mount_point="/",
        options=("rw", "relatime"),
        fstype="ext4",
        source="/dev/vda",
        super_options=("rw", "discard"),
    )
    assert usb.mount_point == "/mnt/usb stick"
    assert (usb.fstype, usb.source, usb.device) == ("vfat", "/dev/sdb1", os.makedev(8, 17))
    assert usb.super_options == ("rw", "fmask=0022")
    assert tab.mount_point == "/mnt/tab\tand\\back"
    assert (tab.root, tab.source, tab.read_only, usb.read_only) == ("/sub", "", True, False)
    assert (exfat.fstype, exfat.base_fstype, root.base_fstype) == ("fuseblk.exfat", "exfat", "ext4")


def test_mountinfo_of_this_machine_parses_and_holds_root() -> None:
    table = read_mount_table()
    assert find_mount(table, "/").mount_point == "/"
    here = find_mount(table, str(Path.cwd().resolve()))
    assert here.device == Path.cwd().stat().st_dev or here.fstype in {"btrfs", "overlay"}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"27 1 254:0 / / rw shared:1 ext4 /dev/vda rw", "line 2: expected a '-' after"),
        (b"27 1 254:0 / / rw - ext4 /dev/vda", "line 2: expected 3 fields after '-', found 2"),
        (b"27 1 254-0 / / rw - ext4 /dev/vda rw", "line 2: expected 'ID PARENT MAJOR:MINOR'"),
        (b"27 x 254:0 / / rw - ext4 /dev/vda rw", "line 2: expected 'ID PARENT MAJOR:MINOR'"),
        (b"27 1 fe:0 / / rw - ext4 /dev/vda rw", "line 2: expected MAJOR:MINOR in decimal"),
        (b"27 1 254:0 / -", "line 2: expected a '-' after the optional fields, found none"),
    ],
)
def test_malformed_mountinfo_is_refused_naming_the_line(line: bytes, expected: str) -> None:
    data = b"1 0 0:1 / / rw - rootfs rootfs rw\n" + line + b"\n"
    with pytest.raises(MountTableError) as caught:
        parse_mountinfo(data, source="fake-mountinfo")
    assert caught.value.code == "mount-table"
    assert f"fake-mountinfo {expected}" in caught.value.message


def test_unreadable_mount_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MountTableError, match=r"cannot read mount table .*absent"):
        read_mount_table(tmp_path / "absent")
    with pytest.raises(RetentionVolumeError, match=r"cannot read mount table") as caught:
        check_retention_volume(
            tmp_path, cache_dir=tmp_path, install_dir=tmp_path, targets=(),
            mountinfo=tmp_path / "absent",
        )  # fmt: skip
    assert caught.value.criterion == "mount-table"


def test_find_mount_takes_the_longest_whole_component_prefix_and_the_top_mount() -> None:
    table = parse_mountinfo(
        b"1 0 254:0 / / rw - ext4 /dev/vda rw\n"
        b"2 1 8:1 / /mnt/ret rw - ext4 /dev/sda1 rw\n"
        b"3 1 8:2 / /mnt/retention rw - xfs /dev/sda2 rw\n"
        b"4 1 8:3 / /mnt/retention rw - ext4 /dev/sda3 rw\n"
        b"5 4 8:4 / /mnt/retention/deeper rw - ext4 /dev/sda4 rw\n"
    )
    assert find_mount(table, "/mnt/retention/journal").mount_id == 4  # mounted over id 3
    assert find_mount(table, "/mnt/retention").mount_id == 4
    assert find_mount(table, "/mnt/retention/deeper/x").mount_id == 5
    assert find_mount(table, "/mnt/retx").mount_id == 1
    assert find_mount(table, "/mnt/ret/a").mount_id == 2
    with pytest.raises(MountTableError, match="no mount in the mount table contains /x"):
        find_mount(table[1:], "/x")


def test_whole_disk_follows_sysfs_from_partition_to_disk(tmp_path: Path) -> None:
    disk = tmp_path / "devices" / "virtual" / "block" / "sdz"
    part = disk / "sdz1"
    part.mkdir(parents=True)
    (disk / "dev").write_text("8:16\n")
    (part / "dev").write_text("8:17\n")
    (part / "partition").write_text("1\n")
    by_number = tmp_path / "dev" / "block"
    by_number.mkdir(parents=True)
    (by_number / "8:17").symlink_to(part)
    (by_number / "8:16").symlink_to(disk)
    assert whole_disk(os.makedev(8, 17), sys_dev_block=by_number) == os.makedev(8, 16)
    assert whole_disk(os.makedev(8, 16), sys_dev_block=by_number) == os.makedev(8, 16)
    assert whole_disk(os.makedev(9, 1), sys_dev_block=by_number) == os.makedev(9, 1)


# --- the happy path ---------------------------------------------------------------------


def test_retention_on_a_volume_of_its_own_is_accepted_and_locked(
    other_volume: Path, local_dirs: LocalDirs, tmp_path: Path
) -> None:
    link = tmp_path / "retention-link"
    link.symlink_to(other_volume)
    target = tmp_path / "disks" / "vm01-disk0.raw"  # made at first sync
    volume = check_retention_volume(link, targets=[target], **local_dirs)
    with volume.lock:
        assert volume.path == other_volume.resolve()
        assert volume.device == other_volume.stat().st_dev
        assert volume.fstype == "tmpfs"
        assert volume.mount_point == find_mount(read_mount_table(), str(other_volume)).mount_point
        assert 0 < volume.free_bytes <= volume.capacity_bytes
        held_inside = volume.lock.held
        assert volume.lock.path == other_volume / LOCK_FILE_NAME
        pid, host = (other_volume / LOCK_FILE_NAME).read_text().split()
        assert (int(pid), host) == (os.getpid(), os.uname().nodename)
    assert (held_inside, volume.lock.held) == (True, False)
    volume.lock.release()  # idempotent
    # Released: the directory can be checked and locked again.
    check_retention_volume(other_volume, targets=[], **local_dirs).lock.release()


def test_usage_agrees_with_df(tmp_path: Path) -> None:
    df = shutil.which("df")
    if df is None:
        pytest.skip("df (coreutils) is not installed")
    # Only this test writes into tmp_path, but the volume is shared: compare
    # figures that other writers hardly move, within a small tolerance.
    used, free, capacity = usage(tmp_path)
    output = subprocess.run(
        [df, "-B1", "--output=size,used,avail", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    size, df_used, avail = (int(word) for word in output.splitlines()[1].split())
    assert capacity == size
    tolerance = 64 * 1024 * 1024
    assert abs(used - df_used) < tolerance
    assert abs(free - avail) < tolerance


def test_usage_of_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RetentionVolumeError, match="cannot be measured") as caught:
        usage(tmp_path / "absent")
    assert caught.value.criterion == "inaccessible"


# --- missing, not a directory, zero capacity, not writable -------------------------------


def test_missing_directory_is_refused(tmp_path: Path, local_dirs: LocalDirs) -> None:
    error = _refusal(tmp_path / "retention", targets=[], **local_dirs)
    assert error.criterion == RetentionCriterion.MISSING
    assert error.message == (
        f"retention directory {tmp_path / 'retention'} does not exist: expected a directory"
        " on a volume of its own (mount the retention volume there)"
    )
    assert error.to_json()["directory"] == str(tmp_path / "retention")


def test_a_file_is_not_a_directory(tmp_path: Path, local_dirs: LocalDirs) -> None:
    file = tmp_path / "retention"
    file.write_bytes(b"")
    error = _refusal(file, targets=[], **local_dirs)
    assert error.criterion == RetentionCriterion.NOT_A_DIRECTORY
    assert error.message == (
        f"retention directory {file} is not a directory: expected a directory,"
        f" found a regular file ({file})"
    )


def test_zero_capacity_is_refused_on_a_real_pseudo_file_system(
    local_dirs: LocalDirs,
) -> None:
    error = _refusal("/proc", targets=[], **local_dirs)
    assert error.criterion == RetentionCriterion.ZERO_CAPACITY
    assert error.message == (
        "retention directory /proc has zero capacity: statvfs reports 0 blocks on the proc"
        " file system mounted at /proc; expected a volume with a fixed, non-zero size"
    )


def test_read_only_mount_is_refused(
    tmp_path: Path, other_volume: Path, local_dirs: LocalDirs
) -> None:
    table = _fake_table(
        tmp_path,
        "1 0 254:0 / / rw - ext4 /dev/vda rw",
        f"2 1 8:1 / {_escape(other_volume)} ro,relatime - ext4 /dev/sdb1 rw",
    )
    error = _refusal(other_volume, targets=[], mountinfo=table, **local_dirs)
    assert error.criterion == RetentionCriterion.NOT_WRITABLE
    assert error.message == (
        f"retention directory {other_volume} is not writable: its mount {other_volume}"
        " (ext4) is read-only"
    )


def test_directory_without_write_permission_is_refused(
    other_volume: Path, local_dirs: LocalDirs
) -> None:
    root = os.geteuid() == 0
    # Root may write anywhere: then nobody checks a directory only root may write.
    mode, uid = (0o755, NOBODY) if root else (0o555, os.geteuid())
    other_volume.chmod(mode)
    if root:
        child = subprocess.run(
            [sys.executable, "-c", CHECK_AND_REPORT, str(other_volume), "/", str(NOBODY)],
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(child.stdout)
        criterion, message = report["criterion"], report["message"]
    else:
        try:
            error = _refusal(other_volume, targets=[], **local_dirs)
        finally:
            other_volume.chmod(0o700)
        criterion, message = error.criterion, error.message
    assert criterion == RetentionCriterion.NOT_WRITABLE
    owner = other_volume.stat()
    assert message == (
        f"retention directory {other_volume} is not writable by uid {uid}: found mode"
        f" {mode:04o} owned by uid {owner.st_uid} gid {owner.st_gid}"
    )


# --- FAT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fstype", ["vfat", "msdos", "fat", "exfat", "fuseblk.exfat"])
def test_fat_family_file_systems_are_refused(
    tmp_path: Path, local_dirs: LocalDirs, fstype: str
) -> None:
    retention = tmp_path / "usb stick\\1"
    retention.mkdir()
    table = _fake_table(
        tmp_path,
        "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
        f"40 27 8:17 / {_escape(retention)} rw,relatime shared:12 - {fstype} /dev/sdb1 rw",
    )
    error = _refusal(retention, targets=[], mountinfo=table, **local_dirs)
    assert error.criterion == RetentionCriterion.FAT_FILE_SYSTEM
    assert error.message == (
        f"retention directory {retention} is on a {fstype} file system (mount {retention}):"
        " FAT, FAT32 and exFAT volumes cannot hold a retention journal (no metadata journal,"
        " no file permissions); use ext4 or xfs"
    )


def test_an_ext4_volume_in_the_same_table_passes(
    tmp_path: Path, other_volume: Path, local_dirs: LocalDirs
) -> None:
    table = _fake_table(
        tmp_path,
        "27 1 254:0 / / rw - ext4 /dev/vda rw",
        f"40 27 8:17 / {_escape(other_volume)} rw - ext4 /dev/sdb1 rw",
    )
    volume = check_retention_volume(other_volume, targets=[], mountinfo=table, **local_dirs)
    volume.lock.release()
    assert (volume.fstype, volume.mount_point) == ("ext4", str(other_volume))


# --- cache and install volumes ----------------------------------------------------------


def test_cache_volume_is_refused_even_before_the_cache_exists(
    other_volume: Path, local_dirs: LocalDirs
) -> None:
    retention = other_volume / "retention"
    retention.mkdir()
    cache = other_volume / "cache" / "inbox"  # not made yet: judged by /dev/shm/...
    error = _refusal(retention, cache_dir=cache, install_dir=local_dirs["install_dir"], targets=[])
    assert error.criterion == RetentionCriterion.CACHE_VOLUME
    device = other_volume.stat().st_dev
    assert error.message == (
        f"retention directory {retention} is on the same volume as the cache directory {cache}"
        f" (both on device {os.major(device)}:{os.minor(device)}): a retention volume must be"
        " a volume of its own"
    )


def test_install_volume_is_refused(
    tmp_path: Path, other_volume: Path, local_dirs: LocalDirs
) -> None:
    error = _refusal(
        other_volume, cache_dir=local_dirs["cache_dir"], install_dir=other_volume, targets=[]
    )
    assert error.criterion == RetentionCriterion.INSTALL_VOLUME
    assert f"same volume as the install directory {other_volume}" in error.message


def test_this_installation_is_on_the_install_volume() -> None:
    assert (installed_package_dir() / "mastertarget" / "retention_volume.py").is_file()


def test_same_mount_entry_is_one_volume_even_when_st_dev_differs(
    tmp_path: Path, other_volume: Path, local_dirs: LocalDirs
) -> None:
    # As on overlayfs, where files report the st_dev of the layer below: the
    # table puts both paths on the one mount "/".
    table = _fake_table(tmp_path, "1 0 0:99 / / rw - overlay overlay rw")
    error = _refusal(other_volume, targets=[], mountinfo=table, **local_dirs)
    assert error.criterion == RetentionCriterion.CACHE_VOLUME
    assert "(both on the overlay mount /)" in error.message


def test_one_file_system_at_two_mount_points_is_one_volume(
    tmp_path: Path, other_volume: Path, local_dirs: LocalDirs
) -> None:
    # A bind mount (or a btrfs subvolume): two mounts, one device in the table.
    table = _fake_table(
        tmp_path,
        "1 0 254:0 / / rw - ext4 /dev/vda rw",
        f"2 1 254:0 /srv/retention {_escape(other_volume)} rw - ext4 /dev/vda rw",
    )
    error = _refusal(other_volume, targets=[], mountinfo=table, **local_dirs)
    assert error.criterion == RetentionCriterion.CACHE_VOLUME
    assert f"(one file system, device 254:0, mounted at {other_volume} and /)" in error.message


# --- replication targets ----------------------------------------------------------------


@pytest.mark.parametrize("exists", [True, False])
def test_target_file_on_the_retention_volume_is_refused(
    other_volume: Path, local_dirs: LocalDirs, exists: bool
) -> None:
    retention = other_volume / "retention"
    retention.mkdir()
    target = other_volume / "disks" / "vm01-disk0-flat.vmdk"
    if exists:
        target.parent.mkdir()
        target.write_bytes(b"\0" * 512)
    elsewhere = local_dirs["install_dir"].parent / "vm02.raw"
    error = _refusal(retention, targets=[elsewhere, target], **local_dirs)
    assert error.criterion == RetentionCriterion.REPLICATION_TARGET
    device = other_volume.stat().st_dev
    assert error.message == (
        f"retention directory {retention} is in use as a replication target: target {target}"
        f" is on the same volume (both on device {os.major(device)}:{os.minor(device)});"
        " a retention volume must not be used for any other purpose"
    )


def _block_node(directory: Path, device: int) -> Path:
    """A block special file naming ``device`` (needs CAP_MKNOD), or skip."""
    node = directory / f"disk-{os.major(device)}-{os.minor(device)}"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, device)
    except PermissionError as exc:
        pytest.skip(f"cannot make a block device node here: {exc}")
    return node


def test_target_block_device_holding_the_retention_directory_is_refused(
    tmp_path: Path, other_volume: Path, local_dirs: LocalDirs
) -> None:
    device = other_volume.stat().st_dev
    target = _block_node(tmp_path, device)
    error = _refusal(other_volume, targets=[target], **local_dirs)
    assert error.criterion == RetentionCriterion.REPLICATION_TARGET
    mount = find_mount(read_mount_table(), str(other_volume)).mount_point
    assert error.message == (
        f"retention directory {other_volume} is in use as a replication target: target"
        f" {target} is the block device {os.major(device)}:{os.minor(device)}, which holds it"
        f" (mount {mount}); a retention volume must not be used for any other purpose"
    )


def test_target_disk_whose_partition_holds_the_retention_directory_is_refused(
    tmp_path: Path, other_volume: Path, local_dirs: LocalDirs
) -> None:
    # sysfs says the retention volume's device is partition 1 of disk 7:99.
    device = other_volume.stat().st_dev
    disk = tmp_path / "sys" / "devices" / "vdz"
    (disk / "vdz1").mkdir(parents=True)
    (disk / "dev").write_text("7:99\n")
    (disk / "vdz1" / "partition").write_text("1\n")
    by_number = tmp_path / "sys" / "dev" / "block"
    by_number.mkdir(parents=True)
    (by_number / f"{os.major(device)}:{os.minor(device)}").symlink_to(disk / "vdz1")
    target = _block_node(tmp_path, os.makedev(7, 99))
    unrelated = _block_node(tmp_path, os.makedev(7, 98))
    kwargs = {"targets": [unrelated], "sys_dev_block": by_number, **local_dirs}
    check_retention_volume(other_volume, **kwargs).lock.release()  # type: ignore[arg-type]
    error = _refusal(
        other_volume, targets=[unrelated, target], sys_dev_block=by_number, **local_dirs
    )
    assert error.criterion == RetentionCriterion.REPLICATION_TARGET
    assert f"target {target} is the disk 7:99, a partition of which holds it" in error.message


def test_allow_shared_volume_lifts_only_the_same_volume_rules(
    tmp_path: Path, local_dirs: LocalDirs
) -> None:
    # A demo on one disk: retention, cache, installation and target files together.
    retention = tmp_path / "retention"
    retention.mkdir()
    target = tmp_path / "disks" / "vm01.raw"
    volume = check_retention_volume(
        retention, targets=[target], allow_shared_volume=True, **local_dirs
    )
    with volume.lock:
        assert volume.device == tmp_path.stat().st_dev
        error = _refusal(retention, targets=[], allow_shared_volume=True, **local_dirs)
        assert error.criterion == RetentionCriterion.LOCKED
    # A target device that holds the directory is never allowed.
    node = _block_node(tmp_path, tmp_path.stat().st_dev)
    error = _refusal(retention, targets=[node], allow_shared_volume=True, **local_dirs)
    assert error.criterion == RetentionCriterion.REPLICATION_TARGET
    # Without the flag, the same layout is refused.
    assert (
        _refusal(retention, targets=[], **local_dirs).criterion == RetentionCriterion.CACHE_VOLUME
    )


# --- the lock -------------------------------------------------------------------------


def test_a_second_check_in_the_same_process_is_refused(
    other_volume: Path, local_dirs: LocalDirs
) -> None:
    with check_retention_volume(other_volume, targets=[], **local_dirs).lock:
        error = _refusal(other_volume, targets=[], **local_dirs)
    assert error.criterion == RetentionCriterion.LOCKED
    assert error.message == (
        f"retention directory {other_volume} is locked: another master target"
        f" (pid {os.getpid()} on host {os.uname().nodename}) holds"
        f" {other_volume / LOCK_FILE_NAME}; stop it or give this master target a retention"
        " directory of its own"
    )


def test_lock_held_by_another_process_is_refused_until_it_dies(
    other_volume: Path, local_dirs: LocalDirs
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(other_volume), str(local_dirs["install_dir"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        error = _refusal(other_volume, targets=[], **local_dirs)
        assert error.criterion == RetentionCriterion.LOCKED
        assert f"(pid {holder.pid} on host " in error.message
        assert f"holds {other_volume / LOCK_FILE_NAME};" in error.message
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the flock: no stale lock
        holder.wait()
    check_retention_volume(other_volume, targets=[], **local_dirs).lock.release()


def test_another_process_is_refused_while_this_one_holds_the_lock(
    other_volume: Path, local_dirs: LocalDirs
) -> None:
    with check_retention_volume(other_volume, targets=[], **local_dirs).lock:
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                CHECK_AND_REPORT,
                str(other_volume),
                str(local_dirs["install_dir"]),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    report = json.loads(child.stdout)
    assert report["error"] == "retention-volume"
    assert report["criterion"] == "locked"
    assert f"(pid {os.getpid()} on host " in report["message"]


def test_a_symlink_in_place_of_the_lock_file_is_not_followed(
    tmp_path: Path, other_volume: Path, local_dirs: LocalDirs
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (other_volume / LOCK_FILE_NAME).symlink_to(victim)
    error = _refusal(other_volume, targets=[], **local_dirs)
    assert error.criterion == RetentionCriterion.NOT_WRITABLE
    assert f"cannot open the lock file {other_volume / LOCK_FILE_NAME}" in error.message
    assert victim.read_text() == "keep me\n"


# --- real tmpfs mounts in a private mount namespace (root) -------------------------------


def _check_on_tmpfs(tmp_path: Path, options: str) -> dict[str, object]:
    """Mount a tmpfs with ``options`` in a new mount namespace and check it from inside."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare(1) to mount a tmpfs in a private namespace")
    if subprocess.run([unshare, "-m", "true"], capture_output=True, check=False).returncode:
        pytest.skip("unshare -m is not permitted here")
    point = tmp_path / "volume"
    point.mkdir()
    script = 'mount -t tmpfs -o "$1" blockrepl-test "$2" && shift 2 && exec "$@"'
    child = subprocess.run(
        [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh", options,
         str(point), sys.executable, "-c", CHECK_AND_REPORT, str(point), str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report: dict[str, object] = json.loads(child.stdout)
    return report


def test_real_tmpfs_of_its_own_is_accepted(tmp_path: Path) -> None:
    report = _check_on_tmpfs(tmp_path, "size=8m")
    assert report == {"fstype": "tmpfs", "capacity": 8 * 1024 * 1024}


def test_real_tmpfs_without_a_size_limit_has_zero_capacity(tmp_path: Path) -> None:
    report = _check_on_tmpfs(tmp_path, "size=0")
    assert report["criterion"] == "zero-capacity"
    assert "statvfs reports 0 blocks on the tmpfs file system" in str(report["message"])


def test_real_read_only_tmpfs_is_refused(tmp_path: Path) -> None:
    report = _check_on_tmpfs(tmp_path, "ro,size=8m")
    assert report["criterion"] == "not-writable"
    assert f"its mount {tmp_path / 'volume'} (tmpfs) is read-only" in str(report["message"])
