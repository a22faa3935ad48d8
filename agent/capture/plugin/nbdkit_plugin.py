"""The nbdkit plugin of ``blockrepl agent capture``: a write-splitter.

nbdkit serves the source disk over NBD with this plugin; ``blockrepl agent
capture`` starts it as ``nbdkit python nbdkit_plugin.py source=PATH map=PATH
fd=N``, where ``fd`` is the plugin's end of a socketpair to the agent. For
every write, zero and trim of a client, in this order:

1. the request gets the next request id (rid) and its regions are marked
   dirty in the dirty map, durably if a cell changed (dirtymap.py);
2. the source is written (zeroed, punched);
3. the request goes to the agent as a frame (wire.py), its data with it;
4. with FUA, the source is made durable (fdatasync);
5. the client's request is answered once the agent acknowledged the frame:
   the request is journaled, or its range was left dirty for a resync.

Steps 1 to 3 are made under one lock, so the agent gets the requests in the
order the source took them, and the stream replays them in that order.
Reads, flushes and extents go to the source alone.

Standard library only: nbdkit embeds Debian's ``/usr/bin/python3``, not the
agent's environment. It also runs as a plain module in the tests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

# nbdkit loads this file by its path, not as part of the agent package: its
# helpers are found beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if TYPE_CHECKING:
    from agent.capture.plugin import dirtymap, sourceio, wire
else:
    import dirtymap
    import sourceio
    import wire

import nbdkit

T = TypeVar("T")

API_VERSION = 2

#: The smallest request the plugin prefers and the largest it takes (NBD
#: block size limits): 4 KiB is the page and the usual file system block.
PREFERRED_BLOCK_BYTES: Final = 4096
#: Block devices take whole sectors; files take any byte.
FILE_MIN_BLOCK_BYTES: Final = 1


class LinkBrokenError(OSError):
    """The agent is gone: no request can be journaled any more."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, f"the capture agent is gone: {reason}")


class Waiter:
    """One request waiting for the agent's acknowledgement."""

    __slots__ = ("_done", "error", "length", "offset", "status")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.status: wire.AckStatus | None = None
        self.error: str | None = None
        self._done = threading.Event()

    def finish(self, status: wire.AckStatus | None, error: str | None = None) -> None:
        self.status, self.error = status, error
        self._done.set()

    def wait(self) -> wire.AckStatus:
        self._done.wait()
        if self.status is None:
            raise LinkBrokenError(self.error or "no answer")
        return self.status


class Capture:
    """The plugin's state: the source, the dirty map and the link to the agent.

    Args:
        source_path: the source disk.
        map_path: its dirty map (made by the agent).
        fd: the plugin's end of the socketpair to the agent.
    """

    def __init__(self, source_path: str, map_path: str, fd: int) -> None:
        self.source = sourceio.SourceFile(source_path)
        self.map = dirtymap.MappedDirtyMap(map_path, self.source.size)
        self.tracker = dirtymap.RegionTracker(self.map.geometry, self.map.cells, self.map.persist)
        self._sock = socket.socket(fileno=fd)
        #: held from the rid to the frame: the agent sees the source's order
        self._order = threading.Lock()
        #: held while one frame is written: frames never interleave
        self._send_lock = threading.Lock()
        self._waiters: dict[int, Waiter] = {}
        self._waiters_lock = threading.Lock()
        self._rid = 0
        self._broken: str | None = None
        self._closing = False

    # --- the link ------------------------------------------------------------------------

    def start(self) -> None:
        """Greet the agent and start reading its frames (after nbdkit forked)."""
        geometry = self.map.geometry
        self._send(
            wire.Frame(
                wire.FrameType.HELLO,
                wire.PROTOCOL_VERSION,
                os.getpid(),
                geometry.region_bytes,
                self.source.size,
            )
        )
        threading.Thread(target=self._read_loop, name="capture-agent-link", daemon=True).start()

    def stop(self) -> None:
        """nbdkit is done: every request was answered. Flush the map, say goodbye."""
        self._closing = True
        self.map.flush()
        with contextlib.suppress(OSError):  # the agent is gone: the flushed map is what matters
            self._send(wire.Frame(wire.FrameType.BYE))
        self._sock.close()

    def _send(self, frame: wire.Frame) -> None:
        header = wire.encode_header(frame)
        with self._send_lock:
            self._sock.sendall(header)
            if frame.body:
                self._sock.sendall(frame.body)

    def _recv_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            got = self._sock.recv_into(view[done:])
            if got == 0:
                raise EOFError("the agent closed the capture socket")
            done += got
        return buffer

    def _read_loop(self) -> None:
        try:
            while True:
                header = self._recv_exactly(wire.HEADER.size)
                frame, body_len = wire.decode_header(header, allowed=wire.AGENT_TYPES)
                body = self._recv_exactly(body_len) if body_len else b""
                self._handle(frame, body)
        except (OSError, EOFError, wire.WireError) as exc:
            self._break(str(exc))

    def _handle(self, frame: wire.Frame, body: bytes | bytearray) -> None:
        kind = frame.type
        if kind is wire.FrameType.ACK:
            self._acknowledge(frame.offset, frame.rid, wire.AckStatus(frame.flags))
        elif kind is wire.FrameType.SHIPPED:
            self.tracker.shipped(frame.rid)
        elif kind is wire.FrameType.PENDING:
            live = bool(frame.flags & wire.PendingFlags.LIVE)
            pending = self.tracker.mark_pending(wire.decode_ranges(body), frame.rid, live=live)
            done = wire.encode_ranges(pending)
            self._send(wire.Frame(wire.FrameType.PENDING_DONE, rid=frame.rid, body=done))
        elif kind is wire.FrameType.RESYNCED:
            self.tracker.resynced(wire.decode_ranges(body), frame.rid)

    def _acknowledge(self, first: int, last: int, status: wire.AckStatus) -> None:
        with self._waiters_lock:
            waiters = [(rid, self._waiters.pop(rid, None)) for rid in range(first, last + 1)]
        for rid, waiter in waiters:
            if waiter is None:
                continue  # a FAILED request: it has no waiter
            if status is wire.AckStatus.DIRTY:
                self.tracker.left_dirty(waiter.offset, waiter.length, rid)
            waiter.finish(status)

    def _break(self, reason: str) -> None:
        with self._waiters_lock:
            self._broken = reason
            waiters = list(self._waiters.values())
            self._waiters.clear()
        for waiter in waiters:
            waiter.finish(None, reason)
        if not self._closing:
            nbdkit.debug(f"capture: the agent link broke ({reason}); shutting down")
            nbdkit.shutdown()

    # --- requests ------------------------------------------------------------------------

    def submit(
        self,
        kind: wire.FrameType,
        offset: int,
        length: int,
        change: Callable[[], None],
        *,
        flags: int = 0,
        body: memoryview | None = None,
        fua: bool = False,
    ) -> None:
        """Mark, change the source, hand the request to the agent, and wait for its answer.

        Raises:
            OSError: the source refused the change, or the agent is gone.
        """
        with self._order:
            if self._broken is not None:
                raise LinkBrokenError(self._broken)
            self._rid += 1
            rid = self._rid
            self.tracker.begin(offset, length, rid)
            try:
                change()
            except sourceio.NotFastError:
                raise  # the source is untouched: the client falls back to writing zeros
            except OSError:
                self.tracker.left_dirty(offset, length, rid)
                self._send(wire.Frame(wire.FrameType.FAILED, rid=rid, offset=offset, length=length))
                raise
            waiter = Waiter(offset, length)
            with self._waiters_lock:
                if self._broken is not None:
                    raise LinkBrokenError(self._broken)
                self._waiters[rid] = waiter
            self._send(wire.Frame(kind, flags, rid, offset, length, b"" if body is None else body))
        if fua:
            self.source.sync()
        waiter.wait()

    def write(self, data: memoryview, offset: int, *, fua: bool) -> None:
        self.submit(
            wire.FrameType.WRITE,
            offset,
            len(data),
            lambda: self.source.write(data, offset),
            flags=wire.WriteFlags.FUA if fua else 0,
            body=data,
            fua=fua,
        )

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        self.submit(
            wire.FrameType.ZERO,
            offset,
            length,
            lambda: self.source.zero(offset, length, may_trim=may_trim, fast=fast),
            flags=wire.WriteFlags.FUA if fua else 0,
            fua=fua,
        )

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        flags = wire.WriteFlags.TRIM | (wire.WriteFlags.FUA if fua else 0)
        self.submit(
            wire.FrameType.ZERO,
            offset,
            length,
            lambda: self.source.zero(offset, length, may_trim=True, fast=False),
            flags=flags,
            fua=fua,
        )

    def flush(self) -> None:
        self.source.sync()


_settings: dict[str, str] = {}
_capture: Capture | None = None


def _state() -> Capture:
    if _capture is None:
        raise OSError(errno.EIO, "the capture plugin is not started")
    return _capture


def _errno(call: Callable[[], T]) -> T:
    """Run ``call``; an OSError's errno goes to the client instead of EIO."""
    try:
        return call()
    except OSError as exc:
        nbdkit.set_error(exc.errno or errno.EIO)
        raise


# --- nbdkit callbacks ----------------------------------------------------------------------


def thread_model() -> int:
    # Requests run at once; the write path orders itself (Capture.submit).
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    if key not in ("source", "map", "fd"):
        raise ValueError(f"unknown parameter {key}: expected source=, map= and fd=")
    _settings[key] = value


def config_complete() -> None:
    missing = [key for key in ("source", "map", "fd") if key not in _settings]
    if missing:
        raise ValueError(f"missing parameters: {', '.join(key + '=' for key in missing)}")
    if not _settings["fd"].isdigit():
        raise ValueError(f"fd= must be a file descriptor number, found {_settings['fd']!r}")


def after_fork() -> None:
    # Threads and the greeting only now: nbdkit may fork into the background before.
    global _capture  # noqa: PLW0603 - nbdkit calls plain functions; the state is the module's
    _capture = Capture(_settings["source"], _settings["map"], int(_settings["fd"]))
    _capture.start()


def cleanup() -> None:
    if _capture is not None:
        _capture.stop()


def open(readonly: bool) -> int:
    _state()
    return 1


def get_size(handle: int) -> int:
    return _state().source.size


def block_size(handle: int) -> tuple[int, int, int]:
    source = _state().source
    minimum = FILE_MIN_BLOCK_BYTES if source.is_file else sourceio.SECTOR_BYTES
    return minimum, PREFERRED_BLOCK_BYTES, wire.MAX_REQUEST_BYTES


def can_write(handle: int) -> bool:
    return True


def can_flush(handle: int) -> bool:
    return True


def can_fua(handle: int) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(handle: int) -> bool:
    # One file descriptor serves every connection: a flush on one covers all.
    return True


def can_zero(handle: int) -> bool:
    return True


def can_fast_zero(handle: int) -> bool:
    # fallocate zeroes a file's range without writing; a device may write zeros.
    return _state().source.is_file


def can_trim(handle: int) -> bool:
    # A trim punches a hole in a file, which reads back as zeros and travels
    # as a ZERO record. On a device a discard may leave any data behind, so
    # trims are not offered there (clients then do not send them).
    return _state().source.is_file


def can_extents(handle: int) -> bool:
    return _state().source.is_file


def is_rotational(handle: int) -> bool:
    return False


def pread(handle: int, buf: memoryview, offset: int, flags: int) -> None:
    _errno(lambda: _state().source.read_into(buf, offset))


def pwrite(handle: int, buf: memoryview, offset: int, flags: int) -> None:
    capture = _state()
    _errno(lambda: capture.write(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA)))


def zero(handle: int, count: int, offset: int, flags: int) -> None:
    capture = _state()
    may_trim = bool(flags & nbdkit.FLAG_MAY_TRIM)
    fast = bool(flags & nbdkit.FLAG_FAST_ZERO)
    fua = bool(flags & nbdkit.FLAG_FUA)
    _errno(lambda: capture.zero(offset, count, may_trim=may_trim, fast=fast, fua=fua))


def trim(handle: int, count: int, offset: int, flags: int) -> None:
    capture = _state()
    _errno(lambda: capture.trim(offset, count, fua=bool(flags & nbdkit.FLAG_FUA)))


def flush(handle: int, flags: int) -> None:
    _errno(_state().flush)


def extents(handle: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    source = _state().source
    return _errno(lambda: source.extents(offset, count, one=bool(flags & nbdkit.FLAG_REQ_ONE)))
