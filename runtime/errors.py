"""The runtime branch of the error tree (rooted in :mod:`protocol.errors`).

These are failures of the host a daemon or command runs on: its configuration,
its files, its disks, its certificates. Exit codes follow sysexits(3), so a
service manager or a script can tell a bad configuration (78, do not restart in
a loop) from an I/O failure (74).
"""

from __future__ import annotations

import errno as errno_codes

from protocol.errors import BlockreplError


class ConfigError(BlockreplError):
    """The configuration does not let the program start: a bad key, value or file."""

    code = "config"
    http_status = 500
    exit_code = 78  # EX_CONFIG


class KeyFileError(ConfigError):
    """The data key file is missing, unsafe (readable by others) or malformed."""

    code = "key-file"


class MountTableError(ConfigError):
    """The mount table cannot be read or parsed, or does not contain a path."""

    code = "mount-table"


class TlsSetupError(ConfigError):
    """A CA, certificate or private key file could not be loaded into a TLS context."""

    code = "tls-setup"


class BodyTimeoutError(BlockreplError):
    """A client stopped sending a request body: the request is answered and closed.

    What the body held before the last whole unit (a batch, a file) was
    already used or refused on its own; the rest is dropped and the sender
    sends it again from its last acknowledgement.
    """

    code = "body-timeout"
    http_status = 408
    exit_code = 75  # EX_TEMPFAIL


class DurabilityError(BlockreplError):
    """A write, fsync, rename or unlink failed: the data must be treated as lost.

    docs/design.md crash-safe checklist item 4: after a failed fsync the kernel may
    have dropped the dirty pages, so a retry that succeeds proves nothing. The
    caller fails the batch (503: the sender keeps it and sends it again) or
    restarts and recovers; it never carries on.

    Args:
        message: what was being made durable, and where.
        errno: the OS error number, if the failure came from a system call;
            ``ENOSPC`` lets a caller turn a full disk into back-pressure.
        path: the file or directory the failed call was about.
    """

    code = "durability"
    http_status = 503
    exit_code = 74  # EX_IOERR

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None) -> None:
        name = errno_codes.errorcode.get(errno, str(errno)) if errno is not None else None
        super().__init__(message, details={"errno": name} if name else None)
        self.errno = errno
        self.path = path


class AlreadyExistsError(BlockreplError):
    """A file that must be created new exists already; it was left as it was."""

    code = "already-exists"
    http_status = 409
    exit_code = 73  # EX_CANTCREAT


class InvalidArgumentError(BlockreplError):
    """A value given to a command or function is outside what it accepts (a name, a count)."""

    code = "invalid-argument"
    http_status = 400
    exit_code = 64  # EX_USAGE


class PkiError(BlockreplError):
    """The deployment's certificate authority could not be made or used.

    Raised when ``certs init`` or ``certs issue`` would replace an existing
    CA or certificate, and when the CA files are missing, expired or do not
    match each other.
    """

    code = "pki"
    http_status = 500
    exit_code = 73  # EX_CANTCREAT


class PeerIdentityError(BlockreplError):
    """A verified client certificate does not name a machine this product accepts."""

    code = "peer-identity"
    http_status = 403
    exit_code = 77  # EX_NOPERM
