"""The HRL change-log file: what the process server caches and ships, and
what the master target keeps in its inbox and applies.

One file holds a run of consecutive records of one disk, compressed with zstd
and encrypted with AES-256-GCM under a key derived for this file alone::

    file = header[208] || ciphertext[stored_len] || gcm_tag[16]

    offset size  field
         0    4  magic              "BRH1"
         4    1  version            1
         5    1  compression        Compression
         6    1  flags              StreamFlags
         7    1  disk_id_len        1..64
         8   64  disk_id            ASCII, zero padded
        72    8  generation         1..2**63-1
        80    8  first_seq          1..2**63-1
        88    8  last_seq           first_seq + record_count - 1
        96    4  record_count       1..MAX_RECORDS_PER_HRL
       100    4  key_id             1..2**32-1, names the data key in the key ring
       104    8  first_capture_ns   source clock
       112    8  last_capture_ns    >= first_capture_ns
       120    8  receive_ns         process server clock when the records arrived
       128    8  plaintext_len      record bytes before compression, <= MAX_HRL_PLAINTEXT
       136    8  stored_len         bytes of ciphertext (before the tag)
       144    4  data_len           bytes of WRITE data at the start of the plaintext
       148    4  reserved           0
       152   32  kdf_salt           random, input of HKDF (protocol/keyring.py)
       184   16  plaintext_xxh3_128 canonical XXH3-128 of the plaintext records
       200    8  header_xxh3_64     XXH3-64 of bytes 0..199

All integers little-endian. The whole 208-byte header is the GCM associated
data, so no header bit can change without the tag failing. The reader checks
length, magic, version, header checksum and sizes before it derives a key, and
decrypts, decompresses, hashes and decodes only then. Specified in
docs/protocol.md, "HRL files".
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
from protocol.compression import (
    DEFAULT_ZSTD_LEVEL,
    MAX_ZSTD_LEVEL,
    Compression,
    decompress_stored,
)
from protocol.errors import (
    AuthenticationFailedError,
    ChecksumMismatchError,
    LimitExceededError,
    MalformedError,
    TruncatedError,
)
from protocol.keyring import SALT_BYTES, KeyRing, check_key_id
from protocol.limits import GCM_TAG_BYTES, MAX_HRL_PLAINTEXT, MAX_RECORDS_PER_HRL, MAX_SEQ
from protocol.records import (
    MAX_TIME_NS,
    NO_FLAGS,
    Buffer,
    Record,
    StreamFlags,
    check_flags,
    check_payload_layout,
    decode_records,
    encode_records,
)

HRL_MAGIC: Final = b"BRH1"
HRL_VERSION: Final = 1

# magic || version || compression || flags || disk_id_len || disk_id || generation
# || first_seq || last_seq || record_count || key_id || first_capture_ns
# || last_capture_ns || receive_ns || plaintext_len || stored_len || data_len || reserved
# || kdf_salt || plaintext_xxh3_128 || header_xxh3_64
HRL_HEADER: Final = struct.Struct("<4sBBBB64sQQQIIQQQQQII32s16sQ")


@dataclass(frozen=True, slots=True)
class HrlHeader:
    """The decoded header of one HRL file."""

    disk_id: str
    generation: int
    first_seq: int
    record_count: int
    key_id: int
    first_capture_ns: int
    last_capture_ns: int
    receive_ns: int
    plaintext_len: int
    stored_len: int
    kdf_salt: bytes
    plaintext_xxh3_128: bytes
    data_len: int
    compression: Compression = Compression.ZSTD
    flags: StreamFlags = NO_FLAGS

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.record_count - 1

    @property
    def file_len(self) -> int:
        """Bytes of the whole file: header, ciphertext and tag."""
        return HRL_HEADER.size + self.stored_len + GCM_TAG_BYTES

    def pack(self) -> bytes:
        """The 208 header bytes, checksum included, after checking every field.

        Raises:
            MalformedError, LimitExceededError: a field breaks a rule of the format.
        """
        _check_header(self)
        id_len, id_field = ids.pack_id("disk", self.disk_id)
        body = HRL_HEADER.pack(
            HRL_MAGIC, HRL_VERSION, self.compression, int(self.flags), id_len, id_field,
            self.generation, self.first_seq, self.last_seq, self.record_count, self.key_id,
            self.first_capture_ns, self.last_capture_ns, self.receive_ns,
            self.plaintext_len, self.stored_len, self.data_len, 0, self.kdf_salt,
            self.plaintext_xxh3_128, 0,
        )  # fmt: skip
        return headers.seal(body)


def parse_header(buf: Buffer) -> HrlHeader:
    """Decode and check the header at the start of ``buf``. No key is needed.

    Raises:
        TruncatedError: fewer than 200 bytes.
        BadMagicError, UnsupportedVersionError, ChecksumMismatchError,
        MalformedError, LimitExceededError: in the order the fields are checked.
    """
    if len(buf) < HRL_HEADER.size:
        raise TruncatedError(f"HRL header needs {HRL_HEADER.size} bytes, found {len(buf)}")
    raw = bytes(buf[: HRL_HEADER.size])
    headers.check_prefix(raw, magic=HRL_MAGIC, version=HRL_VERSION, what="HRL file")
    (
        _, _, compression, flags, id_len, id_field, generation, first_seq,
        last_seq, record_count, key_id, first_ns, last_ns, receive_ns, plaintext_len,
        stored_len, data_len, reserved, salt, digest, _,
    ) = HRL_HEADER.unpack(raw)  # fmt: skip
    if reserved:
        raise MalformedError(f"HRL header reserved field must be 0, found {reserved}")
    try:
        method = Compression(compression)
    except ValueError:
        raise MalformedError(
            f"HRL compression must be 0 (NONE) or 1 (ZSTD), found {compression}"
        ) from None
    header = HrlHeader(
        disk_id=ids.unpack_id("disk", id_len, id_field),
        generation=generation,
        first_seq=first_seq,
        record_count=record_count,
        key_id=key_id,
        first_capture_ns=first_ns,
        last_capture_ns=last_ns,
        receive_ns=receive_ns,
        plaintext_len=plaintext_len,
        stored_len=stored_len,
        kdf_salt=salt,
        plaintext_xxh3_128=digest,
        data_len=data_len,
        compression=method,
        flags=check_flags(flags, what="HRL"),
    )
    _check_header(header)
    if last_seq != header.last_seq:
        raise MalformedError(
            f"HRL last_seq must be first_seq + record_count - 1 = {header.last_seq}, "
            f"found {last_seq}"
        )
    return header


def _check_header(h: HrlHeader) -> None:
    check_flags(int(h.flags), what="HRL")
    if not 1 <= h.generation <= MAX_SEQ:
        raise MalformedError(f"HRL generation must be 1..{MAX_SEQ}, found {h.generation}")
    if not 1 <= h.record_count <= MAX_RECORDS_PER_HRL:
        raise LimitExceededError(
            f"HRL record count must be 1..{MAX_RECORDS_PER_HRL}, found {h.record_count}"
        )
    if not 1 <= h.first_seq <= MAX_SEQ - h.record_count + 1:
        raise MalformedError(
            f"HRL seqs must lie in 1..{MAX_SEQ}, found first_seq={h.first_seq} "
            f"with {h.record_count} records"
        )
    check_key_id(h.key_id)
    if not 0 <= h.first_capture_ns <= h.last_capture_ns <= MAX_TIME_NS:
        raise MalformedError(
            "HRL capture times must satisfy 0 <= first <= last < 2**63, "
            f"found first={h.first_capture_ns} last={h.last_capture_ns}"
        )
    if not 0 <= h.receive_ns <= MAX_TIME_NS:
        raise MalformedError(f"HRL receive time must be in 0..2**63-1, found {h.receive_ns}")
    if h.plaintext_len > MAX_HRL_PLAINTEXT:
        raise LimitExceededError(
            f"HRL plaintext may be at most {MAX_HRL_PLAINTEXT} bytes, found {h.plaintext_len}"
        )
    check_payload_layout(h.plaintext_len, h.data_len, h.record_count, what="HRL")
    # Canonical sizes: stored as is means exactly the plaintext; zstd is used
    # only when it makes the file smaller.
    if h.compression is Compression.NONE and h.stored_len != h.plaintext_len:
        raise MalformedError(
            f"HRL stored without compression must have stored_len = plaintext_len = "
            f"{h.plaintext_len}, found {h.stored_len}"
        )
    if h.compression is Compression.ZSTD and not 1 <= h.stored_len < h.plaintext_len:
        raise MalformedError(
            f"HRL compressed with zstd must have 1 <= stored_len < plaintext_len = "
            f"{h.plaintext_len}, found {h.stored_len}"
        )
    if len(h.kdf_salt) != SALT_BYTES or len(h.plaintext_xxh3_128) != 16:
        raise MalformedError(
            f"HRL salt and digest must be {SALT_BYTES} and 16 bytes, "
            f"found {len(h.kdf_salt)} and {len(h.plaintext_xxh3_128)}"
        )


@dataclass(frozen=True, slots=True)
class SealedHrl:
    """A sealed HRL file: its header, and its bytes as two segments.

    The segments are kept apart so the ciphertext is never copied again:
    write them with ``os.writev`` (or join them, for a small file).
    """

    header: HrlHeader
    header_bytes: bytes
    #: ciphertext || GCM tag
    body: bytes

    @property
    def segments(self) -> tuple[bytes, bytes]:
        return (self.header_bytes, self.body)

    def to_bytes(self) -> bytes:
        return self.header_bytes + self.body


@dataclass(frozen=True, slots=True)
class HrlFile:
    """An opened, verified HRL file: every check passed, records decoded."""

    header: HrlHeader
    plaintext: bytes
    records: tuple[Record, ...]


class HrlSealer:
    """Compresses and encrypts record payloads into HRL files.

    Holds one zstd context, reused across files (creating one per file costs
    more than compressing a small file). Not thread-safe: give each worker
    thread its own sealer.

    Args:
        keyring: new files are sealed with its active key.
        zstd_level: 1..19.
    """

    def __init__(self, keyring: KeyRing, *, zstd_level: int = DEFAULT_ZSTD_LEVEL) -> None:
        if not 1 <= zstd_level <= MAX_ZSTD_LEVEL:
            raise MalformedError(f"zstd level must be 1..{MAX_ZSTD_LEVEL}, found {zstd_level}")
        self._keyring = keyring
        self._zstd = zstandard.ZstdCompressor(
            level=zstd_level, write_content_size=True, write_checksum=False, write_dict_id=False
        )
        # Records are joined into this buffer, reused across files: a fresh
        # multi-MiB buffer per file costs a page fault per 4 KiB.
        self._scratch = bytearray()

    def seal(
        self,
        *,
        disk_id: str,
        generation: int,
        first_seq: int,
        record_count: int,
        first_capture_ns: int,
        last_capture_ns: int,
        receive_ns: int,
        plaintext: Buffer,
        data_len: int,
        salt: bytes,
        flags: StreamFlags = NO_FLAGS,
        plaintext_xxh3_128: bytes | None = None,
    ) -> SealedHrl:
        """Seal ``record_count`` encoded records (a verified batch payload, or
        several joined) into one HRL file.

        Args:
            plaintext: the encoded records, as checked by the batch decoder.
            data_len: the length of the plaintext's data area.
            salt: 32 fresh random bytes (``os.urandom(32)``); never reuse one.
            plaintext_xxh3_128: the payload digest when the caller already
                verified it (a single batch), to avoid hashing twice.

        Raises:
            MalformedError, LimitExceededError: a field breaks a rule of the format.
        """
        digest = plaintext_xxh3_128 or xxhash.xxh3_128_digest(plaintext)
        compressed = self._zstd.compress(plaintext)
        if len(compressed) < len(plaintext):
            stored: Buffer = compressed
            method = Compression.ZSTD
        else:
            stored, method = plaintext, Compression.NONE
        header = HrlHeader(
            disk_id=disk_id,
            generation=generation,
            first_seq=first_seq,
            record_count=record_count,
            key_id=self._keyring.active_id,
            first_capture_ns=first_capture_ns,
            last_capture_ns=last_capture_ns,
            receive_ns=receive_ns,
            plaintext_len=len(plaintext),
            stored_len=len(stored),
            kdf_salt=salt,
            plaintext_xxh3_128=digest,
            data_len=data_len,
            compression=method,
            flags=flags,
        )
        header_bytes = header.pack()
        # Parse back what was written before anyone stores it.
        if parse_header(header_bytes) != header:
            raise MalformedError(f"HRL header of seq {first_seq} did not parse back as written")
        file_key = self._keyring.file_key(header.key_id, salt)
        body = AESGCM(file_key.key).encrypt(file_key.nonce, stored, header_bytes)
        return SealedHrl(header, header_bytes, body)

    def seal_records(
        self,
        records: list[Record],
        *,
        disk_id: str,
        generation: int,
        first_seq: int,
        first_capture_ns: int,
        last_capture_ns: int,
        receive_ns: int,
        salt: bytes,
        flags: StreamFlags = NO_FLAGS,
    ) -> SealedHrl:
        """Encode ``records`` and seal them. See :meth:`seal`."""
        encoded = encode_records(records)
        parts = encoded.segments
        size = encoded.payload_len
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        view = memoryview(self._scratch)
        pos = 0
        for part in parts:
            view[pos : pos + len(part)] = part
            pos += len(part)
        return self.seal(
            disk_id=disk_id,
            generation=generation,
            first_seq=first_seq,
            record_count=len(records),
            first_capture_ns=first_capture_ns,
            last_capture_ns=last_capture_ns,
            receive_ns=receive_ns,
            plaintext=view[:size],
            data_len=encoded.data_len,
            salt=salt,
            flags=flags,
        )


def open_hrl(data: Buffer, keyring: KeyRing) -> HrlFile:
    """Verify a whole HRL file and decode its records.

    Order: header (length, magic, version, checksum, fields), file length,
    key lookup, GCM tag over header and ciphertext, zstd content size,
    decompression bounded by ``plaintext_len``, plaintext XXH3-128, records.

    Raises:
        ProtocolError: any check failed; the file must not be applied.
    """
    header = parse_header(data)
    if len(data) != header.file_len:
        cls = TruncatedError if len(data) < header.file_len else MalformedError
        raise cls(
            f"HRL file seq {header.first_seq} must be {header.file_len} bytes "
            f"by its header, found {len(data)}"
        )
    file_key = keyring.file_key(header.key_id, header.kdf_salt)
    view = memoryview(data)
    try:
        stored = AESGCM(file_key.key).decrypt(
            file_key.nonce, view[HRL_HEADER.size :], view[: HRL_HEADER.size]
        )
    except InvalidTag:
        raise AuthenticationFailedError(
            f"HRL file seq {header.first_seq} of disk {header.disk_id}: the AES-GCM tag "
            f"does not verify with key {header.key_id:08x} (altered, or sealed with another key)"
        ) from None
    plaintext = decompress_stored(
        header.compression, stored, header.plaintext_len, what=f"HRL seq {header.first_seq}"
    )
    actual = xxhash.xxh3_128_digest(plaintext)
    if actual != header.plaintext_xxh3_128:
        raise ChecksumMismatchError(
            f"HRL file seq {header.first_seq} plaintext xxh3-128 must be "
            f"{header.plaintext_xxh3_128.hex()}, found {actual.hex()}"
        )
    records = decode_records(
        plaintext, header.record_count, header.data_len, what=f"HRL seq {header.first_seq}"
    )
    return HrlFile(header, plaintext, records)
