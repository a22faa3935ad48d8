"""A queue of received bytes that copies each byte at most once.

The decoders are fed whatever pieces the network delivers (tens to hundreds
of KiB) and hand out whole batches and files (up to 64 MiB). Appending the
pieces to a ``bytearray`` and slicing the result out copies every byte twice,
and the copies are most of a decoder's cost. This queue keeps the pieces as
they came and joins them once, when a whole unit is taken; a unit that is one
piece exactly is handed out without any copy.
"""

from __future__ import annotations

from collections import deque

from protocol.records import Buffer


class ChunkQueue:
    """Bytes in arrival order: :meth:`append` pieces, :meth:`take` units."""

    def __init__(self) -> None:
        self._pieces: deque[memoryview] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, data: Buffer) -> None:
        """Queue ``data``. A ``bytes`` object is kept as it is; others are copied,
        because the caller may reuse its buffer."""
        if not len(data):
            return
        piece = data if isinstance(data, bytes) else bytes(data)
        self._pieces.append(memoryview(piece))
        self._len += len(piece)

    def peek(self, size: int) -> bytes:
        """The first ``size`` bytes (fewer if fewer are queued), left in the queue."""
        size = min(size, self._len)
        out: list[memoryview] = []
        need = size
        for piece in self._pieces:
            if need <= 0:
                break
            out.append(piece[:need])
            need -= len(out[-1])
        return b"".join(out)

    def take(self, size: int) -> bytes:
        """Remove and return exactly the first ``size`` bytes.

        Raises:
            ValueError: fewer than ``size`` bytes are queued (a decoder's bug).
        """
        if size > self._len:
            raise ValueError(f"cannot take {size} bytes from a queue of {self._len}")
        if not size:
            return b""
        self._len -= size
        first = self._pieces[0]
        if len(first) == size:
            self._pieces.popleft()
            whole = first.obj
            if isinstance(whole, bytes) and len(whole) == size:
                return whole
            return bytes(first)
        if len(first) > size:
            self._pieces[0] = first[size:]
            return bytes(first[:size])
        out: list[memoryview] = []
        need = size
        while need:
            piece = self._pieces.popleft()
            if len(piece) > need:
                self._pieces.appendleft(piece[need:])
                piece = piece[:need]
            out.append(piece)
            need -= len(piece)
        return b"".join(out)
