"""What the fuzz targets read, and the sealing the harness does for the fuzzer.

A *stream* target (the batch decoder, the HRL receiver) reads::

    input = control:u8 || piece_len:u16le * (control & 0x0f) || body

and feeds ``body`` in pieces of those lengths, taken in turn (a 0 is an empty
piece), or whole when there are none. A *file* target (undo files, journal
entries) reads ``control:u8 || body``. Bits of ``control``:

- RESEAL (0x80): before feeding, the harness fixes what an honest writer
  computes — header checksums, payload digests and, for an encrypted file,
  the GCM tag — as the writer of the format would. A fuzzer cannot invert
  XXH3 or forge a tag; without this it never gets past the first checksum,
  and every field check, the decompression and the record decoder behind it
  go unfuzzed. For an encrypted file, ``body`` is then ``header || stored``
  (the plaintext, or its zstd frame) and the harness encrypts ``stored``.
- REUSE (0x40, streams): every piece is fed from one buffer that the harness
  overwrites as soon as ``feed`` returns, as a server reusing its read buffer.

The seeds are the kept corpus and the product's own encoders, in these
formats; :func:`stream_input` and :func:`file_input` make them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import xxhash
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol import headers
from protocol.batch import BATCH_HEADER
from protocol.compression import Compression
from protocol.errors import ProtocolError
from protocol.hrl import HRL_HEADER
from protocol.keyring import KeyRing
from protocol.limits import GCM_TAG_BYTES, MiB
from protocol.records import Buffer
from protocol.undo import UNDO_HEADER

RESEAL: Final = 0x80
REUSE: Final = 0x40
#: Piece lengths a stream input may list (the low four bits of ``control``).
PIECES_MASK: Final = 0x0F
PIECE_LEN: Final = struct.Struct("<H")

#: Where a batch header keeps payload_len, payload_xxh3_128 and its checksum
#: (the table of protocol/batch.py).
BATCH_PAYLOAD_LEN_AT: Final = 112
BATCH_DIGEST_AT: Final = 120

#: The harness decompresses a zstd frame to fix a file's plaintext digest
#: only up to this size: enough for any frame the fuzzer grows from the
#: seeds; the decoder under test still decompresses larger ones.
RESEAL_DECOMPRESS_LIMIT: Final = 1 * MiB

#: Bytes the harness's buffer holds a piece in, for REUSE.
OVERWRITE: Final = 0xA5


@dataclass(frozen=True, slots=True)
class StreamInput:
    pieces: tuple[int, ...]
    reseal: bool
    reuse: bool
    body: bytes


@dataclass(frozen=True, slots=True)
class FileInput:
    reseal: bool
    body: bytes


def parse_stream(data: bytes) -> StreamInput:
    """Split a stream target's input; a short input lists fewer pieces."""
    if not data:
        return StreamInput((), reseal=False, reuse=False, body=b"")
    control = data[0]
    count = min(control & PIECES_MASK, (len(data) - 1) // PIECE_LEN.size)
    end = 1 + count * PIECE_LEN.size
    pieces = tuple(PIECE_LEN.unpack_from(data, 1 + i * PIECE_LEN.size)[0] for i in range(count))
    return StreamInput(pieces, bool(control & RESEAL), bool(control & REUSE), data[end:])


def stream_input(
    body: bytes, pieces: Sequence[int] = (), *, reseal: bool = False, reuse: bool = False
) -> bytes:
    """The input that feeds ``body`` in ``pieces`` (at most 15 lengths)."""
    control = len(pieces) | (RESEAL if reseal else 0) | (REUSE if reuse else 0)
    return bytes([control]) + b"".join(PIECE_LEN.pack(n) for n in pieces) + body


def parse_file(data: bytes) -> FileInput:
    if not data:
        return FileInput(reseal=False, body=b"")
    return FileInput(bool(data[0] & RESEAL), data[1:])


def file_input(body: bytes, *, reseal: bool = False, flags: int = 0) -> bytes:
    return bytes([flags | (RESEAL if reseal else 0)]) + body


def cut(body: bytes, pieces: Sequence[int]) -> Iterator[bytes]:
    """``body`` in pieces of the given lengths, in turn; whole if they are all 0."""
    if not any(pieces):
        yield body
        return
    at = 0
    while at < len(body):
        for length in pieces:
            yield body[at : at + length]
            at += length


def fed(stream: StreamInput, body: bytes) -> Iterator[Buffer]:
    """The pieces of ``body`` as the input says to feed them (see REUSE)."""
    if not stream.reuse:
        yield from cut(body, stream.pieces)
        return
    buffer = bytearray(max((*stream.pieces, len(body))))
    for piece in cut(body, stream.pieces):
        view = memoryview(buffer)[: len(piece)]
        view[:] = piece
        yield view
        view[:] = bytes([OVERWRITE]) * len(piece)  # the server's next read lands here
        view.release()


def reseal_batches(body: bytes) -> bytes:
    """``body`` with every batch's payload digest and header checksum made right.

    Batches are found as the decoder finds them: a header, then payload_len
    bytes. A payload cut short keeps its digest; the header is still sealed.
    """
    out = bytearray(body)
    at = 0
    while len(out) - at >= BATCH_HEADER.size:
        (payload_len,) = struct.unpack_from("<Q", out, at + BATCH_PAYLOAD_LEN_AT)
        end = at + BATCH_HEADER.size + payload_len
        if end <= len(out):
            payload = bytes(out[at + BATCH_HEADER.size : end])
            out[at + BATCH_DIGEST_AT : at + BATCH_DIGEST_AT + 16] = xxhash.xxh3_128_digest(payload)
        out[at : at + BATCH_HEADER.size] = headers.seal(bytes(out[at : at + BATCH_HEADER.size]))
        at = end
    return bytes(out)


@dataclass(frozen=True, slots=True)
class SealedLayout:
    """Where an encrypted file's header keeps what sealing computes."""

    header_size: int
    compression_at: int
    key_id_at: int
    plaintext_len_at: int
    salt_at: int
    digest_at: int


#: The tables of protocol/hrl.py and protocol/undo.py.
HRL_LAYOUT: Final = SealedLayout(HRL_HEADER.size, 5, 100, 128, 152, 184)
UNDO_LAYOUT: Final = SealedLayout(UNDO_HEADER.size, 5, 108, 120, 144, 176)


def seal_file(data: bytes, layout: SealedLayout, keyring: KeyRing) -> bytes:
    """``header || stored`` sealed as its writer would: plaintext digest (when
    the plaintext is known), header checksum, then AES-256-GCM over ``stored``
    with the header as associated data. A key id that is not in the ring gets
    a zero tag."""
    if len(data) < layout.header_size:
        return data
    header = bytearray(data[: layout.header_size])
    stored = data[layout.header_size :]
    plaintext = _plaintext(header, stored, layout)
    if plaintext is not None:
        header[layout.digest_at : layout.digest_at + 16] = xxhash.xxh3_128_digest(plaintext)
    sealed = headers.seal(bytes(header))
    try:
        key = keyring.file_key(*_key_of(sealed, layout))
    except ProtocolError:
        return sealed + stored + bytes(GCM_TAG_BYTES)
    return sealed + AESGCM(key.key).encrypt(key.nonce, stored, sealed)


def unseal_file(data: bytes, layout: SealedLayout, keyring: KeyRing) -> bytes | None:
    """``header || stored`` of a file that authenticates, else None (a seed for RESEAL)."""
    header = data[: layout.header_size]
    if len(header) < layout.header_size:
        return None
    try:
        key = keyring.file_key(*_key_of(header, layout))
        stored = AESGCM(key.key).decrypt(key.nonce, data[layout.header_size :], header)
    except (ProtocolError, InvalidTag, ValueError):
        return None
    return header + stored


def _key_of(header: bytes, layout: SealedLayout) -> tuple[int, bytes]:
    (key_id,) = struct.unpack_from("<I", header, layout.key_id_at)
    return key_id, header[layout.salt_at : layout.salt_at + 32]


def _plaintext(header: bytearray, stored: bytes, layout: SealedLayout) -> bytes | None:
    if header[layout.compression_at] == Compression.NONE:
        return stored
    (plaintext_len,) = struct.unpack_from("<Q", header, layout.plaintext_len_at)
    if header[layout.compression_at] != Compression.ZSTD or plaintext_len > RESEAL_DECOMPRESS_LIMIT:
        return None
    try:
        if zstandard.frame_content_size(stored) != plaintext_len:
            return None
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=plaintext_len)
    except zstandard.ZstdError:
        return None
