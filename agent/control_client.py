"""Talking to the control sockets of running capture processes (agent/capture/control.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Final

from agent.errors import AgentError

#: Seconds to connect to a control socket: it is local; a capture process
#: that does not accept in that time is stuck.
CONNECT_TIMEOUT_S: Final = 5.0
#: Longest answer line (a status is a few hundred bytes).
MAX_ANSWER_BYTES: Final = 1 << 20


class ControlError(AgentError):
    """A capture process refused a request, or could not be reached."""

    code = "control"
    exit_code = 69  # EX_UNAVAILABLE

    def __init__(self, message: str, *, server_code: str = "unreachable") -> None:
        super().__init__(message, details={"control_error": server_code})
        self.server_code = server_code


class ControlClient:
    """One connection to the control socket of one disk's capture."""

    def __init__(
        self, disk_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.disk_id = disk_id
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, disk_id: str, path: Path) -> ControlClient:
        """Connect to ``path``.

        Raises:
            ControlError: no capture of the disk runs (no socket), or it does not accept.
        """
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=MAX_ANSWER_BYTES),
                CONNECT_TIMEOUT_S,
            )
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                f"disk {disk_id}: its capture is not running (nothing listens on {path})"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise ControlError(f"disk {disk_id}: cannot reach {path}: {exc}") from None
        return cls(disk_id, reader, writer)

    async def call(self, request: dict[str, object]) -> dict[str, object]:
        """Send one request and read its answer.

        Raises:
            ControlError: the answer is a refusal (its code in ``server_code``),
                or the connection ended.
        """
        try:
            self._writer.write(json.dumps(request).encode() + b"\n")
            await self._writer.drain()
            line = await self._reader.readline()
        except (OSError, ValueError) as exc:
            raise ControlError(f"disk {self.disk_id}: the control socket failed: {exc}") from None
        if not line:
            raise ControlError(f"disk {self.disk_id}: the capture process closed the connection")
        try:
            answer = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json parses
            answer = None
        if not isinstance(answer, dict):
            raise ControlError(f"disk {self.disk_id}: expected a JSON object, found {line[:80]!r}")
        if answer.get("ok") is not True:
            code = str(answer.get("error", "unknown"))
            message = str(answer.get("message", ""))
            raise ControlError(f"disk {self.disk_id}: {message}", server_code=code)
        return answer

    def close_now(self) -> None:
        """Close without waiting: the capture releases a hold of this
        connection as soon as it sees the end (a call in flight fails)."""
        self._writer.close()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            return


async def status_of(paths: dict[str, Path]) -> dict[str, dict[str, object]]:
    """Each disk's capture status, or ``{"error": TEXT}`` for one that does not answer."""

    async def one(disk_id: str, path: Path) -> dict[str, object]:
        try:
            client = await ControlClient.connect(disk_id, path)
            try:
                answer = await asyncio.wait_for(client.call({"op": "status"}), CONNECT_TIMEOUT_S)
            finally:
                await client.close()
        except (ControlError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, ControlError) else "no answer in time"
            return {"error": message}
        status = answer.get("status")
        return status if isinstance(status, dict) else {"error": "the status is not an object"}

    results = await asyncio.gather(*(one(disk, path) for disk, path in paths.items()))
    return dict(zip(paths, results, strict=True))
