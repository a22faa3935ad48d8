"""The agent's configuration: one frozen object loaded from TOML.

See ``systemd/agent.toml`` for a commented example and docs/operations.md,
"The agent", for what each setting is for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from protocol.errors import MalformedError
from protocol.limits import MAX_BATCH_PAYLOAD, MAX_WRITE_BYTES, GiB, KiB, MiB, check_id
from runtime.config import FieldValueError, LoggingConfig, MetricsListen, TlsFiles, load_config

#: The agent's metrics listener (DESIGN.md).
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
#: Seconds to set up a TLS connection to a process server.
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
#: Seconds without progress (no acknowledgement, no answer) on any process
#: server after which a command gives up with an error.
DEFAULT_GIVE_UP_AFTER_S: Final = 600.0


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
    sync: SyncSettings = dataclasses.field(default_factory=SyncSettings)
    metrics: MetricsListen = dataclasses.field(
        default_factory=lambda: MetricsListen(port=DEFAULT_METRICS_PORT)
    )
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not self.process_servers:
            raise FieldValueError("process_servers", "expected at least one URL, found none")
        for url in self.process_servers:
            _check_url(url)
        if len(set(self.process_servers)) != len(self.process_servers):
            raise FieldValueError("process_servers", "expected each URL once, found one twice")
        ids = [disk.id for disk in self.disks]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise FieldValueError("disks", f"expected each disk id once, found {twice!r} twice")
        for name in ("request_timeout_s", "connect_timeout_s", "give_up_after_s"):
            value = getattr(self, name)
            if not value > 0:
                raise FieldValueError(name, f"expected a number of seconds above 0, found {value}")

    def disk(self, disk_id: str) -> AgentDisk | None:
        """The configured disk ``disk_id``, or None."""
        return next((disk for disk in self.disks if disk.id == disk_id), None)


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    shape = f"expected https://HOST[:PORT] with nothing after it, found {url!r}"
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise FieldValueError("process_servers", shape)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise FieldValueError("process_servers", shape)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise FieldValueError("process_servers", f"expected a port 1..65535 in {url!r}")


def load(path: str | Path) -> AgentConfig:
    """Load and check an agent config file.

    Raises:
        ConfigError: naming the file and the key at fault.
    """
    return load_config(AgentConfig, path)
