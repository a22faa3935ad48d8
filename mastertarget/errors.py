"""The master target's branch of the error tree (rooted in :mod:`protocol.errors`)."""

from __future__ import annotations

import enum

from protocol.errors import BlockreplError


class DiskError(BlockreplError):
    """A target disk cannot be opened, created or used as configured."""

    code = "disk"
    http_status = 500
    exit_code = 74  # EX_IOERR


class DiskFormatError(DiskError):
    """A target file is not in the format the config says, or is a VMDK variant
    that cannot be written in place (streamOptimized, compressed grains)."""

    code = "disk-format"
    exit_code = 65  # EX_DATAERR


class DiskRangeError(DiskError):
    """A read, write or zero outside the disk's virtual size."""

    code = "disk-range"
    http_status = 409


class DiskIOError(DiskError):
    """A read, write or fsync of a target disk failed; carries the OS errno."""

    code = "disk-io"
    http_status = 503

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message, details={"errno": errno} if errno is not None else None)
        self.errno = errno


class RetentionCriterion(enum.StrEnum):
    """Why a retention directory was refused: the ``criterion`` of :class:`RetentionVolumeError`."""

    MISSING = "missing"
    NOT_A_DIRECTORY = "not-a-directory"
    INACCESSIBLE = "inaccessible"
    MOUNT_TABLE = "mount-table"
    FAT_FILE_SYSTEM = "fat-file-system"
    ZERO_CAPACITY = "zero-capacity"
    NOT_WRITABLE = "not-writable"
    CACHE_VOLUME = "cache-volume"
    INSTALL_VOLUME = "install-volume"
    REPLICATION_TARGET = "replication-target"
    LOCKED = "locked"


class RetentionVolumeError(BlockreplError):
    """The retention directory cannot hold a retention journal: the master target does not start.

    The criteria are those of the failback seed (the cache or install volume,
    in use as a replication target, locked, FAT or FAT32, zero capacity), and
    the directory being missing, not a directory, not writable or unreadable.

    Args:
        message: the criterion, the directory and what was found.
        criterion: which check failed, machine-readable: a value of
            :class:`RetentionCriterion` (``"fat-file-system"``, ``"locked"``...).
        directory: the retention directory as configured; None when the
            failure is not about one directory (an unreadable mount table).
    """

    code = "retention-volume"
    http_status = 500
    exit_code = 78  # EX_CONFIG: restarting cannot fix it, the operator must

    def __init__(self, message: str, *, criterion: str, directory: str | None = None) -> None:
        details: dict[str, object] = {"criterion": criterion}
        if directory is not None:
            details["directory"] = directory
        super().__init__(message, details=details)
        self.criterion = criterion
        self.directory = directory

    @classmethod
    def refusing(
        cls, criterion: RetentionCriterion, shown: str, found: str
    ) -> RetentionVolumeError:
        """The refusal of ``shown`` for ``criterion``: ``retention directory D <found>``."""
        return cls(
            f"retention directory {shown} {found}", criterion=criterion.value, directory=shown
        )


class DiskExistsError(DiskError):
    """A disk to be created exists already (or one of its files does); nothing was touched."""

    code = "disk-exists"
    http_status = 409
    exit_code = 73  # EX_CANTCREAT


class DiskSizeError(DiskError):
    """A disk cannot be created with the size asked for (not whole sectors, or too large)."""

    code = "disk-size"
    http_status = 400
    exit_code = 64  # EX_USAGE


class UnknownGroupError(BlockreplError):
    """A consistency group that the master target's config does not name."""

    code = "unknown-group"
    http_status = 404
    exit_code = 64  # EX_USAGE


class PointSpecError(BlockreplError):
    """A point SPEC is none of the accepted forms (see :mod:`mastertarget.pointspec`)."""

    code = "point-spec"
    http_status = 400
    exit_code = 64  # EX_USAGE


class PointNotFoundError(BlockreplError):
    """No consistent recovery point matches a SPEC; the message gives the window available."""

    code = "point-not-found"
    http_status = 404
    exit_code = 66  # EX_NOINPUT


# --- vSphere: the master target's vCenter or ESXi (mastertarget vsphere ...) ------


class VsphereError(BlockreplError):
    """vCenter or ESXi could not do what was asked: the message says what it answered."""

    code = "vsphere"
    http_status = 502
    exit_code = 69  # EX_UNAVAILABLE


class VsphereConfigError(BlockreplError):
    """The vSphere config file or the password given is missing, unsafe or malformed."""

    code = "vsphere-config"
    http_status = 500
    exit_code = 78  # EX_CONFIG


class VsphereConnectionError(VsphereError):
    """vCenter cannot be reached, or its certificate does not verify against ``ca_file``."""

    code = "vsphere-connection"


class VsphereLoginError(VsphereError):
    """vCenter refused the user name and password."""

    code = "vsphere-login"
    http_status = 401
    exit_code = 77  # EX_NOPERM


class VspherePermissionError(VsphereError):
    """The account lacks privileges that an operation needs; ``details`` names them and where."""

    code = "vsphere-permission"
    http_status = 403
    exit_code = 77  # EX_NOPERM


class VsphereNotFoundError(VsphereError):
    """A VM, datastore, network or disk named on the command line is not in the inventory."""

    code = "vsphere-not-found"
    http_status = 404
    exit_code = 66  # EX_NOINPUT


class VsphereAmbiguousError(VsphereError):
    """A name matches several objects (names are unique per folder only): the message lists them."""

    code = "vsphere-ambiguous"
    http_status = 409
    exit_code = 64  # EX_USAGE


class PreflightFailedError(VsphereError):
    """A preflight check failed, so nothing was changed; ``details["checks"]`` has them all."""

    code = "preflight-failed"
    http_status = 409
    exit_code = 1


class GuestDeviceError(VsphereError):
    """A disk is attached but its device did not appear inside this machine in time,
    or a device to detach is still in use (mounted, or held by LVM, md or dm)."""

    code = "guest-device"
