"""The kernel's mount table: which mount, file system and device a path is on.

Read from ``/proc/self/mountinfo`` (proc(5)); used to decide whether two
paths share a volume (the retention volume rules of the master target, the
cache volume of the process server) and what file system a directory is on.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from runtime.errors import MountTableError

StrPath = str | os.PathLike[str]

#: The kernel's mount table of the calling process (proc(5)).
MOUNTINFO_PATH: Final = "/proc/self/mountinfo"
#: sysfs links from ``MAJOR:MINOR`` to each block device, used to find the
#: whole disk that a partition belongs to.
SYS_DEV_BLOCK: Final = "/sys/dev/block"
#: Largest mount table read. A host with 10,000 mounts (many containers) has a
#: table of about 2 MiB; a larger one is refused instead of filling memory.
MAX_MOUNTINFO_BYTES: Final = 16 * 1024 * 1024
#: FUSE mounts name the real file system after a dot (``fuseblk.exfat``).
FUSE_TYPES: Final = frozenset({"fuse", "fuseblk"})
#: A mountinfo line has six fields before the optional ones, then ``-`` and three.
_FIELDS_BEFORE_OPTIONAL: Final = 6
_FIELDS_AFTER_SEPARATOR: Final = 3
#: The kernel escapes space, tab, newline and backslash in names as ``\\ooo``.
_OCTAL_ESCAPE: Final = re.compile(rb"\\([0-3][0-7]{2})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo`` (proc(5)), with octal escapes decoded.

    Args:
        mount_id: unique id of the mount.
        parent_id: id of the parent mount.
        device: ``st_dev`` of the file system (``os.makedev(major, minor)``).
        root: the directory of the file system mounted here ("/" unless a bind mount).
        mount_point: where it is mounted, relative to the process's root.
        options: per-mount options (``rw``, ``ro``, ``nodev``...).
        fstype: file system type (``ext4``, ``vfat``, ``fuseblk.exfat``...).
        source: what is mounted (``/dev/sdb1``, ``tmpfs``...).
        super_options: per-file-system options.
    """

    mount_id: int
    parent_id: int
    device: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        """True when either the mount or the whole file system is read-only."""
        return "ro" in self.options or "ro" in self.super_options

    @property
    def base_fstype(self) -> str:
        """The file system type with a FUSE prefix removed (``fuseblk.exfat`` -> ``exfat``)."""
        main, _, sub = self.fstype.partition(".")
        return sub if main in FUSE_TYPES and sub else main


def parse_mountinfo(data: bytes, *, source: str = MOUNTINFO_PATH) -> tuple[MountEntry, ...]:
    """Parse the text of a mountinfo file into its entries, in table order.

    Args:
        data: the file's bytes (names may be any bytes but ``/`` and NUL;
            they are decoded as the file system encoding does).
        source: the file's name, for messages.

    Raises:
        MountTableError: a line is not a mountinfo line (the message names
            the line number).
    """
    entries = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line:
            entries.append(_parse_mountinfo_line(line, f"{source} line {number}"))
    return tuple(entries)


def _parse_mountinfo_line(line: bytes, where: str) -> MountEntry:
    """One mountinfo line; ``where`` names it in messages."""
    # proc(5): ID PARENT MAJOR:MINOR ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
    # Names never hold a space (the kernel writes \040), so one space splits
    # fields; an empty source (mount -t tmpfs "" DIR) stays an empty field.
    fields = line.split(b" ")
    try:
        separator = fields.index(b"-", _FIELDS_BEFORE_OPTIONAL)
    except ValueError:
        raise MountTableError(
            f"{where}: expected a '-' after the optional fields, found none"
        ) from None
    # Fields past the third after '-' are tolerated: the optional fields show
    # that the format grows, and none of the ones read here would move.
    if len(fields) - separator - 1 < _FIELDS_AFTER_SEPARATOR:
        found = len(fields) - separator - 1
        raise MountTableError(f"{where}: expected 3 fields after '-', found {found}")
    major, colon, minor = fields[2].partition(b":")
    if not (fields[0].isdigit() and fields[1].isdigit() and colon):
        raise MountTableError(f"{where}: expected 'ID PARENT MAJOR:MINOR', found {line[:80]!r}")
    if not (major.isdigit() and minor.isdigit()):
        raise MountTableError(f"{where}: expected MAJOR:MINOR in decimal, found {fields[2]!r}")
    return MountEntry(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        device=os.makedev(int(major), int(minor)),
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        options=tuple(_unescape(fields[5]).split(",")),
        fstype=_unescape(fields[separator + 1]),
        source=_unescape(fields[separator + 2]),
        super_options=tuple(_unescape(fields[separator + 3]).split(",")),
    )


def _unescape(field: bytes) -> str:
    r"""A mountinfo field with ``\ooo`` octal escapes decoded, as a file system string."""
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda match: bytes([int(match[1], 8)]), field))


def read_mount_table(path: StrPath = MOUNTINFO_PATH) -> tuple[MountEntry, ...]:
    """Read and parse a mountinfo file.

    Raises:
        MountTableError: the file cannot be read, is larger than
            :data:`MAX_MOUNTINFO_BYTES`, or is malformed.
    """
    name = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_MOUNTINFO_BYTES + 1)
    except OSError as exc:
        raise MountTableError(f"cannot read mount table {name}: {exc.strerror or exc}") from exc
    if len(data) > MAX_MOUNTINFO_BYTES:
        raise MountTableError(
            f"mount table {name}: expected at most {MAX_MOUNTINFO_BYTES} bytes, found more"
        )
    return parse_mountinfo(data, source=name)


def find_mount(table: Sequence[MountEntry], path: str) -> MountEntry:
    """The mount a resolved absolute ``path`` is on.

    That is the entry whose mount point is the longest prefix of ``path``,
    compared by whole components (``/mnt/ret`` is no prefix of
    ``/mnt/retention``). Of entries with the same mount point, the last in the
    table is the one on top. (A mount hidden because a mount point above it
    was mounted over later is not detected: the table alone cannot say.)

    Raises:
        MountTableError: no entry contains ``path``.
    """
    best: MountEntry | None = None
    for entry in table:
        point = entry.mount_point
        inside = point in ("/", path) or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = entry
    if best is None:
        raise MountTableError(
            f"no mount in the mount table contains {path} (expected at least '/')"
        )
    return best


def whole_disk(device: int, *, sys_dev_block: StrPath = SYS_DEV_BLOCK) -> int:
    """The whole disk a partition belongs to, or ``device`` itself.

    sysfs links ``/sys/dev/block/MAJOR:MINOR`` to the device's directory; a
    partition's directory has a ``partition`` file and sits inside its disk's
    directory, whose ``dev`` file holds the disk's ``MAJOR:MINOR``. Without
    sysfs (or for a device that is not a block device), ``device`` is returned.
    """
    link = Path(sys_dev_block) / dev_name(device)
    try:
        directory = link.resolve(strict=True)
        if not (directory / "partition").is_file():
            return device
        major, _, minor = (directory.parent / "dev").read_text().strip().partition(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return device


def dev_name(device: int) -> str:
    """A device number as ``MAJOR:MINOR``."""
    return f"{os.major(device)}:{os.minor(device)}"
