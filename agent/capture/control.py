"""The control socket of a capture process: its status, and the steps of a tag round.

A Unix stream socket, ``STATE_DIR/capture/DISK.sock`` (mode 0600, in a
0700 folder: the agent's user and root only). One JSON object per line
each way (docs/protocol.md, "Control socket"):

- ``{"op": "status"}`` → ``{"ok": true, "status": {...}}``;
- ``{"op": "hold", "timeout_s": T, "max_s": M}`` → ``{"ok": true}`` once no
  write of the disk can join the stream (``max_s`` optional);
- ``{"op": "tag", "kind": "crash"|"app"|"group", "name": N, "tag_id": HEX,
  "time_ns": NS, "group": G}`` → ``{"ok": true, "generation": G, "seq": S,
  "consistent": B}`` (``group`` with kind ``group`` only);
- ``{"op": "release"}`` → ``{"ok": true}``.

A hold takes the disk's append lock: writes that arrive meanwhile wait for
their answer (the client's write does not complete), so no write that
depends on a completed write of another disk can come before the tag. A
hold ends at ``release``, when the connection ends, or after the capture's
``hold_max_s`` or the hold's own ``max_s`` — whichever is first — so a
coordinator that dies or stops cannot stall the machine: a consistency
group's round bounds its holds to its barrier (docs/groups.md) here, in the
capture process, not only in the agent that asked. Errors are
``{"ok": false, "error": CODE, "message": TEXT}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from agent.capture.replication import CaptureReplication
from protocol.errors import BlockreplError
from protocol.records import TAG_ID_BYTES, Tag, TagKind, check_record

log = logging.getLogger("blockrepl.agent.capture")

#: Longest request line: a tag name is at most 128 bytes; anything near this is not ours.
MAX_LINE_BYTES: Final = 64 * 1024
#: A socket path must fit ``sun_path`` (108 bytes with its terminating zero).
MAX_SOCKET_PATH_BYTES: Final = 107
SOCKET_MODE: Final = 0o600
TAG_KINDS: Final = {"crash": TagKind.CRASH, "app": TagKind.APP, "group": TagKind.GROUP}


def control_path(state_dir: Path, disk_id: str) -> Path:
    return state_dir / "capture" / f"{disk_id}.sock"


class Hold:
    """The disk's append lock, held for a tag round, released once whatever happens."""

    def __init__(self, lock: asyncio.Lock, max_s: float, disk_id: str) -> None:
        self._lock = lock
        self._disk_id = disk_id
        self.expired = False
        self.released = False
        #: a tag is being appended: an expiry waits for it (appends never overlap)
        self.busy = False
        self._timer = asyncio.get_running_loop().call_later(max_s, self._expire, max_s)

    def _expire(self, max_s: float) -> None:
        log.warning(
            "disk %s: a tag round held writes for %g s, its longest (capture.hold_max_s or "
            "the round's own bound); released",
            self._disk_id,
            max_s,
        )
        self.expired = True
        if not self.busy:
            self.release()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._timer.cancel()
            self._lock.release()


class ControlServer:
    """Serves the control socket of one capture process.

    Args:
        path: the socket's path.
        replication: the disk's stream side.
        hold_max_s: the longest a hold lasts.
        status: the status to answer (the daemon adds its own facts).
    """

    def __init__(
        self,
        path: Path,
        replication: CaptureReplication,
        hold_max_s: float,
        status: Callable[[], dict[str, object]],
    ) -> None:
        self.path = path
        self._replication = replication
        self._hold_max_s = hold_max_s
        self._status = status
        self._server: asyncio.Server | None = None
        self._holds: set[Hold] = set()

    async def start(self) -> None:
        """Listen (a socket file left by a killed run is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_LINE_BYTES
        )
        os.chmod(self.path, SOCKET_MODE)

    async def close(self) -> None:
        for hold in list(self._holds):
            hold.release()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hold: list[Hold] = []
        try:
            while line := await reader.readline():
                answer = await self._answer(line, hold)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ValueError, ConnectionError):  # a line over the limit, a peer gone
            pass
        finally:
            self._release(hold)
            writer.close()

    async def _answer(self, line: bytes, hold: list[Hold]) -> dict[str, object]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json parses
            request = None
        if not isinstance(request, dict):
            return _error("malformed", "expected one JSON object per line")
        op = request.get("op")
        handlers = {"status": self._answer_status, "hold": self._hold, "tag": self._tag,
                    "release": self._answer_release}  # fmt: skip
        handler = handlers.get(str(op))
        if handler is None:
            return _error("malformed", f"expected op status, hold, tag or release, found {op!r}")
        try:
            return await handler(request, hold)
        except BlockreplError as exc:
            return _error(exc.code, exc.message)

    async def _answer_status(self, _: dict[str, object], __: list[Hold]) -> dict[str, object]:
        return {"ok": True, "status": self._status()}

    async def _answer_release(self, _: dict[str, object], hold: list[Hold]) -> dict[str, object]:
        self._release(hold)
        return {"ok": True}

    def _release(self, hold: list[Hold]) -> None:
        for held in hold:
            held.release()
            self._holds.discard(held)
        hold.clear()

    async def _hold(self, request: dict[str, object], hold: list[Hold]) -> dict[str, object]:
        if hold and not hold[0].released:
            return _error("busy", "this connection holds the disk already")
        hold.clear()
        timeout = request.get("timeout_s")
        if not _positive(timeout):
            return _error("malformed", f"expected timeout_s above 0, found {timeout!r}")
        max_s = request.get("max_s", self._hold_max_s)
        if not _positive(max_s):
            return _error("malformed", f"expected max_s above 0, found {max_s!r}")
        assert isinstance(timeout, int | float)
        assert isinstance(max_s, int | float)
        try:
            await asyncio.wait_for(self._replication.lock.acquire(), timeout)
        except TimeoutError:
            return _error("timeout", f"the disk's writes could not be held within {timeout:g} s")
        held = Hold(self._replication.lock, min(max_s, self._hold_max_s), self._replication.disk_id)
        hold.append(held)
        self._holds.add(held)
        return {"ok": True}

    async def _tag(self, request: dict[str, object], hold: list[Hold]) -> dict[str, object]:
        if not hold or hold[0].released:
            why = (
                "it expired (its max_s or capture.hold_max_s)"
                if hold and hold[0].expired
                else "none was"
            )
            return _error("not-held", f"a tag needs the disk held first; {why}")
        kind = TAG_KINDS.get(str(request.get("kind")))
        name, tag_id, time_ns = request.get("name"), request.get("tag_id"), request.get("time_ns")
        group = request.get("group", "")
        if kind is None or not isinstance(name, str) or not isinstance(tag_id, str):
            return _error("malformed", "expected kind crash, app or group, a name and a tag_id")
        if not isinstance(group, str) or (kind is TagKind.GROUP) != bool(group):
            return _error("malformed", "expected a group id with kind group, and only then")
        if not isinstance(time_ns, int) or isinstance(time_ns, bool):
            return _error("malformed", f"expected time_ns as an integer, found {time_ns!r}")
        try:
            raw_id = bytes.fromhex(tag_id)
        except ValueError:
            raw_id = b""
        if len(raw_id) != TAG_ID_BYTES:
            return _error("malformed", f"expected a tag_id of {TAG_ID_BYTES * 2} hex digits")
        tag = Tag(kind, raw_id, name, time_ns, group)
        check_record(tag)
        held = hold[0]
        held.busy = True
        try:
            generation, seq, consistent = await self._replication.append_tag(tag)
        finally:
            held.busy = False
            if held.expired:
                held.release()
        return {"ok": True, "generation": generation, "seq": seq, "consistent": consistent}


def _positive(value: object) -> bool:
    """A number of seconds above 0 (JSON booleans are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _error(code: str, message: str) -> dict[str, object]:
    return {"ok": False, "error": code, "message": message}
