"""A progress line on a terminal: how far a command got, how fast, and how long to go.

Written to standard error, and only when it is a terminal: a log file, a
pipe or journald gets the summary line and nothing else. The line is
redrawn in place at most :data:`REDRAW_S` apart and erased at the end.
Every command that can take long draws its progress with it (docs/design.md,
"Names, ports, commands"): ``blockrepl agent sync`` with
:class:`ProgressLine`, a copy that reports ``(done, total)`` with
:func:`copy_progress`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TextIO

#: Seconds between redraws: smooth to the eye, no cost to speak of.
REDRAW_S: Final = 0.2
#: Seconds of history the rate (and so the ETA) is taken over: steady
#: enough not to jump, short enough to follow a change of pace.
RATE_WINDOW_S: Final = 5.0


def human_bytes(count: float) -> str:
    """``count`` bytes in binary units: ``512 B``, ``1.5 MiB``, ``2.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def human_duration(seconds: float) -> str:
    """``seconds`` as ``42s``, ``3m05s`` or ``2h07m``."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole // 60 % 60:02d}m"


@dataclass
class TerminalLine:
    """One line of text redrawn in place, when ``stream`` is a terminal; nothing otherwise."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    _width: int = 0
    enabled: bool = field(init=False)

    def __post_init__(self) -> None:
        self.enabled = self.stream.isatty()

    def draw(self, text: str) -> None:
        if not self.enabled:
            return
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def erase(self) -> None:
        """Clear the line, so that what is written next starts on it."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


@dataclass
class ProgressLine:
    """The progress of one pass: bytes done of the total, and bytes sent.

    Args:
        total: bytes to go through in all.
        stream: where to draw; nothing is drawn unless it is a terminal.
        verb: what is done to the bytes (``compared``, ``copied``).
    """

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    verb: str = "compared"
    _history: list[tuple[float, int]] = field(default_factory=list)
    _drawn_at: float = 0.0
    _line: TerminalLine = field(init=False)

    def __post_init__(self) -> None:
        self._line = TerminalLine(self.stream)

    def update(
        self, done: int, sent: int | None = None, *, phase: str = "", force: bool = False
    ) -> None:
        """Redraw with ``done`` bytes of the total and ``sent`` bytes sent (if any)."""
        now = time.monotonic()
        self._history.append((now, done))
        while len(self._history) > 2 and now - self._history[0][0] > RATE_WINDOW_S:
            self._history.pop(0)
        if not self._line.enabled or (not force and now - self._drawn_at < REDRAW_S):
            return
        self._drawn_at = now
        self._line.draw(self.render(done, sent, phase=phase))

    def render(self, done: int, sent: int | None = None, *, phase: str = "") -> str:
        """The line for ``done`` and ``sent``, with the rate of the recent history."""
        percent = 100.0 * done / self.total if self.total else 100.0
        text = f"{percent:5.1f}%  {self.verb} {human_bytes(done)} of {human_bytes(self.total)}"
        if sent is not None:
            text += f", sent {human_bytes(sent)}"
        (t0, c0), (t1, c1) = self._history[0], self._history[-1]
        if phase:
            text += f"  {phase}"
        elif t1 > t0 and c1 > c0:
            rate = (c1 - c0) / (t1 - t0)
            text += f"  {human_bytes(rate)}/s  ETA {human_duration((self.total - done) / rate)}"
        return text

    def finish(self) -> None:
        """Erase the line: the summary goes where it was."""
        self._line.erase()


def copy_progress(verb: str, stream: TextIO | None = None) -> Callable[[int, int], None] | None:
    """A ``(done, total)`` callback that draws a :class:`ProgressLine`, for a
    copy that reports its progress that way (a disk written at a point).

    Args:
        verb: what the line says is done (``copied``, ``written``).
        stream: where to draw (standard error by default).

    Returns:
        None when ``stream`` is not a terminal: the caller reports nothing.
    """
    target = stream if stream is not None else sys.stderr
    if not target.isatty():
        return None
    line: ProgressLine | None = None

    def show(done: int, total: int) -> None:
        nonlocal line
        if line is None:
            line = ProgressLine(total, target, verb)
        finished = done >= total
        line.update(done, force=finished)
        if finished:
            line.finish()

    return show
