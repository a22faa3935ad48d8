"""What every fixed header of the formats shares: a magic, a version, and an
XXH3-64 checksum of every byte before it, checked in that order before any
field is trusted (docs/protocol.md, "Conventions"); and the rule that a
decoder which failed stays failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import xxhash

from protocol.errors import (
    BadMagicError,
    BlockreplError,
    ChecksumMismatchError,
    DecoderFailedError,
    ProtocolError,
    UnsupportedVersionError,
)

T = TypeVar("T")

#: The checksum is the header's last 8 bytes.
CHECKSUM_BYTES = 8


def seal(body: bytes) -> bytes:
    """``body`` with its last 8 bytes replaced by the XXH3-64 of the bytes before them."""
    checked = body[:-CHECKSUM_BYTES]
    return checked + xxhash.xxh3_64_intdigest(checked).to_bytes(CHECKSUM_BYTES, "little")


def check_prefix(raw: bytes, *, magic: bytes, version: int, what: str) -> None:
    """Check a whole header's magic, version (the byte after the magic) and checksum.

    Raises:
        BadMagicError, UnsupportedVersionError, ChecksumMismatchError: in that order.
    """
    found_magic = raw[: len(magic)]
    if found_magic != magic:
        raise BadMagicError(f"{what} must start with {magic!r}, found {found_magic!r}")
    found_version = raw[len(magic)]
    if found_version != version:
        raise UnsupportedVersionError(
            f"{what} version must be {version}, found {found_version}",
            details={"supported_versions": [version]},
        )
    expected = xxhash.xxh3_64_intdigest(raw[:-CHECKSUM_BYTES])
    found = int.from_bytes(raw[-CHECKSUM_BYTES:], "little")
    if found != expected:
        raise ChecksumMismatchError(
            f"{what} header checksum must be {expected:016x}, found {found:016x}"
        )


class FailsOnce:
    """A decoder that is unusable after it raised: the stream position is lost."""

    _failed: BlockreplError | None = None
    #: names the decoder in the error of a second use
    _name = "decoder"

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise DecoderFailedError(
                f"{self._name} already failed ({self._failed.code}: {self._failed.message}); "
                "start a new one"
            )

    def _fail(self, exc: ProtocolError) -> None:
        self._failed = exc
        raise exc

    def _step(self, step: Callable[[], T]) -> T:
        """Run one decoding step, after checking the decoder is usable; a
        ProtocolError from it leaves the decoder failed for good."""
        self._check_usable()
        try:
            return step()
        except ProtocolError as exc:
            self._failed = exc
            raise
