"""How HRL and undo files store their plaintext: as is, or as one zstd frame.

Both formats (docs/protocol.md, "HRL files" and "Undo files") carry a
``compression`` byte; the reader checks the frame against the plaintext
length the authenticated header declares before it decompresses a byte
more than that.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

import zstandard

from protocol.errors import MalformedError

#: zstd level 1 is the fastest level that still finds most redundancy in disk
#: blocks; the process server may raise it in its config.
DEFAULT_ZSTD_LEVEL: Final = 1
#: zstd levels above 19 need far more memory on both sides for little gain.
MAX_ZSTD_LEVEL: Final = 19


class Compression(IntEnum):
    """How the plaintext is stored before encryption."""

    #: stored as is: the writer chooses this when zstd would not make it smaller
    NONE = 0
    #: one zstd frame with its content size set
    ZSTD = 1


def decompress_stored(
    compression: Compression, stored: bytes, plaintext_len: int, *, what: str
) -> bytes:
    """The plaintext of an authenticated body: checked, and bounded by ``plaintext_len``.

    Raises:
        MalformedError: the zstd frame has no valid header, declares another
            size, is invalid, or gives another length.
    """
    if compression is Compression.NONE:
        return stored
    try:
        size = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise MalformedError(f"{what}: zstd frame header is invalid: {exc}") from None
    if size != plaintext_len:
        raise MalformedError(f"{what}: zstd frame must declare {plaintext_len} bytes, found {size}")
    try:
        plaintext = zstandard.ZstdDecompressor().decompress(stored, max_output_size=plaintext_len)
    except zstandard.ZstdError as exc:
        raise MalformedError(f"{what}: zstd frame is invalid: {exc}") from None
    if len(plaintext) != plaintext_len:
        raise MalformedError(
            f"{what}: plaintext must be {plaintext_len} bytes, found {len(plaintext)}"
        )
    return plaintext
