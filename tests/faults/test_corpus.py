"""Replay the kept inputs of tests/faults/corpus/ through the decoders they target."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from protocol.batch import END_OF_STREAM, NEED_DATA, BatchDecoder
from protocol.errors import ProtocolError
from protocol.hrl import open_hrl
from protocol.hrl_receiver import HrlReceiver
from protocol.keyring import KeyRing

CORPUS = Path(__file__).parent / "corpus"
#: The key ring the HRL corpus was sealed with.
KEYRING = KeyRing(keys={0x0C0A0B01: bytes(range(32))}, active_id=0x0C0A0B01)


def _files(kind: str) -> list[Path]:
    files = sorted((CORPUS / kind).glob("*.bin"))
    assert files, f"no corpus files in {CORPUS / kind}"
    return files


def _decode_batches(data: bytes, piece: int) -> None:
    decoder = BatchDecoder(expected_disk_id="vm01-d0")
    for start in range(0, len(data), piece):
        decoder.feed(data[start : start + piece])
        while decoder.next_event() is not NEED_DATA:
            pass
    decoder.feed_eof()
    list(decoder.events())


def _receive_hrl(data: bytes) -> None:
    receiver = HrlReceiver()
    receiver.feed(data)
    receiver.feed_eof()
    for _ in range(4):  # header, file, end: then it says so for ever
        if receiver.next_event() in (NEED_DATA, END_OF_STREAM):
            break


def _declared_or_none(run: Callable[[], None]) -> None:
    """Run; an error escaping must be a declared protocol error with its code and message."""
    error: ProtocolError | None = None
    try:
        run()
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.code
        assert error.message


@pytest.mark.parametrize("path", _files("batch"), ids=lambda p: p.name)
@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_batch_corpus_decodes_or_fails_declared(path: Path, piece: int) -> None:
    data = path.read_bytes()
    _declared_or_none(lambda: _decode_batches(data, piece))


@pytest.mark.parametrize("path", _files("hrl"), ids=lambda p: p.name)
def test_hrl_corpus_opens_only_when_whole(path: Path) -> None:
    data = path.read_bytes()
    if path.name == "good.bin":
        assert open_hrl(data, KEYRING).records
        return
    with pytest.raises(ProtocolError):
        open_hrl(data, KEYRING)
    _declared_or_none(lambda: _receive_hrl(data))
