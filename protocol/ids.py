"""Fixed-width id fields shared by the batch and HRL headers.

An id travels as ``len:u8`` plus 64 bytes of ASCII padded with zeros; a field
whose padding is not all zeros, or whose length is out of range, is refused so
one id has exactly one encoding.
"""

from __future__ import annotations

from typing import Final

from protocol.errors import MalformedError
from protocol.limits import MAX_ID_BYTES, check_id

ID_FIELD_BYTES: Final = MAX_ID_BYTES


def pack_id(kind: str, value: str) -> tuple[int, bytes]:
    """The ``(length, padded field)`` encoding of a valid id.

    Raises:
        MalformedError: the id is not valid.
    """
    raw = check_id(kind, value).encode("ascii")
    return len(raw), raw.ljust(ID_FIELD_BYTES, b"\0")


def unpack_id(kind: str, length: int, field: bytes) -> str:
    """Decode a ``(length, padded field)`` pair into an id, refusing any other encoding.

    Raises:
        MalformedError: length out of range, padding not zero, or an invalid id.
    """
    if not 1 <= length <= ID_FIELD_BYTES:
        raise MalformedError(f"{kind} id length must be 1..{ID_FIELD_BYTES}, found {length}")
    if field[length:] != bytes(ID_FIELD_BYTES - length):
        raise MalformedError(f"{kind} id padding after byte {length} must be zero bytes")
    try:
        text = field[:length].decode("ascii")
    except UnicodeDecodeError:
        raise MalformedError(f"{kind} id must be ASCII, found {field[:length]!r}") from None
    return check_id(kind, text)
