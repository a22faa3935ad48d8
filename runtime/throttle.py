"""A bound on how many lines a repeated event may write to the log.

Whatever a peer does — thousands of malformed requests a second, a process
server away for hours — a daemon's log must stay readable and its disk must
not fill: the first lines of a burst go out, then at most a steady trickle,
and the next line that goes out says how many were held back meanwhile.

:class:`LogThrottle` is a token bucket that decides; it reads no clock of its
own (the caller passes ``now``), so its decisions are testable as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LogThrottle:
    """At most ``burst`` lines at once, then one line every ``every_s`` seconds.

    Args:
        burst: lines that may go out back to back after a quiet spell.
        every_s: seconds that earn one more line, up to ``burst``.
    """

    burst: int
    every_s: float
    _tokens: float = field(init=False)
    _last: float | None = field(default=None, init=False)
    #: lines held back since the last one that went out
    held_back: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.burst < 1 or not self.every_s > 0:
            raise ValueError(
                f"expected burst >= 1 and every_s > 0, found {self.burst} and {self.every_s}"
            )
        self._tokens = float(self.burst)

    def take(self, now: float) -> int | None:
        """Whether a line may go out at ``now`` (monotonic seconds).

        Returns:
            None when the line must be held back; otherwise how many lines
            were held back before it (0 most of the time), to say in it.
        """
        if self._last is not None:
            earned = max(0.0, now - self._last) / self.every_s
            self._tokens = min(float(self.burst), self._tokens + earned)
        self._last = now
        if self._tokens < 1.0:
            self.held_back += 1
            return None
        self._tokens -= 1.0
        held, self.held_back = self.held_back, 0
        return held


def held_back_note(held: int) -> str:
    """`` (N like it held back)`` for a line that follows held-back lines, else ``""``."""
    return f" ({held} more like it held back)" if held else ""
