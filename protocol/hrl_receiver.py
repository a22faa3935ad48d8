"""Receiving HRL files from a byte stream (the body of a PUT), sans-IO.

The receiver checks each header as soon as its 208 bytes are in (so a server
refuses a file for the wrong disk or seq before it reads the body), then
hands out the file's exact bytes. A body holds one file, or with ``run`` a
run of files back to back (docs/api.md: the shipper sends a disk's
consecutive cached files in one PUT); without it, bytes past the file are
refused. It does not decrypt: :func:`protocol.hrl.open_hrl` verifies each
whole file.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.batch import NEED_DATA, Sentinel
from protocol.chunks import ChunkQueue
from protocol.errors import (
    BadMagicError,
    LimitExceededError,
    MalformedError,
    ProtocolError,
    TruncatedError,
)
from protocol.headers import FailsOnce
from protocol.hrl import HRL_HEADER, HRL_MAGIC, HrlHeader, parse_header
from protocol.records import Buffer


@dataclass(frozen=True, slots=True)
class HeaderReady:
    """The header arrived and passed its checks; the body is still coming."""

    header: HrlHeader


@dataclass(frozen=True, slots=True)
class FileReceived:
    """Every byte of the file arrived (not yet decrypted: see :func:`open_hrl`)."""

    header: HrlHeader
    data: bytes


HrlEvent = HeaderReady | FileReceived | Sentinel


class HrlReceiver(FailsOnce):
    """Incremental receiver of HRL files from a byte stream (a PUT body).

    Yields :class:`HeaderReady` as soon as a header is checked, so a server
    can refuse a file for the wrong disk or seq before reading its body; then
    :class:`FileReceived` with the exact bytes of the file; with ``run``, the
    same for each next file; then END_OF_STREAM once :meth:`feed_eof` is
    called between two files. Without ``run``, bytes past the file are
    refused. Memory is bounded by the header's declared size, itself bounded
    by the limits, plus what the caller feeds at once.

    Args:
        max_file_len: refuse a header declaring a longer file (a daemon's
            request size limit).
        run: take files back to back until the end of input.

    After it raises, the receiver is unusable.
    """

    def __init__(self, *, max_file_len: int | None = None, run: bool = False) -> None:
        self._max = max_file_len
        self._run = run
        self._queue = ChunkQueue()
        self._header: HrlHeader | None = None
        self._announced = False
        self._done = False
        self._eof = False
        self._name = "HRL receiver"

    def feed(self, data: Buffer) -> None:
        """Add bytes of the file."""
        self._check_usable()
        if self._eof:
            self._fail(ProtocolError("HRL stream: bytes fed after the end of input"))
        if self._done and len(data) and not self._run:
            assert self._header is not None
            self._fail(
                MalformedError(
                    f"HRL stream: {len(data)} bytes after the end of the "
                    f"{self._header.file_len}-byte file"
                )
            )
        self._queue.append(data)
        if not self._run and self._header is not None and len(self._queue) > self._header.file_len:
            self._fail(
                MalformedError(
                    f"HRL stream: {len(self._queue) - self._header.file_len} bytes after "
                    f"the end of the {self._header.file_len}-byte file"
                )
            )

    def feed_eof(self) -> None:
        """Mark the end of input."""
        self._check_usable()
        self._eof = True

    def next_event(self) -> HrlEvent:
        """The next event, or NEED_DATA.

        Raises:
            ProtocolError: the bytes break a rule; the receiver is unusable.
        """
        return self._step(self._next)

    def _next(self) -> HrlEvent:
        if self._done and self._run and len(self._queue):
            self._done, self._header, self._announced = False, None, False  # the next file
        if self._done:
            return Sentinel.END_OF_STREAM if self._eof else NEED_DATA
        if self._header is None:
            prefix = self._queue.peek(len(HRL_MAGIC))
            if not HRL_MAGIC.startswith(prefix):
                raise BadMagicError(f"HRL file must start with {HRL_MAGIC!r}, found {prefix!r}")
            if len(self._queue) < HRL_HEADER.size:
                return self._need("header")
            header = parse_header(self._queue.peek(HRL_HEADER.size))
            if self._max is not None and header.file_len > self._max:
                raise LimitExceededError(
                    f"HRL file may be at most {self._max} bytes here, its header declares "
                    f"{header.file_len}",
                    details={"max_file_bytes": self._max},
                )
            if not self._run and len(self._queue) > header.file_len:
                raise MalformedError(
                    f"HRL stream: {len(self._queue) - header.file_len} bytes after the end "
                    f"of the {header.file_len}-byte file"
                )
            self._header = header
        if not self._announced:
            self._announced = True
            return HeaderReady(self._header)
        if len(self._queue) < self._header.file_len:
            return self._need("body")
        self._done = True
        data = self._queue.take(self._header.file_len)
        return FileReceived(self._header, data)

    def _need(self, what: str) -> HrlEvent:
        if self._eof:
            raise TruncatedError(
                f"HRL stream ended inside the {what} ({len(self._queue)} bytes received)"
            )
        return NEED_DATA
