"""Undo files: layout, one tamper test per header field, chunk rules, fuzzing."""

from __future__ import annotations

import os

import pytest
import xxhash
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.compression import Compression
from protocol.errors import (
    AuthenticationFailedError,
    BadMagicError,
    LimitExceededError,
    MalformedError,
    ProtocolError,
    TruncatedError,
    UnknownKeyError,
    UnsupportedVersionError,
)
from protocol.hrl import HrlSealer, open_hrl
from protocol.keyring import KeyRing
from protocol.records import Record, Write, Zero, encode_records
from protocol.undo import (
    MAX_UNDO_CHUNKS,
    MAX_UNDO_PLAINTEXT,
    MAX_UNDO_RECORDS,
    UNDO_HEADER,
    UndoHeader,
    open_undo,
    parse_undo_header,
    seal_undo,
)

from .strategies import ids, writes, zeros
from .test_hrl import _hkdf_sha256

DATA_KEY = bytes(range(32))
SALT = bytes(range(100, 132))
KEYRING = KeyRing({0x0A0B0C0D: DATA_KEY}, 0x0A0B0C0D)
#: Before-images as the journal captures them: data that was there, and zeros.
RECORDS: list[Record] = [Write(4096, b"log line\n" * 500), Zero(0, 4096)]
#: The HKDF info of docs/protocol.md, written out: undo files derive keys as HRL files do.
DOC_HKDF_INFO = b"blockrepl hrl v1 aes-256-gcm key+nonce"

before_images = st.lists(st.one_of(writes, zeros), min_size=1, max_size=12)


def _compressor(level: int = 1) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level, write_checksum=False)


def _seal(records: list[Record] = RECORDS, keyring: KeyRing = KEYRING, **kw: object) -> bytes:
    """Chunk 1 of 3 by default, so that a changed chunk number can still look valid."""
    args: dict[str, object] = {
        "disk_id": "vm01-disk0", "generation": 2, "first_seq": 50, "last_seq": 57,
        "chunk": 1, "chunks": 3, "capture_ns": 20, "salt": SALT,
    }  # fmt: skip
    args.update(kw)
    return seal_undo(records, keyring=keyring, compressor=_compressor(), **args)  # type: ignore[arg-type]


def test_round_trip_compressed() -> None:
    data = _seal()
    opened = open_undo(data, KEYRING)
    assert opened.header.compression is Compression.ZSTD
    assert opened.header.stored_len < opened.header.plaintext_len
    assert opened.records == tuple(RECORDS)
    assert opened.header == parse_undo_header(data)
    h = opened.header
    assert (h.disk_id, h.generation, h.first_seq, h.last_seq) == ("vm01-disk0", 2, 50, 57)
    assert (h.chunk, h.chunks, h.record_count, h.capture_ns) == (1, 3, 2, 20)
    assert h.file_len == len(data)


def test_incompressible_records_are_stored_as_is() -> None:
    records: list[Record] = [Write(0, os.urandom(5000)), Zero(5000, 10**9)]
    opened = open_undo(_seal(records), KEYRING)
    assert opened.header.compression is Compression.NONE
    assert opened.header.stored_len == opened.header.plaintext_len
    assert opened.records == tuple(records)


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.ZSTD])
def test_file_matches_the_documented_construction(compression: Compression) -> None:
    """Header by hand, key and nonce by RFC 5869, AES-256-GCM with the header as AD."""
    records: list[Record] = (
        [Write(512, b"\x00\x01\x02\x03" * 4)]  # too small for zstd to help
        if compression is Compression.NONE
        else [Write(512, b"\x00" * 4000), Zero(8192, 2**20)]
    )
    data = _seal(records, chunk=0, chunks=1)
    encoded = encode_records(records)
    plaintext = b"".join(encoded.segments)
    stored = plaintext if compression is Compression.NONE else _compressor().compress(plaintext)
    head = (
        b"BRU1" + bytes([1, compression, 0, 10]) + b"vm01-disk0".ljust(64, b"\0")
        + (2).to_bytes(8, "little") + (50).to_bytes(8, "little") + (57).to_bytes(8, "little")
        + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")
        + len(records).to_bytes(4, "little") + (0x0A0B0C0D).to_bytes(4, "little")
        + (20).to_bytes(8, "little")
        + len(plaintext).to_bytes(8, "little") + len(stored).to_bytes(8, "little")
        + encoded.data_len.to_bytes(4, "little") + bytes(4)
        + SALT + xxhash.xxh3_128_digest(plaintext)
    )  # fmt: skip
    head += xxhash.xxh3_64_intdigest(head).to_bytes(8, "little")
    assert len(head) == UNDO_HEADER.size == 200
    okm = _hkdf_sha256(DATA_KEY, SALT, DOC_HKDF_INFO, 44)
    expected = head + AESGCM(okm[:32]).encrypt(okm[32:], stored, head)
    assert data == expected


def test_salts_give_different_ciphertexts() -> None:
    a = _seal(salt=os.urandom(32))
    b = _seal(salt=os.urandom(32))
    assert a[UNDO_HEADER.size :] != b[UNDO_HEADER.size :]


# field -> byte range in the 200-byte header
FIELDS = {
    "magic": (0, 4), "version": (4, 5), "compression": (5, 6), "reserved": (6, 7),
    "disk_id_len": (7, 8), "disk_id": (8, 72), "generation": (72, 80),
    "first_seq": (80, 88), "last_seq": (88, 96), "chunk": (96, 100), "chunks": (100, 104),
    "record_count": (104, 108), "key_id": (108, 112), "capture_ns": (112, 120),
    "plaintext_len": (120, 128), "stored_len": (128, 136), "data_len": (136, 140),
    "reserved2": (140, 144), "kdf_salt": (144, 176), "plaintext_xxh3_128": (176, 192),
    "header_xxh3_64": (192, 200),
}  # fmt: skip


def test_fields_cover_the_whole_header() -> None:
    covered = sorted(b for s, e in FIELDS.values() for b in range(s, e))
    assert covered == list(range(UNDO_HEADER.size))


def _reseal_header(data: bytearray) -> None:
    data[192:200] = xxhash.xxh3_64_intdigest(bytes(data[:192])).to_bytes(8, "little")


@pytest.mark.parametrize("field", list(FIELDS))
def test_tampered_header_field_is_detected(field: str) -> None:
    """Every bit of every field, changed, with or without the checksum fixed up,
    is refused: by the header checks, or at the latest by the GCM tag."""
    start, end = FIELDS[field]
    good = _seal()
    for pos in range(start, end):
        for bit in range(8):
            for fix_checksum in (False, True):
                data = bytearray(good)
                data[pos] ^= 1 << bit
                if fix_checksum and field != "header_xxh3_64":
                    _reseal_header(data)
                with pytest.raises(ProtocolError):
                    open_undo(bytes(data), KEYRING)


@pytest.mark.parametrize(
    ("offset", "flip"),
    [(96, 0x01), (100, 0x08), (112, 0x01), (80, 0x01), (150, 0x10), (180, 0x01)],
    ids=["chunk", "chunks", "capture_ns", "first_seq", "kdf_salt", "plaintext_xxh3_128"],
)
def test_checksum_fixed_tamper_of_a_free_field_is_caught_by_the_tag(offset: int, flip: int) -> None:
    data = bytearray(_seal())
    data[offset] ^= flip  # still a valid value: only the tag can tell
    _reseal_header(data)
    parse_undo_header(data)  # the header alone looks fine
    with pytest.raises(AuthenticationFailedError):
        open_undo(bytes(data), KEYRING)


@pytest.mark.parametrize("where", ["ciphertext", "tag"])
def test_body_bit_flip_fails_authentication(where: str) -> None:
    data = bytearray(_seal())
    data[UNDO_HEADER.size + 5 if where == "ciphertext" else -1] ^= 0x04
    with pytest.raises(AuthenticationFailedError):
        open_undo(bytes(data), KEYRING)


# --- chunk and seq rules ------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "chunks"), [(3, 3), (4, 3), (0, 0), (0, MAX_UNDO_CHUNKS + 1), (2**32 - 1, 1)]
)
def test_chunk_outside_its_part_is_refused_by_the_writer(chunk: int, chunks: int) -> None:
    with pytest.raises(MalformedError, match="chunk"):
        _seal(chunk=chunk, chunks=chunks)


def test_every_chunk_of_the_largest_part_is_accepted() -> None:
    for chunk in (0, MAX_UNDO_CHUNKS - 1):
        data = _seal(chunk=chunk, chunks=MAX_UNDO_CHUNKS)
        assert open_undo(data, KEYRING).header.chunk == chunk


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (96, (3).to_bytes(4, "little")),  # chunk = chunks
        (96, (7).to_bytes(4, "little")),  # chunk > chunks
        (100, bytes(4)),  # chunks 0
        (100, (MAX_UNDO_CHUNKS + 1).to_bytes(4, "little")),
        (80, (58).to_bytes(8, "little")),  # first_seq > last_seq
        (88, (49).to_bytes(8, "little")),  # last_seq < first_seq
        (80, bytes(8)),  # seq 0
        (72, bytes(8)),  # generation 0
        (88, (2**63).to_bytes(8, "little")),  # above the seq range
    ],
)
def test_chunk_and_seq_rules_are_checked_before_decryption(offset: int, value: bytes) -> None:
    data = bytearray(_seal())
    data[offset : offset + len(value)] = value
    _reseal_header(data)
    with pytest.raises(MalformedError):
        parse_undo_header(bytes(data))
    with pytest.raises(MalformedError):
        open_undo(bytes(data), KEYRING)


def test_writer_refuses_first_seq_after_last_seq() -> None:
    with pytest.raises(MalformedError, match="first <= last"):
        _seal(first_seq=58, last_seq=57)
    assert open_undo(_seal(first_seq=57, last_seq=57), KEYRING).header.first_seq == 57


@pytest.mark.parametrize(
    ("offset", "value", "error"),
    [
        (0, b"BRH1", BadMagicError),  # an HRL file's magic
        (4, b"\x02", UnsupportedVersionError),
        (5, b"\x07", MalformedError),
        (6, b"\x01", MalformedError),
        (7, b"\x00", MalformedError),
        (104, bytes(4), LimitExceededError),
        (104, (MAX_UNDO_RECORDS + 1).to_bytes(4, "little"), LimitExceededError),
        (108, bytes(4), MalformedError),
        (112, (2**63).to_bytes(8, "little"), MalformedError),
        (120, (MAX_UNDO_PLAINTEXT + 1).to_bytes(8, "little"), LimitExceededError),
        (136, (2**31).to_bytes(4, "little"), MalformedError),
        (140, b"\x01\0\0\0", MalformedError),
    ],
)
def test_invalid_header_values_are_refused_before_decryption(
    offset: int, value: bytes, error: type[ProtocolError]
) -> None:
    data = bytearray(_seal())
    data[offset : offset + len(value)] = value
    _reseal_header(data)
    with pytest.raises(error):
        parse_undo_header(bytes(data))


def test_zstd_must_save_bytes() -> None:
    """stored_len >= plaintext_len with zstd is a non-canonical encoding."""
    data = bytearray(_seal())
    data[128:136] = data[120:128]
    _reseal_header(data)
    with pytest.raises(MalformedError, match="smaller"):
        parse_undo_header(bytes(data))


def test_none_must_store_the_plaintext_length() -> None:
    data = bytearray(_seal([Write(0, os.urandom(300))]))
    assert data[5] == Compression.NONE
    data[128:136] = (int.from_bytes(data[120:128], "little") - 1).to_bytes(8, "little")
    _reseal_header(data)
    with pytest.raises(MalformedError, match="equal plaintext_len"):
        parse_undo_header(bytes(data))


def test_undo_and_hrl_files_are_never_taken_for_each_other() -> None:
    """An undo file applied forward would undo a disk: the magics keep them apart."""
    hrl = HrlSealer(KEYRING).seal_records(
        RECORDS, disk_id="vm01-disk0", generation=2, first_seq=50, first_capture_ns=1,
        last_capture_ns=2, receive_ns=3, salt=SALT,
    )  # fmt: skip
    with pytest.raises(BadMagicError):
        open_undo(hrl.to_bytes(), KEYRING)
    with pytest.raises(BadMagicError):
        open_hrl(_seal(), KEYRING)


# --- length and keys ----------------------------------------------------------------


def test_truncated_and_extended_files_are_refused() -> None:
    data = _seal()
    for cut in (0, 3, 100, UNDO_HEADER.size - 1, UNDO_HEADER.size, len(data) - 1):
        with pytest.raises(TruncatedError):
            open_undo(data[:cut], KEYRING)
    with pytest.raises(MalformedError, match="must be"):
        open_undo(data + b"\0", KEYRING)


def test_unknown_key_and_wrong_key() -> None:
    data = _seal()
    with pytest.raises(UnknownKeyError):
        open_undo(data, KeyRing({7: DATA_KEY}, 7))
    with pytest.raises(AuthenticationFailedError):
        open_undo(data, KeyRing({0x0A0B0C0D: os.urandom(32)}, 0x0A0B0C0D))


def test_rotation_reads_old_files_and_seals_with_the_active_key() -> None:
    old = _seal()
    rotated = KeyRing({0x0A0B0C0D: DATA_KEY, 0x0E: os.urandom(32)}, 0x0E)
    new = _seal(keyring=rotated)
    assert parse_undo_header(new).key_id == 0x0E
    assert open_undo(old, rotated).records == tuple(RECORDS)
    assert open_undo(new, rotated).records == tuple(RECORDS)


def test_writer_checks_fields() -> None:
    with pytest.raises(MalformedError):
        _seal(salt=b"short")
    with pytest.raises(MalformedError):
        _seal(disk_id="../etc")
    with pytest.raises(MalformedError):
        _seal(capture_ns=2**63)
    with pytest.raises(LimitExceededError):
        _seal([])


# --- properties -----------------------------------------------------------------------


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=before_images,
    seqs=st.tuples(st.integers(1, 2**63 - 1), st.integers(1, 2**63 - 1)).map(sorted),
    chunks=st.integers(1, MAX_UNDO_CHUNKS),
    data=st.data(),
    level=st.integers(1, 6),
)
def test_round_trip_property(
    records: list[Record], seqs: list[int], chunks: int, data: st.DataObject, level: int
) -> None:
    chunk = data.draw(st.integers(0, chunks - 1))
    disk_id = data.draw(ids)
    sealed = seal_undo(
        records, keyring=KEYRING, compressor=_compressor(level), disk_id=disk_id,
        generation=1, first_seq=seqs[0], last_seq=seqs[1], chunk=chunk, chunks=chunks,
        capture_ns=0, salt=os.urandom(32),
    )  # fmt: skip
    opened = open_undo(sealed, KEYRING)
    assert opened.records == tuple(records)
    assert (opened.header.disk_id, opened.header.chunk, opened.header.chunks) == (
        disk_id, chunk, chunks,
    )  # fmt: skip


@settings(max_examples=200)
@given(
    generation=st.integers(1, 2**63 - 1),
    capture_ns=st.integers(0, 2**63 - 1),
    key_id=st.integers(1, 2**32 - 1),
    salt=st.binary(min_size=32, max_size=32),
    digest=st.binary(min_size=16, max_size=16),
)
def test_header_round_trip_property(
    generation: int, capture_ns: int, key_id: int, salt: bytes, digest: bytes
) -> None:
    header = UndoHeader(
        disk_id="d", generation=generation, first_seq=1, last_seq=2, chunk=0, chunks=1,
        record_count=1, key_id=key_id, capture_ns=capture_ns, plaintext_len=100,
        stored_len=60, data_len=84, kdf_salt=salt, plaintext_xxh3_128=digest,
    )  # fmt: skip
    raw = header.pack()
    assert len(raw) == UNDO_HEADER.size
    assert parse_undo_header(raw) == header


@settings(max_examples=400)
@given(st.binary(max_size=700))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        open_undo(data, KEYRING)


@settings(max_examples=100)
@given(st.binary(min_size=UNDO_HEADER.size - 8, max_size=UNDO_HEADER.size - 8))
def test_random_headers_with_a_valid_checksum_raise_only_protocol_errors(body: bytes) -> None:
    """Past the checksum, with the magic and version right: every field rule is reached."""
    data = bytearray(b"BRU1\x01" + body[5:] + bytes(8) + bytes(64))
    _reseal_header(data)
    with pytest.raises(ProtocolError):
        open_undo(bytes(data), KEYRING)


@settings(max_examples=300)
@given(data=st.data())
def test_mutated_files_raise_only_protocol_errors(data: st.DataObject) -> None:
    body = bytearray(_seal())
    pos = data.draw(st.integers(0, len(body) - 1))
    body[pos] ^= data.draw(st.integers(1, 255))  # always a change
    if data.draw(st.booleans()) and pos < 192:
        _reseal_header(body)
    cut = data.draw(st.integers(0, len(body)))
    with pytest.raises(ProtocolError):
        open_undo(bytes(body[:cut]) if cut < len(body) else bytes(body), KEYRING)
