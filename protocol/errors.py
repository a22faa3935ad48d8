"""The error tree of blockrepl.

Every error the product raises on purpose derives from :class:`BlockreplError`
and carries a machine-readable ``code``, the HTTP status a daemon answers with,
and the exit status a command ends with. Other packages add their branches
below the root; an exception that is not a ``BlockreplError`` is a bug.

Messages say what was expected and what was found, so an operator reading a log
line at 3 a.m. knows which side is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class BlockreplError(Exception):
    """Root of every deliberate error.

    Args:
        message: what was expected and what was found.
        details: machine-readable facts for API answers (for example the
            expected seq of a gap); values must be JSON-serialisable.
    """

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, details: Mapping[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, object] = dict(details or {})

    def to_json(self) -> dict[str, object]:
        """The error as the JSON body of an API answer."""
        return {"error": self.code, "message": self.message, **self.details}


class RemoteError(BlockreplError):
    """An error a daemon answered with, carried to the command that asked it.

    Its exit status is the one the error tree gives the daemon's code
    (:func:`exit_code_of`): a refusal reads the same whether the command
    did the work itself or asked the running daemon to.
    """

    code = "remote"

    def __init__(self, message: str, *, remote_code: str) -> None:
        super().__init__(message)
        self.remote_code = remote_code


def exit_code_of(error: BlockreplError) -> int:
    """The exit status of ``error``; for a :class:`RemoteError`, that of the error
    class (among those imported) whose code the daemon answered with, else 1."""
    if not isinstance(error, RemoteError):
        return error.exit_code
    pending: list[type[BlockreplError]] = [BlockreplError]
    while pending:
        kind = pending.pop()
        if kind.code == error.remote_code and kind is not RemoteError:
            return kind.exit_code
        pending.extend(kind.__subclasses__())
    return BlockreplError.exit_code


# --- protocol: anything wrong with bytes we were given -------------------------------


class ProtocolError(BlockreplError):
    """Bytes that do not follow the formats of docs/protocol.md."""

    code = "protocol"
    http_status = 400
    exit_code = 65  # EX_DATAERR


class TruncatedError(ProtocolError):
    """The input ended inside a header, record or payload."""

    code = "truncated"


class BadMagicError(ProtocolError):
    """The first bytes are not the magic of the expected format."""

    code = "bad-magic"


class UnsupportedVersionError(ProtocolError):
    """A format version this build does not read."""

    code = "unsupported-version"


class MalformedError(ProtocolError):
    """A field holds a value the format forbids (bad id, reserved bits, non-canonical encoding)."""

    code = "malformed"


class LimitExceededError(ProtocolError):
    """A length or count is above a limit of protocol/limits.py."""

    code = "too-large"
    http_status = 413


class ChecksumMismatchError(ProtocolError):
    """An xxh3 checksum does not match the bytes it covers."""

    code = "checksum-mismatch"


class AuthenticationFailedError(ProtocolError):
    """The AES-256-GCM tag does not verify: wrong key, or the file was altered."""

    code = "authentication-failed"


class UnknownKeyError(ProtocolError):
    """The key id in a header is not in the key ring."""

    code = "unknown-key"
    http_status = 422


class DecoderFailedError(ProtocolError):
    """A decoder was used again after it raised; it is unusable, as the stream is lost."""

    code = "decoder-failed"
