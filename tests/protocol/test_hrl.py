"""HRL files: layout, one tamper test per header field, the receiver, fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os

import pytest
import xxhash
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.batch import END_OF_STREAM, NEED_DATA
from protocol.errors import (
    AuthenticationFailedError,
    BadMagicError,
    DecoderFailedError,
    LimitExceededError,
    MalformedError,
    ProtocolError,
    TruncatedError,
    UnknownKeyError,
    UnsupportedVersionError,
)
from protocol.hrl import (
    HRL_HEADER,
    Compression,
    HrlSealer,
    SealedHrl,
    open_hrl,
    parse_header,
)
from protocol.hrl_receiver import FileReceived, HeaderReady, HrlReceiver
from protocol.keyring import HKDF_INFO, KeyRing
from protocol.records import Record, StreamFlags, Tag, TagKind, Write, Zero, encode_records

from .strategies import record_lists

DATA_KEY = bytes(range(32))
SALT = bytes(range(100, 132))
KEYRING = KeyRing({0x0A0B0C0D: DATA_KEY}, 0x0A0B0C0D)
RECORDS: list[Record] = [
    Write(4096, b"log line\n" * 500),
    Zero(0, 4096),
    Tag(TagKind.APP, bytes(16), "nightly", 99),
]


def _seal(records: list[Record] = RECORDS, keyring: KeyRing = KEYRING, **kw: object) -> SealedHrl:
    args: dict[str, object] = {
        "disk_id": "vm01-disk0", "generation": 2, "first_seq": 50, "first_capture_ns": 10,
        "last_capture_ns": 20, "receive_ns": 30, "salt": SALT,
    }  # fmt: skip
    args.update(kw)
    return HrlSealer(keyring).seal_records(records, **args)  # type: ignore[arg-type]


def _hkdf_sha256(key: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869, written out here so the test does not trust the code under test."""
    prk = hmac.new(salt, key, hashlib.sha256).digest()
    out, block = b"", b""
    for i in range((length + 31) // 32):
        block = hmac.new(prk, block + info + bytes([i + 1]), hashlib.sha256).digest()
        out += block
    return out[:length]


def test_round_trip_compressed() -> None:
    sealed = _seal()
    assert sealed.header.compression is Compression.ZSTD
    assert sealed.header.stored_len < sealed.header.plaintext_len
    opened = open_hrl(sealed.to_bytes(), KEYRING)
    assert opened.records == tuple(RECORDS)
    assert opened.header == sealed.header
    assert (opened.header.first_seq, opened.header.last_seq) == (50, 52)


def test_incompressible_records_are_stored_as_is() -> None:
    records: list[Record] = [Write(0, os.urandom(5000))]
    sealed = _seal(records)
    assert sealed.header.compression is Compression.NONE
    assert sealed.header.stored_len == sealed.header.plaintext_len
    assert open_hrl(sealed.to_bytes(), KEYRING).records == tuple(records)


def test_file_matches_the_documented_construction() -> None:
    """Header by hand, key and nonce by RFC 5869, AES-256-GCM with the header as AD."""
    records: list[Record] = [Write(512, b"\x00\x01\x02\x03" * 4)]  # too small for zstd to help
    sealed = _seal(records)
    encoded = encode_records(records)
    plaintext = b"".join(encoded.segments)
    head = (
        b"BRH1" + bytes([1, 0, 0, 10]) + b"vm01-disk0".ljust(64, b"\0")
        + (2).to_bytes(8, "little") + (50).to_bytes(8, "little") + (50).to_bytes(8, "little")
        + (1).to_bytes(4, "little") + (0x0A0B0C0D).to_bytes(4, "little")
        + (10).to_bytes(8, "little") + (20).to_bytes(8, "little") + (30).to_bytes(8, "little")
        + len(plaintext).to_bytes(8, "little") + len(plaintext).to_bytes(8, "little")
        + (16).to_bytes(4, "little") + bytes(4) + SALT + xxhash.xxh3_128_digest(plaintext)
    )  # fmt: skip
    head += xxhash.xxh3_64_intdigest(head).to_bytes(8, "little")
    okm = _hkdf_sha256(DATA_KEY, SALT, HKDF_INFO, 44)
    expected = head + AESGCM(okm[:32]).encrypt(okm[32:], plaintext, head)
    assert sealed.to_bytes() == expected


def test_salts_give_different_ciphertexts() -> None:
    a = _seal(salt=os.urandom(32)).body
    b = _seal(salt=os.urandom(32)).body
    assert a != b


# field -> byte range in the 208-byte header
FIELDS = {
    "magic": (0, 4), "version": (4, 5), "compression": (5, 6), "flags": (6, 7),
    "disk_id_len": (7, 8), "disk_id": (8, 72), "generation": (72, 80),
    "first_seq": (80, 88), "last_seq": (88, 96), "record_count": (96, 100),
    "key_id": (100, 104), "first_capture_ns": (104, 112), "last_capture_ns": (112, 120),
    "receive_ns": (120, 128), "plaintext_len": (128, 136), "stored_len": (136, 144),
    "data_len": (144, 148), "reserved": (148, 152), "kdf_salt": (152, 184),
    "plaintext_xxh3_128": (184, 200), "header_xxh3_64": (200, 208),
}  # fmt: skip


def test_fields_cover_the_whole_header() -> None:
    covered = sorted(b for s, e in FIELDS.values() for b in range(s, e))
    assert covered == list(range(HRL_HEADER.size))


def _reseal_header(data: bytearray) -> None:
    data[200:208] = xxhash.xxh3_64_intdigest(bytes(data[:200])).to_bytes(8, "little")


@pytest.mark.parametrize("field", list(FIELDS))
def test_tampered_header_field_is_detected(field: str) -> None:
    """Every bit of every field, changed, with or without the checksum fixed up,
    is refused: by the header checks, or at the latest by the GCM tag."""
    start, end = FIELDS[field]
    good = _seal().to_bytes()
    for pos in range(start, end):
        for bit in (0x01, 0x80):
            for fix_checksum in (False, True):
                data = bytearray(good)
                data[pos] ^= bit
                if fix_checksum and field != "header_xxh3_64":
                    _reseal_header(data)
                with pytest.raises(ProtocolError):
                    open_hrl(bytes(data), KEYRING)


def test_checksum_fixed_tamper_of_a_free_field_is_caught_by_the_tag() -> None:
    data = bytearray(_seal().to_bytes())
    data[120] ^= 0x01  # receive_ns: any value is valid, only the tag can tell
    _reseal_header(data)
    parse_header(data)  # the header alone looks fine
    with pytest.raises(AuthenticationFailedError):
        open_hrl(bytes(data), KEYRING)


@pytest.mark.parametrize("where", ["ciphertext", "tag"])
def test_body_bit_flip_fails_authentication(where: str) -> None:
    data = bytearray(_seal().to_bytes())
    data[HRL_HEADER.size + 5 if where == "ciphertext" else -1] ^= 0x04
    with pytest.raises(AuthenticationFailedError):
        open_hrl(bytes(data), KEYRING)


def test_truncated_and_extended_files_are_refused() -> None:
    data = _seal().to_bytes()
    for cut in (0, 3, 100, HRL_HEADER.size, len(data) - 1):
        with pytest.raises(TruncatedError):
            open_hrl(data[:cut], KEYRING)
    with pytest.raises(MalformedError, match="must be"):
        open_hrl(data + b"\0", KEYRING)


def test_unknown_key_and_wrong_key() -> None:
    data = _seal().to_bytes()
    with pytest.raises(UnknownKeyError):
        open_hrl(data, KeyRing({7: DATA_KEY}, 7))
    with pytest.raises(AuthenticationFailedError):
        open_hrl(data, KeyRing({0x0A0B0C0D: os.urandom(32)}, 0x0A0B0C0D))


def test_rotation_reads_old_files_and_seals_with_the_active_key() -> None:
    old = _seal()
    rotated = KeyRing({0x0A0B0C0D: DATA_KEY, 0x0E: os.urandom(32)}, 0x0E)
    new = _seal(keyring=rotated)
    assert new.header.key_id == 0x0E
    assert open_hrl(old.to_bytes(), rotated).records == tuple(RECORDS)
    assert open_hrl(new.to_bytes(), rotated).records == tuple(RECORDS)


@pytest.mark.parametrize(
    ("offset", "value", "error"),
    [
        (0, b"BRB1", BadMagicError),
        (4, b"\x09", UnsupportedVersionError),
        (5, b"\x07", MalformedError),
        (88, (51).to_bytes(8, "little"), MalformedError),
        (100, bytes(4), MalformedError),
        (128, (2**40).to_bytes(8, "little"), LimitExceededError),
        (148, b"\x01\0\0\0", MalformedError),
    ],
)
def test_invalid_header_values_are_refused_before_decryption(
    offset: int, value: bytes, error: type[ProtocolError]
) -> None:
    data = bytearray(_seal().to_bytes())
    data[offset : offset + len(value)] = value
    _reseal_header(data)
    with pytest.raises(error):
        parse_header(bytes(data))


def test_zstd_must_save_bytes() -> None:
    """stored_len >= plaintext_len with zstd is a non-canonical encoding."""
    data = bytearray(_seal().to_bytes())
    data[136:144] = data[128:136]
    _reseal_header(data)
    with pytest.raises(MalformedError, match="stored_len <"):
        parse_header(bytes(data))


def test_stored_bytes_that_are_no_zstd_frame_are_malformed() -> None:
    """A file that authenticates but whose stored bytes have no zstd frame header."""
    sealed = _seal()
    assert sealed.header.compression is Compression.ZSTD
    header = sealed.header_bytes
    file_key = KEYRING.file_key(sealed.header.key_id, sealed.header.kdf_salt)
    not_zstd = bytes(sealed.header.stored_len)
    body = AESGCM(file_key.key).encrypt(file_key.nonce, not_zstd, header)
    with pytest.raises(MalformedError, match="zstd frame header is invalid"):
        open_hrl(header + body, KEYRING)


def test_sealer_parses_back_and_checks_fields() -> None:
    with pytest.raises(MalformedError):
        _seal(salt=b"short")
    with pytest.raises(MalformedError):
        _seal(flags=StreamFlags.RESYNC_END)
    with pytest.raises(MalformedError):
        HrlSealer(KEYRING, zstd_level=0)


# --- the receiver --------------------------------------------------------------------


def _receive(data: bytes, chunk: int, **kw: object) -> list[object]:
    receiver = HrlReceiver(**kw)  # type: ignore[arg-type]
    events: list[object] = []
    for i in range(0, len(data), chunk):
        receiver.feed(data[i : i + chunk])
        while (event := receiver.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, FileReceived):
                break
    receiver.feed_eof()
    events.append(receiver.next_event())
    return events


@pytest.mark.parametrize("chunk", [1, 13, 208, 10**6])
def test_receiver_yields_header_then_file(chunk: int) -> None:
    sealed = _seal()
    events = _receive(sealed.to_bytes(), chunk)
    assert events == [
        HeaderReady(sealed.header),
        FileReceived(sealed.header, sealed.to_bytes()),
        END_OF_STREAM,
    ]


def test_receiver_refuses_trailing_bytes() -> None:
    data = _seal().to_bytes()
    receiver = HrlReceiver()
    receiver.feed(data + b"x")
    with pytest.raises(MalformedError, match="after the end"):
        receiver.next_event()
    with pytest.raises(DecoderFailedError):
        receiver.next_event()


def test_receiver_refuses_trailing_bytes_fed_later() -> None:
    receiver = HrlReceiver()
    receiver.feed(_seal().to_bytes())
    assert isinstance(receiver.next_event(), HeaderReady)
    assert isinstance(receiver.next_event(), FileReceived)
    with pytest.raises(MalformedError):
        receiver.feed(b"\0")


def test_receiver_truncation_and_size_limit() -> None:
    data = _seal().to_bytes()
    receiver = HrlReceiver()
    receiver.feed(data[:-1])
    assert isinstance(receiver.next_event(), HeaderReady)
    receiver.feed_eof()
    with pytest.raises(TruncatedError, match="body"):
        receiver.next_event()
    limited = HrlReceiver(max_file_len=len(data) - 1)
    limited.feed(data[: HRL_HEADER.size])
    with pytest.raises(LimitExceededError):
        limited.next_event()


@pytest.mark.parametrize("chunk", [1, 13, 208, 10**6])
def test_a_run_receiver_yields_each_file_in_turn(chunk: int) -> None:
    files = [_seal(first_seq=seq) for seq in (1, 2, 3)]
    data = b"".join(f.to_bytes() for f in files)
    receiver = HrlReceiver(run=True)
    events: list[object] = []
    for i in range(0, len(data), chunk):
        receiver.feed(data[i : i + chunk])
        while (event := receiver.next_event()) is not NEED_DATA:
            events.append(event)
    receiver.feed_eof()
    events.append(receiver.next_event())
    expected: list[object] = []
    for f in files:
        expected += [HeaderReady(f.header), FileReceived(f.header, f.to_bytes())]
    assert events == [*expected, END_OF_STREAM]


def test_a_run_receiver_refuses_a_run_that_ends_inside_a_file() -> None:
    receiver = HrlReceiver(run=True)
    receiver.feed(_seal().to_bytes() + _seal().to_bytes()[:-1])
    assert isinstance(receiver.next_event(), HeaderReady)
    assert isinstance(receiver.next_event(), FileReceived)
    assert isinstance(receiver.next_event(), HeaderReady)
    receiver.feed_eof()
    with pytest.raises(TruncatedError, match="body"):
        receiver.next_event()
    empty = HrlReceiver(run=True)
    empty.feed_eof()
    with pytest.raises(TruncatedError, match="header"):
        empty.next_event()


def test_receiver_bad_magic_on_first_byte() -> None:
    receiver = HrlReceiver()
    receiver.feed(b"{")
    with pytest.raises(BadMagicError):
        receiver.next_event()


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(records=record_lists, seq=st.integers(1, 2**40), level=st.integers(1, 6))
def test_round_trip_property(records: list[Record], seq: int, level: int) -> None:
    sealed = HrlSealer(KEYRING, zstd_level=level).seal_records(
        records, disk_id="d", generation=1, first_seq=seq, first_capture_ns=0,
        last_capture_ns=0, receive_ns=0, salt=os.urandom(32),
    )  # fmt: skip
    assert open_hrl(sealed.to_bytes(), KEYRING).records == tuple(records)


@settings(max_examples=400)
@given(st.binary(max_size=700))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    for attempt in (lambda: open_hrl(data, KEYRING), lambda: _receive(data, 17)):
        with contextlib.suppress(ProtocolError):
            attempt()


@settings(max_examples=300)
@given(data=st.data())
def test_mutated_files_raise_only_protocol_errors(data: st.DataObject) -> None:
    body = bytearray(_seal().to_bytes())
    pos = data.draw(st.integers(0, len(body) - 1))
    body[pos] ^= data.draw(st.integers(1, 255))  # always a change
    if data.draw(st.booleans()) and pos < 200:
        _reseal_header(body)
    cut = data.draw(st.integers(0, len(body)))
    with pytest.raises(ProtocolError):
        open_hrl(bytes(body[:cut]) if cut < len(body) else bytes(body), KEYRING)
