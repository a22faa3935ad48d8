"""Named crash points and fsync faults, for the fault tests.

``BLOCKREPL_CRASH_AT=NAME:N`` in a daemon's environment makes the N-th pass
through :func:`crash_point` ``NAME`` kill the process with SIGKILL, as power
loss or ``kill -9`` would at that instant; ``NAME:N:stop`` stops it with
SIGSTOP instead, as a machine that hangs (it goes on at SIGCONT).

``BLOCKREPL_FAIL_FSYNC=TEXT:N`` makes the N-th fsync of a path containing
TEXT fail with EIO, as a failing disk does; ``TEXT:N:persistent`` makes that
one and every later one fail. Every fsync of runtime/crashsafe.py goes
through :func:`fsync_fault`.

Unset (always, in production), each is one comparison.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from typing import Final

#: The environment variable that arms one crash point.
ENV: Final = "BLOCKREPL_CRASH_AT"
#: The environment variable that arms an fsync fault.
FSYNC_ENV: Final = "BLOCKREPL_FAIL_FSYNC"


def _armed() -> tuple[str, int, signal.Signals] | None:
    text = os.environ.get(ENV, "")
    name, _, rest = text.partition(":")
    if not name:
        return None
    count, _, mode = rest.partition(":")
    return name, int(count or "1"), signal.SIGSTOP if mode == "stop" else signal.SIGKILL


_ARMED: Final = _armed()
_lock = threading.Lock()
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here with SIGKILL (or stop, with SIGSTOP) if ``BLOCKREPL_CRASH_AT`` names this pass."""
    if _ARMED is None or _ARMED[0] != name:
        return
    with _lock:
        _passes[name] = _passes.get(name, 0) + 1
        hit = _passes[name] == _ARMED[1]
    if hit:
        os.kill(os.getpid(), _ARMED[2])


def _fsync_armed() -> tuple[str, int, bool] | None:
    text, _, rest = os.environ.get(FSYNC_ENV, "").partition(":")
    if not text:
        return None
    count, _, mode = rest.partition(":")
    return text, int(count or "1"), mode == "persistent"


_FSYNC_ARMED: Final = _fsync_armed()


def fsync_fault(path: str | os.PathLike[str]) -> None:
    """Raise EIO here if ``BLOCKREPL_FAIL_FSYNC`` names this fsync of ``path``."""
    if _FSYNC_ARMED is None or _FSYNC_ARMED[0] not in os.fspath(path):
        return
    with _lock:
        count = _passes[FSYNC_ENV] = _passes.get(FSYNC_ENV, 0) + 1
    text, nth, persistent = _FSYNC_ARMED
    if count == nth or (persistent and count > nth):
        raise OSError(errno.EIO, f"fsync fault injected ({FSYNC_ENV}={text}:{nth})")
