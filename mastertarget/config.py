"""The master target's configuration: one frozen object loaded from TOML.

See ``systemd/mastertarget.toml`` for a commented example and
docs/operations.md for what each key means to an operator.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final, Literal

from protocol import limits
from protocol.errors import MalformedError
from protocol.limits import check_id
from runtime.config import (
    ConnectionTimeouts,
    FieldValueError,
    LoggingConfig,
    MetricsListen,
    TlsFiles,
    check_seconds,
    load_config,
)

#: The data port of the master target (docs/design.md).
DEFAULT_PORT: Final = 9444
#: The metrics listener of the master target (docs/design.md).
DEFAULT_METRICS_PORT: Final = 9102
#: Where the retention journal, the recovery-point catalog and the applied
#: markers live on Linux (the failback policy of the seeds).
DEFAULT_RETENTION_DIR: Final = Path("/mnt/retention")
#: The master target's cache volume: received HRL files wait in ``inbox/`` to
#: be applied, files that failed verification go to ``quarantine/``. It must
#: not be the retention volume.
DEFAULT_CACHE_DIR: Final = Path("/var/cache/blockrepl/mastertarget")
#: The admin API's Unix socket (points, recover, failover): local only.
DEFAULT_ADMIN_SOCKET: Final = Path("/run/blockrepl/mastertarget.sock")
#: How long recovery points are kept: 24 hours (the failback policy of the seeds).
DEFAULT_WINDOW_S: Final = 24 * 3600.0
#: The RPO above which a disk is alerted on: 15 minutes (the seeds' policy).
DEFAULT_RPO_THRESHOLD_S: Final = 15 * 60.0
#: Retention volume usage above which history goes early: room left for the
#: undo of the files still in the inbox.
DEFAULT_HIGH_WATER_PERCENT: Final = 90.0
#: The largest HRL file a PUT may carry. It follows from the format, not from
#: the config, and lives in protocol/limits.py; named here as well for the
#: importers that still take it from this module.
MAX_HRL_FILE_BYTES: Final = limits.MAX_HRL_FILE_BYTES
#: Inbox bytes per disk above which PUTs get 503 + Retry-After: the applier is
#: behind (a slow or failing target); holding more only delays the alert.
DEFAULT_INBOX_QUOTA_BYTES: Final = 8 * 2**30
#: Sector size: every target size is a whole number of sectors.
SECTOR_BYTES: Final = 512

DiskFormat = Literal["raw", "vmdk"]
VmdkSubformat = Literal["monolithicSparse", "monolithicFlat"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ListenConfig:
    """The data listener (mutual TLS 1.3)."""

    host: str = "0.0.0.0"  # noqa: S104 - the data port serves the process servers
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise FieldValueError("port", f"expected 1..65535, found {self.port}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiskConfig:
    """One target disk and the replicated disk it receives.

    Args:
        id: the disk id the process server ships for (``[A-Za-z0-9._-]{1,64}``).
        target: the raw image, block device or VMDK to write.
        format: ``raw`` (image file or block device) or ``vmdk``.
        create: create the target at start if it does not exist (failback to
            a new VM); needs ``size_bytes``.
        size_bytes: the virtual size of a created target.
        vmdk_subformat: the layout of a created VMDK.
    """

    id: str
    target: Path
    format: DiskFormat = "raw"
    create: bool = False
    size_bytes: int | None = None
    vmdk_subformat: VmdkSubformat = "monolithicSparse"

    def __post_init__(self) -> None:
        try:
            check_id("disk", self.id)
        except MalformedError as exc:
            raise FieldValueError("id", exc.message) from None
        if self.create and self.size_bytes is None:
            raise FieldValueError("size_bytes", "expected a size when create = true, found none")
        if self.size_bytes is not None and (self.size_bytes <= 0 or self.size_bytes % SECTOR_BYTES):
            raise FieldValueError(
                "size_bytes",
                f"expected a positive multiple of {SECTOR_BYTES}, found {self.size_bytes}",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """A consistency group: disks of several machines that fail over to one moment.

    The agents of the group put GROUP tags with one tag id on each of these
    disks in a round (docs/groups.md); a group point is listed once every
    disk has applied it.

    Args:
        id: the group id the agents tag with (``[A-Za-z0-9._-]{1,64}``).
        disks: every disk of every member machine; each must be a disk of
            this master target.
    """

    id: str
    disks: tuple[str, ...]

    def __post_init__(self) -> None:
        try:
            check_id("group", self.id)
        except MalformedError as exc:
            raise FieldValueError("id", exc.message) from None
        if not self.disks:
            raise FieldValueError(
                "disks", "expected the disk ids of the group's members, found none"
            )
        twice = sorted({disk for disk in self.disks if self.disks.count(disk) > 1})
        if twice:
            raise FieldValueError("disks", f"expected each disk once, found {twice[0]!r} twice")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    """The retention volume.

    Args:
        dir: the retention directory (applied markers, journal, catalog).
        allow_shared_volume: accept a retention directory on the same volume
            as the inbox or the installation. Only for a demo or a test on one
            disk: a full inbox then eats the retention history.
        window_s: how long recovery points are kept.
        high_water_percent: retention volume usage above which the oldest
            history goes early.
    """

    dir: Path = DEFAULT_RETENTION_DIR
    allow_shared_volume: bool = False
    window_s: float = DEFAULT_WINDOW_S
    high_water_percent: float = DEFAULT_HIGH_WATER_PERCENT

    def __post_init__(self) -> None:
        check_seconds("window_s", self.window_s, most=None)
        if not 1 <= self.high_water_percent <= 99:
            raise FieldValueError(
                "high_water_percent", f"expected 1..99, found {self.high_water_percent}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MasterTargetConfig:
    """Everything ``mastertarget serve`` needs."""

    tls: TlsFiles
    key_file: Path
    process_servers: tuple[str, ...]
    disks: tuple[DiskConfig, ...]
    groups: tuple[GroupConfig, ...] = ()
    listen: ListenConfig = dataclasses.field(default_factory=ListenConfig)
    metrics: MetricsListen = dataclasses.field(
        default_factory=lambda: MetricsListen(port=DEFAULT_METRICS_PORT)
    )
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    connections: ConnectionTimeouts = dataclasses.field(default_factory=ConnectionTimeouts)
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
    cache_dir: Path = DEFAULT_CACHE_DIR
    inbox_quota_bytes: int = DEFAULT_INBOX_QUOTA_BYTES
    rpo_threshold_s: float = DEFAULT_RPO_THRESHOLD_S
    admin_socket: Path = DEFAULT_ADMIN_SOCKET

    def __post_init__(self) -> None:
        check_seconds("rpo_threshold_s", self.rpo_threshold_s, most=None)
        for identity in self.process_servers:
            try:
                check_id("machine", identity)
            except MalformedError as exc:
                raise FieldValueError("process_servers", exc.message) from None
        if not self.process_servers:
            raise FieldValueError(
                "process_servers",
                "expected the machine ids of the process servers allowed to push, found none",
            )
        seen: set[str] = set()
        for disk in self.disks:
            if disk.id in seen:
                raise FieldValueError("disks", f"expected unique disk ids, found {disk.id!r} twice")
            seen.add(disk.id)
        targets = [d.target for d in self.disks]
        if len(set(targets)) != len(targets):
            raise FieldValueError("disks", "expected one disk per target, found a target twice")
        self._check_groups()
        if self.inbox_quota_bytes < MAX_HRL_FILE_BYTES:
            raise FieldValueError(
                "inbox_quota_bytes",
                f"expected at least one largest HRL file ({MAX_HRL_FILE_BYTES} bytes), "
                f"found {self.inbox_quota_bytes}",
            )

    def _check_groups(self) -> None:
        """Every member disk is protected here, in one group only.

        A common point needs every member's stream in one catalog: a member
        replicating to another master target can never be part of one (the
        seeds: "Replication groups should be protected back with the same
        master target"), so such a group is refused rather than never listing
        a point.
        """
        ids = {d.id for d in self.disks}
        owner: dict[str, str] = {}
        seen: set[str] = set()
        for group in self.groups:
            if group.id in seen:
                raise FieldValueError(
                    "groups", f"expected unique group ids, found {group.id!r} twice"
                )
            seen.add(group.id)
            for disk in group.disks:
                if disk not in ids:
                    raise FieldValueError(
                        "groups",
                        f"group {group.id}: disk {disk!r} is not protected by this master "
                        f"target (not in [[disks]]: {', '.join(sorted(ids)) or 'none'}); every "
                        "member of a group must replicate to the same master target, or no "
                        "common point in time can be found",
                    )
                if disk in owner:
                    raise FieldValueError(
                        "groups",
                        f"disk {disk!r} is in groups {owner[disk]} and {group.id}; a disk "
                        "belongs to one group at most",
                    )
                owner[disk] = group.id

    def disk(self, disk_id: str) -> DiskConfig | None:
        """The configuration of ``disk_id``, or None if it is not replicated here."""
        return next((d for d in self.disks if d.id == disk_id), None)

    def group(self, group_id: str) -> GroupConfig | None:
        """The configuration of group ``group_id``, or None."""
        return next((g for g in self.groups if g.id == group_id), None)


def load(path: str | Path) -> MasterTargetConfig:
    """Load and check a master target config file.

    Raises:
        ConfigError: naming the file and the key at fault.
    """
    return load_config(MasterTargetConfig, path)
