"""The agent's configuration: one frozen object loaded from TOML.

See ``systemd/agent.toml`` for a commented example and docs/operations.md,
"The agent", for what each setting is for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final

from protocol.errors import MalformedError
from protocol.limits import MAX_BATCH_PAYLOAD, MAX_WRITE_BYTES, GiB, KiB, MiB, check_id
from runtime.config import (
    MAX_TIMEOUT_S,
    FieldValueError,
    LoggingConfig,
    MetricsListen,
    TlsFiles,
    check_https_url,
    check_seconds,
    load_config,
)

#: The agent's metrics listener (docs/design.md).
DEFAULT_METRICS_PORT: Final = 9103
#: Where the agent keeps each disk's stream position, journal and sync progress.
DEFAULT_STATE_DIR: Final = Path("/var/lib/blockrepl/agent")

#: The sync's leaf chunk: the unit it compares and sends. 64 KiB is the
#: common write size of file systems and databases, so a scattered change
#: costs little more than itself, and a 1 TiB disk is 16 Mi chunks.
DEFAULT_CHUNK_BYTES: Final = 64 * KiB
#: The master target hashes chunks of 4 KiB .. 1 GiB (docs/api.md); a leaf
#: is also sent whole as one WRITE, so it may not pass the WRITE limit.
MIN_CHUNK_BYTES: Final = 4 * KiB
MAX_CHUNK_BYTES: Final = MAX_WRITE_BYTES
#: The sync's top-level region: one digest stands for this many bytes until
#: it differs. 64 MiB makes a 1 TiB disk 16 Ki digests (256 KiB of answer)
#: and a differing region 1 Ki leaf digests (16 KiB).
DEFAULT_REGION_BYTES: Final = 64 * MiB
MAX_REGION_BYTES: Final = GiB
#: The master target answers at most 2**20 digests per request (docs/api.md).
MAX_CHUNKS_PER_REGION: Final = 2**20
#: The payload a sync batch is filled to: large batches mean few HRL files
#: and fsyncs downstream; 16 MiB is half the batch limit, so two merged
#: batches still fit one HRL file, and four in flight stay under 64 MiB.
DEFAULT_BATCH_BYTES: Final = 16 * MiB
#: Room a batch keeps for its record table below the payload limit.
TABLE_RESERVE_BYTES: Final = 2 * MiB
#: Seconds without a byte from a process server before the exchange counts
#: as failed: a 32 MiB batch over a slow WAN link, or a hash answer for a
#: large region that the master target is still reading.
DEFAULT_REQUEST_TIMEOUT_S: Final = 120.0
#: Requests of one disk's stream in flight at once: the next streams while
#: the process server makes the one before durable, so a link with a round
#: trip of its own is not idle between them; more would only wait at the
#: process server, which places a disk's batches one request at a time.
DEFAULT_IN_FLIGHT_PER_DISK: Final = 2
#: The most a config may ask for: each open request holds a connection.
MAX_IN_FLIGHT_PER_DISK: Final = 8
#: Seconds to set up a TLS connection to a process server.
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
#: Seconds without progress (no acknowledgement, no answer) on any process
#: server after which a command gives up with an error.
DEFAULT_GIVE_UP_AFTER_S: Final = 600.0

#: Journal bytes live capture keeps for batches not yet at the master target,
#: beyond which writes are only marked dirty and resynced later. 2 GiB hold
#: about 2 minutes of a server writing 16 MiB/s while a process server
#: restarts or a link drops; a longer outage costs a resync of the regions
#: written meanwhile, never lost data.
DEFAULT_CAPTURE_JOURNAL_BYTES: Final = 2 * GiB
#: The least that works: four of the largest records. A resync batch is
#: appended only below half of the bound and holds at most one of them, so
#: a resync alone never fills the journal and live writes keep room.
MIN_CAPTURE_JOURNAL_BYTES: Final = 4 * MAX_WRITE_BYTES
#: Seconds nbdkit may take to start and listen: it loads Python and the plugin.
DEFAULT_NBDKIT_START_TIMEOUT_S: Final = 30.0
#: The longest a tag round may hold a disk's writes if its coordinator goes
#: silent: writes wait while held, so a dead coordinator must not stall the
#: machine for more than a few seconds.
DEFAULT_HOLD_MAX_S: Final = 10.0

#: Tags: crash-consistent every 5 minutes and app-consistent every 60 (the
#: failback policy of the seeds; docs/design.md), writes held at most 5 s for a
#: round, applications frozen at most 10 s (as VSS allows a writer).
DEFAULT_CRASH_INTERVAL_S: Final = 300.0
DEFAULT_APP_INTERVAL_S: Final = 3600.0
DEFAULT_ROUND_TIMEOUT_S: Final = 5.0
DEFAULT_FREEZE_MAX_S: Final = 10.0
#: The shortest interval between tags: a second, as docs/design.md asks ("aim for seconds").
MIN_TAG_INTERVAL_S: Final = 1.0

#: The longest a group round holds writes on any member: every write of
#: every member waits meanwhile, so it is kept to a blink that an
#: application sees as one slow I/O, far below any I/O timeout (SCSI's 30 s,
#: a database's seconds). A round that cannot hold and tag every disk of
#: every member within it aborts and resumes.
DEFAULT_BARRIER_MAX_S: Final = 0.5
#: The longest a group may choose: beyond a few seconds a held write starts
#: to look like a hung disk to applications.
MAX_BARRIER_S: Final = 5.0
#: Seconds to reach every member (TCP and TLS) before a round; writes are not
#: held meanwhile, so this is for an unreachable member, not a slow one.
DEFAULT_GROUP_CONNECT_TIMEOUT_S: Final = 5.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentDisk:
    """A disk of this machine that is replicated.

    Args:
        id: the disk id the process server and master target know it by.
        source: the block device or image file to read (a command's
            ``--source`` takes precedence).
    """

    id: str
    source: Path | None = None

    def __post_init__(self) -> None:
        try:
            check_id("disk", self.id)
        except MalformedError as exc:
            raise FieldValueError("id", exc.message) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyncSettings:
    """How ``agent sync`` compares and sends (docs/protocol.md, "Sync by comparison").

    Args:
        chunk_bytes: the leaf chunk, compared and sent whole; a power of two.
        region_bytes: the top-level region; a multiple of ``chunk_bytes``.
        batch_bytes: the payload each batch is filled to.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    region_bytes: int = DEFAULT_REGION_BYTES
    batch_bytes: int = DEFAULT_BATCH_BYTES

    def __post_init__(self) -> None:
        chunk, region = self.chunk_bytes, self.region_bytes
        if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES or chunk & (chunk - 1):
            raise FieldValueError(
                "chunk_bytes",
                f"expected a power of two from {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES}, "
                f"found {chunk}",
            )
        if not chunk <= region <= MAX_REGION_BYTES or region % chunk:
            raise FieldValueError(
                "region_bytes",
                f"expected a multiple of chunk_bytes ({chunk}) up to {MAX_REGION_BYTES}, "
                f"found {region}",
            )
        if region // chunk > MAX_CHUNKS_PER_REGION:
            raise FieldValueError(
                "region_bytes",
                f"expected at most {MAX_CHUNKS_PER_REGION} chunks per region, found "
                f"{region // chunk}",
            )
        most = MAX_BATCH_PAYLOAD - TABLE_RESERVE_BYTES
        if not chunk <= self.batch_bytes <= most:
            raise FieldValueError(
                "batch_bytes",
                f"expected chunk_bytes ({chunk}) .. {most}, found {self.batch_bytes}",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptureSettings:
    """How ``agent capture`` runs (docs/operations.md, "Live capture").

    Args:
        journal_max_bytes: journal bytes above which writes are only marked
            dirty (and resynced once the journal drained to half of it).
        nbdkit: the nbdkit program (default: ``nbdkit`` on the PATH).
        start_timeout_s: how long nbdkit may take to listen.
        hold_max_s: the longest a tag round may hold this disk's writes.
    """

    journal_max_bytes: int = DEFAULT_CAPTURE_JOURNAL_BYTES
    nbdkit: Path | None = None
    start_timeout_s: float = DEFAULT_NBDKIT_START_TIMEOUT_S
    hold_max_s: float = DEFAULT_HOLD_MAX_S

    def __post_init__(self) -> None:
        if self.journal_max_bytes < MIN_CAPTURE_JOURNAL_BYTES:
            raise FieldValueError(
                "journal_max_bytes",
                f"expected at least {MIN_CAPTURE_JOURNAL_BYTES}, found {self.journal_max_bytes}",
            )
        check_seconds("start_timeout_s", self.start_timeout_s)
        check_seconds("hold_max_s", self.hold_max_s)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TagSettings:
    """Consistency tags across the disks of this machine (docs/operations.md, "Tags").

    Args:
        crash_interval_s: seconds between crash-consistent tags (0: none).
        app_interval_s: seconds between app-consistent tags (0: none).
        quiesce: commands that freeze the applications before an
            app-consistent tag (``"fsfreeze -f /data"``), run in order, no shell.
        unquiesce: commands that thaw them, run after the tag, in order,
            whatever happened.
        freeze_max_s: the longest applications stay frozen: quiesce and the
            round must be done by then, or the tag is abandoned.
        round_timeout_s: the longest writes are held on every disk for a tag.
        disks: the disks tagged together (default: every disk of the config).
    """

    crash_interval_s: float = DEFAULT_CRASH_INTERVAL_S
    app_interval_s: float = DEFAULT_APP_INTERVAL_S
    quiesce: tuple[str, ...] = ()
    unquiesce: tuple[str, ...] = ()
    freeze_max_s: float = DEFAULT_FREEZE_MAX_S
    round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S
    disks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_intervals(self, ("crash_interval_s", "app_interval_s"))
        check_seconds("freeze_max_s", self.freeze_max_s)
        check_seconds("round_timeout_s", self.round_timeout_s)
        if self.round_timeout_s >= self.freeze_max_s:
            raise FieldValueError(
                "round_timeout_s",
                f"expected less than freeze_max_s ({self.freeze_max_s:g}), found "
                f"{self.round_timeout_s:g}: the round happens while applications are frozen",
            )
        for name in ("quiesce", "unquiesce"):
            for command in getattr(self, name):
                if not command.strip():
                    raise FieldValueError(name, "expected command lines, found an empty one")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupMember:
    """One machine of a consistency group.

    Args:
        machine: its machine id: the CN of its group certificate.
        address: ``HOST:PORT`` where its agent listens for the coordinator
            (``[ADDRESS]:PORT`` for IPv6). The port is always written out;
            the seeds' group port is 20004 (docs/groups.md).
    """

    machine: str
    address: str

    def __post_init__(self) -> None:
        try:
            check_id("machine", self.machine)
        except MalformedError as exc:
            raise FieldValueError("machine", exc.message) from None
        parse_address("address", self.address)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupSettings:
    """This machine's consistency group (docs/groups.md); the same members
    table on every member.

    Args:
        id: the group id, as the master target's ``[[groups]]`` names it.
        machine: this machine's id among the members.
        coordinator: the member that runs the rounds.
        members: every machine of the group, this one included.
        tls: the CA, this machine's group certificate (``blockrepl certs
            issue --group``) and key.
        listen: ``HOST:PORT`` a member listens on for the coordinator
            (default: its own address in ``members``).
        crash_interval_s, app_interval_s: seconds between the coordinator's
            crash- and app-consistent group rounds (0: none).
        barrier_max_s: the longest writes are held on any member in a round.
        connect_timeout_s: the longest the coordinator waits to reach each
            member before a round.
    """

    id: str
    machine: str
    coordinator: str
    members: tuple[GroupMember, ...]
    tls: TlsFiles
    listen: str = ""
    crash_interval_s: float = DEFAULT_CRASH_INTERVAL_S
    app_interval_s: float = DEFAULT_APP_INTERVAL_S
    barrier_max_s: float = DEFAULT_BARRIER_MAX_S
    connect_timeout_s: float = DEFAULT_GROUP_CONNECT_TIMEOUT_S

    def __post_init__(self) -> None:
        try:
            check_id("group", self.id)
        except MalformedError as exc:
            raise FieldValueError("id", exc.message) from None
        machines = [member.machine for member in self.members]
        if len(set(machines)) != len(machines):
            twice = next(m for m in machines if machines.count(m) > 1)
            raise FieldValueError("members", f"expected each machine once, found {twice!r} twice")
        for name in ("machine", "coordinator"):
            if getattr(self, name) not in machines:
                raise FieldValueError(
                    name,
                    f"expected one of the members ({', '.join(machines) or 'none'}), found "
                    f"{getattr(self, name)!r}",
                )
        if self.listen:
            parse_address("listen", self.listen)
        _check_intervals(self, ("crash_interval_s", "app_interval_s"))
        check_seconds("barrier_max_s", self.barrier_max_s, most=MAX_BARRIER_S)
        check_seconds("connect_timeout_s", self.connect_timeout_s)

    @property
    def is_coordinator(self) -> bool:
        return self.machine == self.coordinator

    @property
    def remote_members(self) -> tuple[GroupMember, ...]:
        """The members other than this machine."""
        return tuple(m for m in self.members if m.machine != self.machine)

    @property
    def listen_address(self) -> tuple[str, int]:
        """Where this member listens: ``listen``, or its own member address."""
        own = next(m for m in self.members if m.machine == self.machine)
        return parse_address("listen", self.listen or own.address)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything the agent's commands need.

    Args:
        process_servers: ``https://HOST:PORT`` of each process server, in the
            order they are tried; the agent moves to the next when one fails.
        tls: the CA and this machine's certificate
            (``blockrepl certs issue --machine M``) and key.
        disks: this machine's replicated disks.
        state_dir: stream positions, journals and sync progress (keep it on
            a volume that survives reboots; back it up with the machine).
    """

    process_servers: tuple[str, ...]
    tls: TlsFiles
    disks: tuple[AgentDisk, ...]
    state_dir: Path = DEFAULT_STATE_DIR
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    give_up_after_s: float = DEFAULT_GIVE_UP_AFTER_S
    in_flight_per_disk: int = DEFAULT_IN_FLIGHT_PER_DISK
    sync: SyncSettings = dataclasses.field(default_factory=SyncSettings)
    capture: CaptureSettings = dataclasses.field(default_factory=CaptureSettings)
    tags: TagSettings = dataclasses.field(default_factory=TagSettings)
    group: GroupSettings | None = None
    metrics: MetricsListen = dataclasses.field(
        default_factory=lambda: MetricsListen(port=DEFAULT_METRICS_PORT)
    )
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not self.process_servers:
            raise FieldValueError("process_servers", "expected at least one URL, found none")
        for url in self.process_servers:
            check_https_url("process_servers", url)
        if len(set(self.process_servers)) != len(self.process_servers):
            raise FieldValueError("process_servers", "expected each URL once, found one twice")
        ids = [disk.id for disk in self.disks]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise FieldValueError("disks", f"expected each disk id once, found {twice!r} twice")
        for name in ("request_timeout_s", "connect_timeout_s", "give_up_after_s"):
            check_seconds(name, getattr(self, name), most=None)
        if not 1 <= self.in_flight_per_disk <= MAX_IN_FLIGHT_PER_DISK:
            raise FieldValueError(
                "in_flight_per_disk",
                f"expected 1..{MAX_IN_FLIGHT_PER_DISK}, found {self.in_flight_per_disk}",
            )
        unknown = [disk for disk in self.tags.disks if disk not in ids]
        if unknown:
            raise FieldValueError(
                "tags", f"disks: expected ids of [[disks]] ({', '.join(ids)}), found {unknown[0]!r}"
            )

    @property
    def tagged_disks(self) -> tuple[str, ...]:
        """The disks a tag round covers."""
        return self.tags.disks or tuple(disk.id for disk in self.disks)

    def disk(self, disk_id: str) -> AgentDisk | None:
        """The configured disk ``disk_id``, or None."""
        return next((disk for disk in self.disks if disk.id == disk_id), None)


def _check_intervals(settings: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(settings, name)
        if value != 0 and not MIN_TAG_INTERVAL_S <= value <= MAX_TIMEOUT_S:
            raise FieldValueError(
                name,
                f"expected 0 (no tags) or {MIN_TAG_INTERVAL_S:g}..{MAX_TIMEOUT_S:g} seconds, "
                f"found {value}",
            )


def parse_address(name: str, text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[ADDRESS]:PORT`` for IPv6) as host and port.

    Raises:
        FieldValueError: naming ``name``, when it is not that.
    """
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535 or " " in host:
        raise FieldValueError(name, f"expected HOST:PORT with a port 1..65535, found {text!r}")
    return host, int(port)


def load(path: str | Path) -> AgentConfig:
    """Load and check an agent config file.

    Raises:
        ConfigError: naming the file and the key at fault.
    """
    return load_config(AgentConfig, path)
