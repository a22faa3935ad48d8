"""Running a daemon: uvloop, SIGTERM/SIGINT for a graceful stop, and
systemd's readiness protocol (``Type=notify``).

A daemon provides ``start() -> handle`` and ``close(handle)``; this module
runs them on uvloop, tells systemd ``READY=1`` once ``start`` returned (the
ports are open), waits for a stop signal, tells ``STOPPING=1`` and closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import uvloop

log = logging.getLogger("blockrepl.service")

T = TypeVar("T")

#: The signals that stop a daemon gracefully: systemd's stop and Ctrl-C.
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


def sd_notify(state: str) -> bool:
    """Send ``state`` (for example ``READY=1``) to systemd, if it asked for it.

    Returns:
        True if a notification socket was set and the message was sent.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state, exc)
        return False
    return True


async def _serve(start: Callable[[], Awaitable[T]], close: Callable[[T], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    handle = await start()
    sd_notify("READY=1")
    try:
        await stop.wait()
    finally:
        sd_notify("STOPPING=1")
        log.info("stopping")
        await close(handle)


def run_daemon(start: Callable[[], Awaitable[T]], close: Callable[[T], Awaitable[None]]) -> None:
    """Run a daemon on uvloop until SIGTERM or SIGINT.

    Raises:
        whatever ``start`` raises (the caller turns it into an exit status).
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(start, close))
