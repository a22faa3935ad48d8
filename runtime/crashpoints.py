"""Named crash points, for the fault tests that kill a daemon at an exact step.

``BLOCKREPL_CRASH_AT=NAME:N`` in a daemon's environment makes the N-th pass
through :func:`crash_point` ``NAME`` kill the process with SIGKILL, as power
loss or ``kill -9`` would at that instant. Unset (always, in production), a
crash point is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Final

#: The environment variable that arms one crash point.
ENV: Final = "BLOCKREPL_CRASH_AT"


def _armed() -> tuple[str, int] | None:
    text = os.environ.get(ENV, "")
    name, _, count = text.partition(":")
    if not name:
        return None
    return name, int(count or "1")


_ARMED: Final = _armed()
_lock = threading.Lock()
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here with SIGKILL if ``BLOCKREPL_CRASH_AT`` names this pass."""
    if _ARMED is None or _ARMED[0] != name:
        return
    with _lock:
        _passes[name] = _passes.get(name, 0) + 1
        if _passes[name] == _ARMED[1]:
            os.kill(os.getpid(), signal.SIGKILL)
