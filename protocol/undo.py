"""The undo file: before-images the master target keeps in its retention
journal, so the target can be rolled back to any recovery point.

Before a part of the stream (a run of WRITE and ZERO records between two
recovery points) is applied, the bytes it will overwrite are read from the
target and kept, compressed and encrypted like an HRL file, in one or more
undo files. Applying a part's undo files (in any order: their ranges do not
overlap) turns the target back into what it was before the part::

    file = header[200] || ciphertext[stored_len] || gcm_tag[16]

    offset size  field
         0    4  magic              "BRU1"
         4    1  version            1
         5    1  compression        Compression (protocol/hrl.py)
         6    1  reserved           0
         7    1  disk_id_len        1..64
         8   64  disk_id            ASCII, zero padded
        72    8  generation         of the part undone
        80    8  first_seq          first seq of the part undone
        88    8  last_seq           last seq of the part undone (>= first_seq)
        96    4  chunk              0 .. chunks-1
       100    4  chunks             undo files of the part, 1..MAX_UNDO_CHUNKS
       104    4  record_count       before-image records in this file, 1..
       108    4  key_id             data key in the key ring
       112    8  capture_ns         source time of the part's last record
       120    8  plaintext_len      <= MAX_UNDO_PLAINTEXT
       128    8  stored_len         as in HRL files (canonical)
       136    4  data_len           data area of the plaintext
       140    4  reserved           0
       144   32  kdf_salt           random
       176   16  plaintext_xxh3_128
       192    8  header_xxh3_64     of bytes 0..191

The plaintext is a payload of records (protocol/records.py): a WRITE per
range whose before-image holds data, a ZERO per range that read as zeros.
Keys and nonces are derived per file exactly as for HRL files, and the whole
header is the GCM associated data. Specified in docs/protocol.md, "Undo files".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import xxhash
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol import headers, ids
from protocol.compression import Compression, decompress_stored
from protocol.errors import (
    AuthenticationFailedError,
    ChecksumMismatchError,
    LimitExceededError,
    MalformedError,
    TruncatedError,
)
from protocol.keyring import SALT_BYTES, KeyRing, check_key_id
from protocol.limits import GCM_TAG_BYTES, MAX_SEQ, MiB
from protocol.records import (
    MAX_TIME_NS,
    Buffer,
    Record,
    check_payload_layout,
    decode_records,
    encode_records,
)

UNDO_MAGIC: Final = b"BRU1"
UNDO_VERSION: Final = 1
#: Largest plaintext of one undo file: the journal writes a part's
#: before-images in files of at most this size, so a 1 TiB ZERO record costs
#: many files, not one huge buffer.
MAX_UNDO_PLAINTEXT: Final = 16 * MiB
#: Most undo files for one part: 2**20 files of 16 MiB cover 16 TiB, more
#: than any single record can touch (ZERO records stop at 1 TiB).
MAX_UNDO_CHUNKS: Final = 2**20
#: Records in one undo file: ranges of at least one byte, bounded like a batch.
MAX_UNDO_RECORDS: Final = 65_536

# magic || version || compression || reserved || disk_id_len || disk_id || generation
# || first_seq || last_seq || chunk || chunks || record_count || key_id || capture_ns
# || plaintext_len || stored_len || data_len || reserved || kdf_salt || plaintext_xxh3_128
# || header_xxh3_64
UNDO_HEADER: Final = struct.Struct("<4sBBBB64sQQQIIIIQQQII32s16sQ")


@dataclass(frozen=True, slots=True)
class UndoHeader:
    """The decoded header of one undo file."""

    disk_id: str
    generation: int
    first_seq: int
    last_seq: int
    chunk: int
    chunks: int
    record_count: int
    key_id: int
    capture_ns: int
    plaintext_len: int
    stored_len: int
    data_len: int
    kdf_salt: bytes
    plaintext_xxh3_128: bytes
    compression: Compression = Compression.ZSTD

    @property
    def file_len(self) -> int:
        return UNDO_HEADER.size + self.stored_len + GCM_TAG_BYTES

    def pack(self) -> bytes:
        """The 200 header bytes after checking every field."""
        _check(self)
        id_len, id_field = ids.pack_id("disk", self.disk_id)
        return headers.seal(
            UNDO_HEADER.pack(
                UNDO_MAGIC, UNDO_VERSION, self.compression, 0, id_len, id_field,
                self.generation, self.first_seq, self.last_seq, self.chunk, self.chunks,
                self.record_count, self.key_id, self.capture_ns, self.plaintext_len,
                self.stored_len, self.data_len, 0, self.kdf_salt, self.plaintext_xxh3_128, 0,
            )
        )  # fmt: skip


def parse_undo_header(buf: Buffer) -> UndoHeader:
    """Decode and check an undo file's header; no key needed.

    Raises:
        ProtocolError: in the order the fields are checked.
    """
    if len(buf) < UNDO_HEADER.size:
        raise TruncatedError(f"undo header needs {UNDO_HEADER.size} bytes, found {len(buf)}")
    raw = bytes(buf[: UNDO_HEADER.size])
    headers.check_prefix(raw, magic=UNDO_MAGIC, version=UNDO_VERSION, what="undo file")
    (
        _, _, compression, reserved1, id_len, id_field, generation, first_seq, last_seq,
        chunk, chunks, record_count, key_id, capture_ns, plaintext_len, stored_len, data_len,
        reserved2, salt, digest, _,
    ) = UNDO_HEADER.unpack(raw)  # fmt: skip
    if reserved1 or reserved2:
        raise MalformedError("undo header reserved fields must be 0")
    try:
        method = Compression(compression)
    except ValueError:
        raise MalformedError(f"undo compression must be 0 or 1, found {compression}") from None
    header = UndoHeader(
        disk_id=ids.unpack_id("disk", id_len, id_field),
        generation=generation,
        first_seq=first_seq,
        last_seq=last_seq,
        chunk=chunk,
        chunks=chunks,
        record_count=record_count,
        key_id=key_id,
        capture_ns=capture_ns,
        plaintext_len=plaintext_len,
        stored_len=stored_len,
        data_len=data_len,
        kdf_salt=salt,
        plaintext_xxh3_128=digest,
        compression=method,
    )
    _check(header)
    return header


def _check(h: UndoHeader) -> None:
    if not 1 <= h.generation <= MAX_SEQ or not 1 <= h.first_seq <= h.last_seq <= MAX_SEQ:
        raise MalformedError(
            f"undo file must name generation >= 1 and seqs 1 <= first <= last, found "
            f"generation {h.generation} seqs {h.first_seq}..{h.last_seq}"
        )
    if not 1 <= h.chunks <= MAX_UNDO_CHUNKS or not 0 <= h.chunk < h.chunks:
        raise MalformedError(
            f"undo chunk must be 0..chunks-1 with chunks in 1..{MAX_UNDO_CHUNKS}, "
            f"found chunk {h.chunk} of {h.chunks}"
        )
    if not 1 <= h.record_count <= MAX_UNDO_RECORDS:
        raise LimitExceededError(
            f"undo record count must be 1..{MAX_UNDO_RECORDS}, found {h.record_count}"
        )
    check_key_id(h.key_id)
    if not 0 <= h.capture_ns <= MAX_TIME_NS:
        raise MalformedError(f"undo capture time must be 0..2**63-1, found {h.capture_ns}")
    if h.plaintext_len > MAX_UNDO_PLAINTEXT:
        raise LimitExceededError(
            f"undo plaintext may be at most {MAX_UNDO_PLAINTEXT} bytes, found {h.plaintext_len}"
        )
    check_payload_layout(h.plaintext_len, h.data_len, h.record_count, what="undo file")
    if (h.compression is Compression.NONE and h.stored_len != h.plaintext_len) or (
        h.compression is Compression.ZSTD and not 1 <= h.stored_len < h.plaintext_len
    ):
        raise MalformedError(
            f"undo stored_len must equal plaintext_len without compression and be smaller "
            f"with zstd, found {h.stored_len} for {h.plaintext_len} ({h.compression.name})"
        )
    if len(h.kdf_salt) != SALT_BYTES or len(h.plaintext_xxh3_128) != 16:
        raise MalformedError("undo salt and digest must be 32 and 16 bytes")


@dataclass(frozen=True, slots=True)
class UndoFile:
    """A verified undo file: its header and its before-image records."""

    header: UndoHeader
    plaintext: bytes
    records: tuple[Record, ...]


def seal_undo(
    records: list[Record],
    *,
    keyring: KeyRing,
    compressor: zstandard.ZstdCompressor,
    disk_id: str,
    generation: int,
    first_seq: int,
    last_seq: int,
    chunk: int,
    chunks: int,
    capture_ns: int,
    salt: bytes,
) -> bytes:
    """Seal before-image records into one undo file, its header parsed back.

    Raises:
        ProtocolError: a field or record breaks a rule of the format.
    """
    encoded = encode_records(records)
    plaintext = b"".join(encoded.segments)
    compressed = compressor.compress(plaintext)
    method = Compression.ZSTD if len(compressed) < len(plaintext) else Compression.NONE
    stored = compressed if method is Compression.ZSTD else plaintext
    header = UndoHeader(
        disk_id=disk_id,
        generation=generation,
        first_seq=first_seq,
        last_seq=last_seq,
        chunk=chunk,
        chunks=chunks,
        record_count=len(records),
        key_id=keyring.active_id,
        capture_ns=capture_ns,
        plaintext_len=len(plaintext),
        stored_len=len(stored),
        data_len=encoded.data_len,
        kdf_salt=salt,
        plaintext_xxh3_128=xxhash.xxh3_128_digest(plaintext),
        compression=method,
    )
    header_bytes = header.pack()
    if parse_undo_header(header_bytes) != header:
        raise MalformedError(f"undo header of seq {first_seq} did not parse back as written")
    key = keyring.file_key(header.key_id, salt)
    return header_bytes + AESGCM(key.key).encrypt(key.nonce, stored, header_bytes)


def open_undo(data: Buffer, keyring: KeyRing) -> UndoFile:
    """Verify a whole undo file and decode its records (the order of open_hrl).

    Raises:
        ProtocolError: any check failed; the file must not be applied.
    """
    header = parse_undo_header(data)
    what = f"undo file seqs {header.first_seq}..{header.last_seq} chunk {header.chunk}"
    if len(data) != header.file_len:
        cls = TruncatedError if len(data) < header.file_len else MalformedError
        raise cls(f"{what} must be {header.file_len} bytes by its header, found {len(data)}")
    key = keyring.file_key(header.key_id, header.kdf_salt)
    view = memoryview(data)
    try:
        stored = AESGCM(key.key).decrypt(
            key.nonce, view[UNDO_HEADER.size :], view[: UNDO_HEADER.size]
        )
    except InvalidTag:
        raise AuthenticationFailedError(f"{what}: the AES-GCM tag does not verify") from None
    plaintext = decompress_stored(header.compression, stored, header.plaintext_len, what=what)
    actual = xxhash.xxh3_128_digest(plaintext)
    if actual != header.plaintext_xxh3_128:
        raise ChecksumMismatchError(
            f"{what}: plaintext xxh3-128 must be {header.plaintext_xxh3_128.hex()}, "
            f"found {actual.hex()}"
        )
    records = decode_records(plaintext, header.record_count, header.data_len, what=what)
    return UndoFile(header, plaintext, records)
