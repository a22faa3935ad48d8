"""The process server's configuration: one frozen object loaded from TOML.

See ``systemd/processserver.toml`` for a commented example.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final

from protocol.compression import DEFAULT_ZSTD_LEVEL, MAX_ZSTD_LEVEL
from protocol.errors import MalformedError
from protocol.limits import MAX_BATCH_PAYLOAD, check_id
from runtime.config import (
    ConnectionTimeouts,
    FieldValueError,
    LoggingConfig,
    MetricsListen,
    TlsFiles,
    check_https_url,
    check_seconds,
    load_config,
)

#: The data port agents send to (docs/design.md, as in the seeds).
DEFAULT_PORT: Final = 9443
#: The metrics listener of the process server (docs/design.md).
DEFAULT_METRICS_PORT: Final = 9101
#: Where HRL files wait to be shipped: the process server's cache volume.
DEFAULT_CACHE_DIR: Final = Path("/var/cache/blockrepl/processserver")
#: Cache bytes above which new batches get 503 + Retry-After, and below
#: which they are taken again: hysteresis, so a cache at the edge does not
#: flap between the two at every file shipped.
DEFAULT_CACHE_HIGH_BYTES: Final = 64 * 2**30
DEFAULT_CACHE_LOW_BYTES: Final = 56 * 2**30
#: Transfers to the master target at once, over all disks: enough to fill a
#: WAN link with round trips in flight, few enough to bound memory (each is
#: read whole: a run of files up to 16 MiB, or one file up to 64 MiB).
DEFAULT_MAX_IN_FLIGHT: Final = 8
#: Transfers of one disk at once (each within max_in_flight): the next run of
#: the disk's files is on its way while the master target stores the one
#: before, so a link with a round trip of its own is not idle between them.
DEFAULT_IN_FLIGHT_PER_DISK: Final = 2
#: The most a config may ask for: each transfer holds a connection and its run in memory.
MAX_IN_FLIGHT_PER_DISK: Final = 8
#: Seconds to open a connection to the master target: a LAN or WAN handshake
#: takes well under a second; ten covers a congested link.
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
#: Seconds a transfer may go without a byte from the master target: it
#: answers a PUT as soon as the file is durable, so a minute of silence is a
#: dead or black-holed link, not a slow disk.
DEFAULT_READ_TIMEOUT_S: Final = 60.0
#: Seconds one transfer may take in all: a 64 MiB file on a 2 Mbit/s WAN link.
DEFAULT_TRANSFER_TIMEOUT_S: Final = 300.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MachineConfig:
    """A protected machine: the id its client certificate names, and its disks."""

    id: str
    disks: tuple[str, ...]

    def __post_init__(self) -> None:
        try:
            check_id("machine", self.id)
            for disk in self.disks:
                check_id("disk", disk)
        except MalformedError as exc:
            raise FieldValueError("machines", exc.message) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MasterTargetLink:
    """Where HRL files go, and who the process server is there.

    Args:
        url: ``https://HOST:9444`` of the master target.
        tls: the CA, and this process server's own client certificate
            (``blockrepl certs issue --machine ps01``) and key.
        connect_timeout_s: a connection not made in this time is a failed
            transfer (retried with back-off).
        read_timeout_s: once a file is sent, an answer that does not come
            in this time is a failed transfer: a link that went silent is
            given up on, not waited on for the whole transfer.
        transfer_timeout_s: the longest one transfer may take in all, also
            when the link stalls while the file is being sent.
    """

    url: str
    tls: TlsFiles
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S

    def __post_init__(self) -> None:
        check_https_url("url", self.url)
        check_seconds("connect_timeout_s", self.connect_timeout_s)
        check_seconds("read_timeout_s", self.read_timeout_s)
        check_seconds("transfer_timeout_s", self.transfer_timeout_s)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessServerConfig:
    """Everything ``processserver serve`` needs."""

    tls: TlsFiles
    key_file: Path
    machines: tuple[MachineConfig, ...]
    master_target: MasterTargetLink
    host: str = "0.0.0.0"  # noqa: S104 - the data port serves the protected machines
    port: int = DEFAULT_PORT
    metrics: MetricsListen = dataclasses.field(
        default_factory=lambda: MetricsListen(port=DEFAULT_METRICS_PORT)
    )
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    connections: ConnectionTimeouts = dataclasses.field(default_factory=ConnectionTimeouts)
    cache_dir: Path = DEFAULT_CACHE_DIR
    cache_high_bytes: int = DEFAULT_CACHE_HIGH_BYTES
    cache_low_bytes: int = DEFAULT_CACHE_LOW_BYTES
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    in_flight_per_disk: int = DEFAULT_IN_FLIGHT_PER_DISK

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise FieldValueError("port", f"expected 1..65535, found {self.port}")
        if not 1 <= self.zstd_level <= MAX_ZSTD_LEVEL:
            raise FieldValueError(
                "zstd_level", f"expected 1..{MAX_ZSTD_LEVEL}, found {self.zstd_level}"
            )
        if not MAX_BATCH_PAYLOAD <= self.cache_low_bytes < self.cache_high_bytes:
            raise FieldValueError(
                "cache_low_bytes",
                f"expected {MAX_BATCH_PAYLOAD} <= cache_low_bytes < cache_high_bytes, found "
                f"{self.cache_low_bytes} and {self.cache_high_bytes}",
            )
        if self.max_in_flight < 1:
            raise FieldValueError("max_in_flight", f"expected >= 1, found {self.max_in_flight}")
        if not 1 <= self.in_flight_per_disk <= MAX_IN_FLIGHT_PER_DISK:
            raise FieldValueError(
                "in_flight_per_disk",
                f"expected 1..{MAX_IN_FLIGHT_PER_DISK}, found {self.in_flight_per_disk}",
            )
        owners: dict[str, str] = {}
        for machine in self.machines:
            for disk in machine.disks:
                if disk in owners:
                    raise FieldValueError(
                        "machines",
                        f"expected each disk under one machine, found {disk!r} under "
                        f"{owners[disk]!r} and {machine.id!r}",
                    )
                owners[disk] = machine.id

    def owner(self, disk_id: str) -> str | None:
        """The machine that may write ``disk_id``, or None if no machine may."""
        return next((m.id for m in self.machines if disk_id in m.disks), None)

    def owners(self) -> dict[str, str]:
        """The machine that may write each disk, by disk id."""
        return {disk: m.id for m in self.machines for disk in m.disks}


def load(path: str | Path) -> ProcessServerConfig:
    """Load and check a process server config file.

    Raises:
        ConfigError: naming the file and the key at fault.
    """
    return load_config(ProcessServerConfig, path)
