"""Replay the kept inputs of tests/faults/corpus/ through the decoders they target.

``batch/`` and ``hrl/`` hold bodies and files, replayed here; ``admin/`` is
replayed by test_http_fuzz.py; every other folder holds inputs kept by a fuzz
target of the same name (tests/faults/fuzz/targets.py), replayed through it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from protocol.batch import END_OF_STREAM, NEED_DATA, BatchDecoder
from protocol.errors import ProtocolError
from protocol.hrl import open_hrl
from protocol.hrl_receiver import HrlReceiver
from tests.faults.fuzz.targets import CORPUS, KEYRING, TARGETS, check_one, corpus_files

#: Folders of bodies replayed here, or by test_http_fuzz.py.
BODIES = ("batch", "hrl", "admin")


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


def _kept_fuzz_inputs() -> list[Path]:
    folders = sorted(path for path in CORPUS.iterdir() if path.is_dir())
    unknown = [path.name for path in folders if path.name not in (*BODIES, *TARGETS)]
    assert not unknown, f"corpus folders with no fuzz target of their name: {unknown}"
    kept = [folder.name for folder in folders if folder.name not in BODIES]
    return [path for kind in kept for path in corpus_files(kind)]


@pytest.mark.parametrize("path", _kept_fuzz_inputs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_kept_fuzz_inputs_pass_their_target(path: Path) -> None:
    """Only declared errors, and every property of the target that kept the input."""
    check_one(TARGETS[path.parent.name], path.read_bytes())
