"""The vSphere config file of ``mastertarget vsphere ...`` and the password it leads to.

See ``systemd/vsphere.toml`` for a commented example. The password is never
in this file nor on a command line (both are readable by others: ``ps``,
shell history, backups of /etc): it comes from ``password_file`` (mode 0600)
or from the environment variable :data:`PASSWORD_ENV`, exactly one of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from mastertarget.errors import VsphereConfigError
from runtime.config import (
    MAX_PORT,
    MIN_PORT,
    FieldValueError,
    LoggingConfig,
    check_seconds,
    load_config,
)
from runtime.privatefile import read_private_file

#: The environment variable that may hold the vCenter password (for a
#: secret store that injects it); ``password_file`` is the other way.
PASSWORD_ENV: Final = "BLOCKREPL_VSPHERE_PASSWORD"  # noqa: S105 - a variable name
#: vCenter and ESXi serve their API over HTTPS on 443.
DEFAULT_PORT: Final = 443
#: A password file is one line; vCenter caps passwords far below this.
MAX_PASSWORD_FILE_BYTES: Final = 4096
#: Seconds to wait for vCenter to answer one request: a busy vCenter answers
#: a property read in well under a second; a minute means it is down.
DEFAULT_REQUEST_TIMEOUT_S: Final = 60.0
#: Seconds to wait for a task (reconfigure, create VM) to end. Adding disks
#: takes seconds; a vCenter queue behind backups can take minutes.
DEFAULT_TASK_TIMEOUT_S: Final = 600.0
#: Seconds to wait for an attached disk to appear inside this machine. The
#: guest sees a hot-added SCSI disk within a second or two after a rescan.
DEFAULT_DEVICE_WAIT_S: Final = 60.0
#: Where udev links disks by their SCSI identity (wwn-0x..., scsi-3...).
DEFAULT_DEVICE_DIR: Final = Path("/dev/disk/by-id")
#: The SCSI hosts of this machine; writing "- - -" to a host's ``scan`` makes
#: the kernel look for new disks on it.
DEFAULT_SCSI_HOST_DIR: Final = Path("/sys/class/scsi_host")
#: Block devices in sysfs: ``NAME/dev``, ``NAME/holders``, ``NAME/device/delete``.
DEFAULT_BLOCK_DIR: Final = Path("/sys/block")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GuestConfig:
    """Where this machine (the master target VM) shows its disks.

    Args:
        device_dir: the udev folder of links by disk identity.
        scsi_host_dir: the sysfs folder of SCSI hosts, rescanned after an attach.
        block_dir: the sysfs folder of block devices.
        device_wait_s: how long an attached disk may take to appear.
    """

    device_dir: Path = DEFAULT_DEVICE_DIR
    scsi_host_dir: Path = DEFAULT_SCSI_HOST_DIR
    block_dir: Path = DEFAULT_BLOCK_DIR
    device_wait_s: float = DEFAULT_DEVICE_WAIT_S

    def __post_init__(self) -> None:
        if not self.device_wait_s >= 0:
            raise FieldValueError(
                "device_wait_s", f"expected seconds >= 0, found {self.device_wait_s}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class VsphereConfig:
    """Everything ``mastertarget vsphere ...`` needs but the password.

    Args:
        host: the vCenter (or ESXi) name or address, as its certificate names it.
        port: its HTTPS port.
        user: the account, e.g. ``svc-blockrepl@vsphere.local``.
        password_file: a file holding the password (mode 0600), or none when
            the password comes from :data:`PASSWORD_ENV`.
        ca_file: the CA certificates that vCenter's certificate must chain to
            (vCenter's root CA, or an ESXi host's own certificate). There is
            no way to skip verification: it would hand the password to anyone
            on the path.
        master_target_vm: the name of this master target's VM in the inventory.
        datacenter: look only in this datacenter (names are unique per folder
            only); every datacenter when absent.
        request_timeout_s: how long one request to vCenter may take.
        task_timeout_s: how long a vCenter task may take.
    """

    host: str
    user: str
    ca_file: Path
    master_target_vm: str
    port: int = DEFAULT_PORT
    password_file: Path | None = None
    datacenter: str | None = None
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    task_timeout_s: float = DEFAULT_TASK_TIMEOUT_S
    guest: GuestConfig = dataclasses.field(default_factory=GuestConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        for name in ("host", "user", "master_target_vm"):
            if not getattr(self, name).strip():
                raise FieldValueError(name, "expected a non-empty string, found an empty one")
        if not MIN_PORT <= self.port <= MAX_PORT:
            raise FieldValueError("port", f"expected {MIN_PORT}..{MAX_PORT}, found {self.port}")
        for name in ("request_timeout_s", "task_timeout_s"):
            check_seconds(name, getattr(self, name), most=None)


class Secret:
    """A password that does not show itself: ``repr`` and ``str`` print asterisks.

    A traceback, a log line with ``%r`` or a debugger never shows the value;
    only :meth:`reveal` does, at the one place that sends it to vCenter.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The password itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


def load(path: str | Path) -> VsphereConfig:
    """Load and check a vSphere config file.

    Raises:
        ConfigError: naming the file and the key at fault.
    """
    return load_config(VsphereConfig, path)


def load_password(config: VsphereConfig, environ: Mapping[str, str]) -> Secret:
    """The password from ``password_file`` or from :data:`PASSWORD_ENV`, exactly one.

    Raises:
        VsphereConfigError: neither or both are given, the file is unsafe
            (group or others may read it), empty or not UTF-8.
    """
    from_env = environ.get(PASSWORD_ENV)
    if config.password_file is not None and from_env is not None:
        raise VsphereConfigError(
            f"the vCenter password is given twice, in password_file {config.password_file} and"
            f" in the environment variable {PASSWORD_ENV}: keep one"
        )
    if from_env is not None:
        if not from_env:
            raise VsphereConfigError(f"{PASSWORD_ENV} is set but empty: expected the password")
        return Secret(from_env)
    if config.password_file is None:
        raise VsphereConfigError(
            f"no vCenter password: expected password_file in the config, or the environment"
            f" variable {PASSWORD_ENV} (never on the command line)"
        )
    data = read_private_file(
        config.password_file,
        what="vSphere password file",
        why="it holds the password of a vCenter account",
        max_bytes=MAX_PASSWORD_FILE_BYTES,
        error=VsphereConfigError,
    )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VsphereConfigError(
            f"vSphere password file {config.password_file}: expected UTF-8 text, found"
            f" an invalid byte at offset {exc.start}"
        ) from None
    # One line: editors add a final newline that is not part of the password.
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise VsphereConfigError(
            f"vSphere password file {config.password_file} is empty: expected the password"
        )
    if "\n" in password:
        raise VsphereConfigError(
            f"vSphere password file {config.password_file} has several lines: expected the"
            " password alone on one line"
        )
    return Secret(password)
