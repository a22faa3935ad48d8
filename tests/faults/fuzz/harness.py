"""What every fuzz target checks, and what the targets share.

Each target feeds one input to one decoder (inputs.py says how the input is
read) and checks what must hold for *any* input:

- only the decoder's declared errors escape, each with its code and message;
  anything else (an IndexError, a RecursionError, an assertion below) is a
  crash, and atheris keeps the input;
- the memory the input makes the process hold (tracemalloc's peak, when the
  runner traces) stays under :func:`memory_bound`: what the input itself
  takes, plus what the format's limits let a short input ask for;
- what each decoder promises besides: the same batches however a body is cut,
  a decoder that failed stays failed, records and frames that decode encode
  back to the same bytes, a SPEC that parses prints as one that parses the same.

A hang is the runner's to catch (libFuzzer's ``-timeout``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

from protocol.errors import BlockreplError, DecoderFailedError
from protocol.keyring import KeyRing
from protocol.limits import MiB
from protocol.records import Record, Tag, TagKind, Write, Zero

ROOT: Final = Path(__file__).resolve().parents[3]
CORPUS: Final = ROOT / "tests" / "faults" / "corpus"
#: The key ring the HRL corpus (tests/faults/corpus/hrl/) was sealed with.
KEYRING: Final = KeyRing(keys={0x0C0A0B01: bytes(range(32))}, active_id=0x0C0A0B01)
#: The disk the batch corpus is for; the process server names it from the URL.
DISK: Final = "vm01-d0"

#: Memory any input may make the process hold: tracebacks, the interpreter's
#: caches, a few objects per call.
BASE_BYTES: Final = 1 * MiB
#: Per byte of input: the copies a decoder and the harness make of it, and the
#: objects decoded from it (a 17-byte WRITE becomes a record and a view of its
#: data, a few hundred bytes).
BYTES_PER_INPUT_BYTE: Final = 64
#: Memory one decoded record may take (object, view, ints, name).
RECORD_BYTES: Final = 512

SAMPLE_RECORDS: Final[tuple[Record, ...]] = (
    Write(0, b"fuzz" * 64),
    Zero(4096, 8192),
    Tag(TagKind.CRASH, bytes(range(16)), "before-upgrade", 1_700_000_000_000_000_000),
    Write(1 << 40, bytes(range(256))),
    Tag(TagKind.GROUP, bytes(16), "erp round", 2, "erp"),
)


class MemoryBoundError(AssertionError):
    """An input made the process hold more than its bound."""


@dataclass(frozen=True)
class Target:
    """One decoder under fuzzing.

    Args:
        name: how ``python -m tests.faults.fuzz`` and the test name it.
        run: feeds one input; may raise only ``declared`` errors.
        seeds: inputs to start from, in this target's format.
        declared: the errors the decoder declares.
        held_bytes: what the format's limits let even a short input make the
            decoder hold (a payload buffer allocated by a declared length).
        corpus: the folder of tests/faults/corpus/ this target's kept inputs
            are in, as bodies (``batch``, ``hrl``) or as inputs (the others).
        kept: the bytes to keep for an input that crashed (its body, after
            the harness's sealing, for a corpus of bodies).
    """

    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], Iterable[bytes]]
    declared: tuple[type[BaseException], ...]
    held_bytes: int = 0
    corpus: str = ""
    kept: Callable[[bytes], bytes] = bytes


def memory_bound(target: Target, input_len: int) -> int:
    return BASE_BYTES + BYTES_PER_INPUT_BYTE * input_len + target.held_bytes


def check_one(target: Target, data: bytes) -> None:
    """Run one input through ``target`` and check every property above.

    Raises:
        MemoryBoundError, AssertionError, or whatever undeclared error escaped.
    """
    tracing = tracemalloc.is_tracing()
    if tracing:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
    try:
        target.run(data)
    except target.declared as exc:
        check_declared(exc)
    if tracing:
        held = tracemalloc.get_traced_memory()[1] - before
        bound = memory_bound(target, len(data))
        if held > bound:
            raise MemoryBoundError(
                f"{target.name}: a {len(data)}-byte input made the process hold {held} bytes, "
                f"more than its bound of {bound}"
            )


def check_declared(exc: BaseException) -> None:
    """A declared error must say what it is: a code and a message."""
    if isinstance(exc, BlockreplError):
        assert exc.code, exc
        assert exc.message, exc
    else:
        assert str(exc), repr(exc)


def corpus_files(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).glob("*.bin")) if kind else []


# --- scratch files: the targets that read files get their own folder ----------------


@cache
def scratch() -> Path:
    """A folder for the files the targets write, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="blockrepl-fuzz-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def scratch_file(name: str, data: bytes) -> Path:
    path = scratch() / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return path


def stays_failed(call: Callable[[], object]) -> None:
    """A decoder that raised must refuse every later call: its place in the stream is lost."""
    try:
        call()
    except DecoderFailedError:
        return
    raise AssertionError("a decoder that raised was used again without DecoderFailedError")


def kept_and_made(kind: str, made: Callable[[], Iterator[bytes]]) -> Callable[[], Iterator[bytes]]:
    """Seeds: the inputs kept in tests/faults/corpus/KIND, then those ``made`` makes."""

    def seeds() -> Iterator[bytes]:
        for path in corpus_files(kind):
            yield path.read_bytes()
        yield from made()

    return seeds
