"""Checks that a directory may hold the master target's retention journal.

The failback seed lists when a volume is not eligible as a retention volume:
it is the cache volume or holds the installation, it is in use for another
purpose such as a replication target, it is locked, its file system is FAT or
FAT32, or its capacity is zero. :func:`check_retention_volume` runs these
checks at start-up, in an order that reports the most basic fault first
(missing, not a directory, mount table, file system, capacity, writable,
cache, install, targets, lock), and refuses with a
:class:`~mastertarget.errors.RetentionVolumeError` naming the failed criterion.
The lock (mastertarget/retention_lock.py) is taken last, once every other
check passed, and kept.
``allow_shared_volume`` lifts the same-volume rules for a demo or a test on
one disk; the others, and the rule that a target device must not hold the
directory, still apply.

"Same volume" is decided three ways, because each alone misses a case:

* the ``st_dev`` of both paths: the plain case;
* the mount entry found for both paths in the mount table (the longest mount
  point that is a prefix of the resolved path): overlayfs reports the ``st_dev``
  of the layer below for regular files, so two files on one overlay mount may
  differ by ``st_dev``;
* the device of both mount entries: btrfs gives each subvolume its own
  ``st_dev``, and a bind mount is a second mount point of the same file system.

Where a path does not exist yet (a cache directory made at first start, a
target file made at first sync), the volume of its nearest existing ancestor
is the one it will be created on.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, NamedTuple

from mastertarget.errors import RetentionCriterion, RetentionVolumeError
from mastertarget.retention_lock import RetentionLock, file_kind, take_lock
from runtime.errors import MountTableError
from runtime.mounts import (
    MOUNTINFO_PATH,
    SYS_DEV_BLOCK,
    MountEntry,
    dev_name,
    find_mount,
    read_mount_table,
    whole_disk,
)

StrPath = str | os.PathLike[str]

#: The retention directory on Linux when the config names none (docs/design.md policy table).
DEFAULT_RETENTION_DIR: Final = Path("/mnt/retention")
#: File system types refused (mount table names, lower case). The seed names
#: FAT and FAT32 (Linux: vfat, msdos, and fat/umsdos on old kernels). exFAT is
#: refused too, for the same reasons: no metadata journal, so a crash can lose
#: the renames and directory entries the journal's crash safety rests on (the
#: docs/design.md checklist), and no owners or modes, so journal files cannot be
#: kept private to the master target.
FAT_FILE_SYSTEMS: Final = frozenset({"vfat", "msdos", "fat", "umsdos", "exfat"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetentionVolume:
    """A retention directory that passed every check, and its lock.

    Args:
        path: the directory, resolved (symbolic links followed).
        mount_point: where its file system is mounted.
        fstype: the file system type, as the mount table names it.
        device: ``st_dev`` of the directory.
        capacity_bytes: size of the file system.
        free_bytes: bytes the master target may still use (statvfs ``f_bavail``).
        lock: the lock on the directory, held; release it to give the directory up.
    """

    path: Path
    mount_point: str
    fstype: str
    device: int
    capacity_bytes: int
    free_bytes: int
    lock: RetentionLock


class _Placement(NamedTuple):
    """Where a path lives: its ``st_dev`` and its mount entry."""

    path: str
    device: int
    mount: MountEntry


def check_retention_volume(
    directory: StrPath,
    *,
    cache_dir: StrPath,
    install_dir: StrPath,
    targets: Iterable[StrPath],
    mountinfo: StrPath = MOUNTINFO_PATH,
    sys_dev_block: StrPath = SYS_DEV_BLOCK,
    allow_shared_volume: bool = False,
) -> RetentionVolume:
    """Refuse a retention directory the seed rules out; otherwise lock it and describe it.

    Args:
        directory: the configured retention directory (default
            :data:`DEFAULT_RETENTION_DIR`).
        cache_dir: the master target's cache (inbox) directory; it need not exist yet.
        install_dir: where the program's files are installed
            (:func:`installed_package_dir` for this installation).
        targets: every configured target disk path: files (for a VMDK, the
            descriptor and its extents) or block devices.
        mountinfo: the mount table to read; tests point it at a fake one.
        sys_dev_block: the sysfs directory of block devices by number.
        allow_shared_volume: skip the same-volume checks against the cache,
            the installation and target files, for a demo or test on one
            disk. A target block device that holds the directory is refused
            all the same: replicating onto it would overwrite the journal.

    Returns:
        The volume, with its lock held until released or the process ends.

    Raises:
        RetentionVolumeError: the directory is refused; ``criterion`` says
            why and the message names the directory and what was found.
    """
    try:
        return _check(
            directory,
            cache_dir=cache_dir,
            install_dir=install_dir,
            targets=targets,
            mountinfo=mountinfo,
            sys_dev_block=sys_dev_block,
            allow_shared_volume=allow_shared_volume,
        )
    except MountTableError as exc:
        raise RetentionVolumeError(
            exc.message, criterion=RetentionCriterion.MOUNT_TABLE.value
        ) from exc


def _check(
    directory: StrPath,
    *,
    cache_dir: StrPath,
    install_dir: StrPath,
    targets: Iterable[StrPath],
    mountinfo: StrPath,
    sys_dev_block: StrPath,
    allow_shared_volume: bool,
) -> RetentionVolume:
    shown = os.fspath(directory)
    resolved = _existing_directory(shown)
    table = read_mount_table(mountinfo)
    mount = find_mount(table, str(resolved))
    if mount.base_fstype in FAT_FILE_SYSTEMS:
        raise RetentionVolumeError.refusing(
            RetentionCriterion.FAT_FILE_SYSTEM,
            shown,
            f"is on a {mount.fstype} file system (mount {mount.mount_point}): FAT, FAT32 and"
            " exFAT volumes cannot hold a retention journal (no metadata journal, no file"
            " permissions); use ext4 or xfs",
        )
    capacity, free = _capacity(shown, resolved, mount)
    _check_writable(shown, resolved, mount)
    here = _placement(str(resolved), table)
    if not allow_shared_volume:
        _check_own_volume(shown, here, table, cache_dir=cache_dir, install_dir=install_dir)
    for target in targets:
        _check_not_target(
            shown,
            here,
            os.fspath(target),
            table,
            sys_dev_block,
            same_volume=not allow_shared_volume,
        )
    return RetentionVolume(
        path=resolved,
        mount_point=mount.mount_point,
        fstype=mount.fstype,
        device=here.device,
        capacity_bytes=capacity,
        free_bytes=free,
        lock=take_lock(shown, resolved),
    )


def usage(directory: StrPath) -> tuple[int, int, int]:
    """``(used_bytes, free_bytes, capacity_bytes)`` of the volume holding ``directory``.

    ``free_bytes`` is what an unprivileged writer may still use (``f_bavail``),
    so ``used + free`` falls short of the capacity by the blocks reserved for root.

    Raises:
        RetentionVolumeError: statvfs failed (criterion ``inaccessible``).
    """
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        raise RetentionVolumeError.refusing(
            RetentionCriterion.INACCESSIBLE,
            os.fspath(directory),
            f"cannot be measured: {exc.strerror}",
        ) from exc
    capacity = stats.f_blocks * stats.f_frsize
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    return used, stats.f_bavail * stats.f_frsize, capacity


def installed_package_dir() -> Path:
    """The directory this installation's Python packages are in (``install_dir``)."""
    return Path(__file__).resolve().parent.parent


# --- the checks -------------------------------------------------------------------


def _existing_directory(shown: str) -> Path:
    """The retention directory resolved, or the refusal for missing / not a directory."""
    try:
        resolved = Path(shown).resolve(strict=True)
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise RetentionVolumeError.refusing(
            RetentionCriterion.MISSING,
            shown,
            "does not exist: expected a directory on a volume of its own (mount the retention"
            " volume there)",
        ) from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise RetentionVolumeError.refusing(
            RetentionCriterion.INACCESSIBLE, shown, f"cannot be examined: {reason}"
        ) from exc
    if not stat.S_ISDIR(mode):
        raise RetentionVolumeError.refusing(
            RetentionCriterion.NOT_A_DIRECTORY,
            shown,
            f"is not a directory: expected a directory, found a {file_kind(mode)} ({resolved})",
        )
    return resolved


def _capacity(shown: str, resolved: Path, mount: MountEntry) -> tuple[int, int]:
    """``(capacity_bytes, free_bytes)``, or the refusal for zero capacity."""
    _, free, capacity = usage(resolved)
    if capacity == 0:
        # Pseudo file systems (proc, sysfs) and a tmpfs mounted with size=0
        # ("no limit") report no blocks: nothing to budget 24 hours of undo in.
        raise RetentionVolumeError.refusing(
            RetentionCriterion.ZERO_CAPACITY,
            shown,
            f"has zero capacity: statvfs reports 0 blocks on the {mount.fstype} file system"
            f" mounted at {mount.mount_point}; expected a volume with a fixed, non-zero size",
        )
    return capacity, free


def _check_writable(shown: str, resolved: Path, mount: MountEntry) -> None:
    """Refuse a directory on a read-only mount, or one this process may not write."""
    if mount.read_only:
        raise RetentionVolumeError.refusing(
            RetentionCriterion.NOT_WRITABLE,
            shown,
            f"is not writable: its mount {mount.mount_point} ({mount.fstype}) is read-only",
        )
    effective = os.access in os.supports_effective_ids
    if not os.access(resolved, os.W_OK | os.X_OK, effective_ids=effective):
        info = resolved.stat()
        raise RetentionVolumeError.refusing(
            RetentionCriterion.NOT_WRITABLE,
            shown,
            f"is not writable by uid {os.geteuid()}: found mode {stat.S_IMODE(info.st_mode):04o}"
            f" owned by uid {info.st_uid} gid {info.st_gid}",
        )


def _check_own_volume(
    shown: str,
    here: _Placement,
    table: Sequence[MountEntry],
    *,
    cache_dir: StrPath,
    install_dir: StrPath,
) -> None:
    """Refuse a retention directory on the cache volume or the install volume."""
    for criterion, what, other in (
        (RetentionCriterion.CACHE_VOLUME, "cache directory", os.fspath(cache_dir)),
        (RetentionCriterion.INSTALL_VOLUME, "install directory", os.fspath(install_dir)),
    ):
        shared = _shared_volume(here, _placement(other, table))
        if shared:
            raise RetentionVolumeError.refusing(
                criterion,
                shown,
                f"is on the same volume as the {what} {other} ({shared}):"
                " a retention volume must be a volume of its own",
            )


def _check_not_target(
    shown: str,
    here: _Placement,
    target: str,
    table: Sequence[MountEntry],
    sys_dev_block: StrPath,
    *,
    same_volume: bool,
) -> None:
    """Refuse a target that is the device holding the directory, or a file on its volume.

    The second test runs only when ``same_volume`` is true.
    """
    try:
        info = os.stat(target)
    except OSError:
        info = None
    if info is not None and stat.S_ISBLK(info.st_mode):
        # A device node lives on /dev; what matters is the device it names.
        holders = {here.device, here.mount.device}
        if info.st_rdev in holders:
            found = (
                f"block device {dev_name(info.st_rdev)}, which holds it"
                f" (mount {here.mount.mount_point})"
            )
        elif info.st_rdev in {whole_disk(dev, sys_dev_block=sys_dev_block) for dev in holders}:
            found = (
                f"disk {dev_name(info.st_rdev)}, a partition of which holds it"
                f" (mount {here.mount.mount_point})"
            )
        else:
            return
        raise RetentionVolumeError.refusing(
            RetentionCriterion.REPLICATION_TARGET,
            shown,
            f"is in use as a replication target: target {target} is the {found};"
            " a retention volume must not be used for any other purpose",
        )
    shared = _shared_volume(here, _placement(target, table)) if same_volume else ""
    if shared:
        raise RetentionVolumeError.refusing(
            RetentionCriterion.REPLICATION_TARGET,
            shown,
            f"is in use as a replication target: target {target} is on the same volume"
            f" ({shared}); a retention volume must not be used for any other purpose",
        )


# --- helpers ----------------------------------------------------------------------


def _placement(path: str, table: Sequence[MountEntry]) -> _Placement:
    """Where ``path`` lives, or will live once created: its nearest existing ancestor."""
    try:
        candidate = Path(path).resolve()
    except RuntimeError:  # a symlink loop (Python < 3.13): judge the path as written
        candidate = Path(os.path.abspath(path))
    while True:
        try:
            info = candidate.stat()
            break
        except OSError:
            if candidate.parent == candidate:
                raise
            candidate = candidate.parent
    return _Placement(str(candidate), info.st_dev, find_mount(table, str(candidate)))


def _shared_volume(here: _Placement, there: _Placement) -> str:
    """How two placements share a volume, for the message; empty when they do not."""
    if here.device == there.device:
        return f"both on device {dev_name(here.device)}"
    if here.mount.mount_id == there.mount.mount_id:
        return f"both on the {here.mount.fstype} mount {here.mount.mount_point}"
    if here.mount.device == there.mount.device:
        return (
            f"one file system, device {dev_name(here.mount.device)}, mounted at"
            f" {here.mount.mount_point} and {there.mount.mount_point}"
        )
    return ""
