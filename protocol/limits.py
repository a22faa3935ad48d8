"""Limits of the formats, each with the reason for its number.

Lengths read from the wire or from a file are checked against these before
anything is allocated. Changing one changes what peers accept: say so in
docs/protocol.md.
"""

from __future__ import annotations

import re
from typing import Final

from protocol.errors import LimitExceededError, MalformedError

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
TiB: Final = 1024 * GiB
PiB: Final = 1024 * TiB

#: Largest disk the product addresses. VMDK tops out at 62 TiB and block devices
#: at a few PiB in practice; 2**62 leaves every offset + length sum far from the
#: u64 edge, so a crafted record cannot wrap around into valid space.
MAX_DISK_BYTES: Final = 2**62

#: Largest data of one WRITE record. The sync sends chunks of at most 4 MiB and
#: live capture writes are far smaller (NBD clients send at most 32 MiB, but
#: the capture splits them); one record is held whole in memory by every peer.
MAX_WRITE_BYTES: Final = 4 * MiB

#: Largest range of one ZERO record. Zeroing carries no data, so the limit is
#: only the disk size; 1 TiB keeps any one record's apply time bounded.
MAX_ZERO_BYTES: Final = TiB

#: Largest batch payload. The process server holds one batch of each request in
#: memory while it checks it, and an HRL file is built from whole batches: 32 MiB
#: is 8 of the largest records, small enough for many requests in flight.
MAX_BATCH_PAYLOAD: Final = 32 * MiB

#: Most records in one batch. Bounds the per-record objects a decoder builds for
#: one batch: a payload of tiny records could otherwise mean millions of them.
MAX_RECORDS_PER_BATCH: Final = 65_536

#: Largest plaintext of one HRL file: a process server may merge consecutive
#: batches of a disk into one file, up to two full batches. The master target
#: decrypts and decompresses one file at a time into memory.
MAX_HRL_PLAINTEXT: Final = 2 * MAX_BATCH_PAYLOAD

#: Bytes of an HRL file's header (protocol/hrl.py draws it).
HRL_HEADER_BYTES: Final = 208
#: Bytes of the AES-GCM tag after the ciphertext of every sealed file (HRL
#: and undo): the full 128-bit tag, never a truncated one.
GCM_TAG_BYTES: Final = 16

#: Largest HRL file: the largest plaintext stored without compression (a
#: writer stores the records as they are when zstd would not make them
#: smaller), with its header and tag. A receiver refuses a longer body before
#: it reads any of it, and an inbox must hold at least one.
MAX_HRL_FILE_BYTES: Final = HRL_HEADER_BYTES + MAX_HRL_PLAINTEXT + GCM_TAG_BYTES

#: Bytes of one PUT of HRL files, a run of a disk's consecutive files back to
#: back: no more than the longest single file, so what a master target holds
#: of a request in memory stays what one file needs.
MAX_HRL_RUN_BYTES: Final = MAX_HRL_FILE_BYTES

#: Most records in one HRL file, for the same reason as per batch.
MAX_RECORDS_PER_HRL: Final = 2 * MAX_RECORDS_PER_BATCH

#: Longest tag name in UTF-8 bytes: a name is for people (for example
#: "before-upgrade-2026-11-22"), and it is stored with every recovery point.
MAX_TAG_NAME_BYTES: Final = 128

#: Disk, machine and group ids: what fits safely in a file name, a URL path
#: segment and a Prometheus label without escaping.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_ID_BYTES: Final = 64

#: The highest seq or generation: u64 on the wire, but kept below 2**63 so that
#: it fits signed 64-bit columns (sqlite) without a wrap.
MAX_SEQ: Final = 2**63 - 1


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid disk, machine or group id.

    Raises:
        MalformedError: the id does not match ``[A-Za-z0-9._-]{1,64}``, or is
            one of the names ``.`` and ``..`` that mean directories.
    """
    if not ID_PATTERN.fullmatch(value) or value in {".", ".."}:
        raise MalformedError(
            f"{kind} id must match [A-Za-z0-9._-]{{1,64}} and not be '.' or '..', found {value!r}"
        )
    return value


def check_range(offset: int, length: int, *, max_length: int, what: str) -> None:
    """Check that ``[offset, offset + length)`` is a non-empty range on a disk.

    Python integers do not overflow, but peers store these in u64 fields: the
    sum is kept under :data:`MAX_DISK_BYTES`, far from the wrap.

    Raises:
        MalformedError: empty range or negative offset.
        LimitExceededError: longer than ``max_length`` or past the largest disk.
    """
    if offset < 0 or length <= 0:
        raise MalformedError(
            f"{what} must have offset >= 0 and length >= 1, found offset={offset} length={length}"
        )
    if length > max_length:
        raise LimitExceededError(f"{what} may be at most {max_length} bytes long, found {length}")
    if offset > MAX_DISK_BYTES - length:
        raise LimitExceededError(
            f"{what} must end at or before byte {MAX_DISK_BYTES}, found end {offset + length}"
        )
