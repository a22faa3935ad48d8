"""HTTP requests written byte for byte, for requests no client library would send.

A test writes exactly the bytes it means (no length, HTTP/1.0, a chunked body
of only its last chunk, a broken header) and reads the whole answer. A
connection the server closed is opened again for the next request.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

#: Seconds an answer may take before the test calls it a hang.
ANSWER_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    #: the server closed the connection after it
    closed: bool


class RawConnection:
    """Requests over one connection at a time, made by ``connect``."""

    def __init__(self, connect: Callable[[], socket.socket]) -> None:
        self._connect = connect
        self._sock: socket.socket | None = None
        self._buffer = b""
        self.connections = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def request(self, raw: bytes) -> Answer:
        """Send ``raw``; the answer read whole (a hang raises TimeoutError)."""
        if self._sock is None:
            self._sock = self._connect()
            self._sock.settimeout(ANSWER_TIMEOUT_S)
            self.connections += 1
        self._sock.sendall(raw)
        head = self._read_until(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = self._read_exactly(int(headers["content-length"]))
        else:
            body = self._read_to_close()
        closed = headers.get("connection", "").lower() == "close" or "content-length" not in headers
        if raw.split(b"\r\n", 1)[0].endswith(b"HTTP/1.0"):
            closed = True
        if closed:
            self.close()
        return Answer(status, headers, body, closed)

    def _recv(self) -> bytes:
        assert self._sock is not None
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection inside an answer")
        return data

    def _read_until(self, end: bytes) -> bytes:
        while end not in self._buffer:
            self._buffer += self._recv()
        head, _, self._buffer = self._buffer.partition(end)
        return head

    def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._buffer += self._recv()
        body, self._buffer = self._buffer[:count], self._buffer[count:]
        return body

    def _read_to_close(self) -> bytes:
        assert self._sock is not None
        while data := self._sock.recv(65536):
            self._buffer += data
        body, self._buffer = self._buffer, b""
        return body


def tls_connector(port: int, context: ssl.SSLContext) -> Callable[[], socket.socket]:
    """Connections to 127.0.0.1:``port`` over ``context`` (mutual TLS)."""

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT_S)
        return context.wrap_socket(sock, server_hostname="localhost")

    return connect


def unix_connector(path: str) -> Callable[[], socket.socket]:
    """Connections to the Unix socket at ``path``."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(ANSWER_TIMEOUT_S)
        sock.connect(path)
        return sock

    return connect


def without_body(method: str, path: str, how: str) -> bytes:
    """A request that carries no body, in one of the ways HTTP allows: ``how`` is
    ``content-length-0``, ``no-length``, ``chunked-last-only`` or ``http10-no-length``."""
    version = "HTTP/1.0" if how == "http10-no-length" else "HTTP/1.1"
    headers = {
        "content-length-0": "Content-Length: 0\r\n",
        "no-length": "",
        "chunked-last-only": "Transfer-Encoding: chunked\r\n",
        "http10-no-length": "",
    }[how]
    body = "0\r\n\r\n" if how == "chunked-last-only" else ""
    return f"{method} {path} {version}\r\nHost: localhost\r\n{headers}\r\n{body}".encode()


def with_body(method: str, path: str, body: bytes) -> bytes:
    """A request with ``body`` and its Content-Length."""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body
