"""Running a daemon: uvloop, SIGTERM/SIGINT for a graceful stop, SIGHUP for a
reload, and systemd's notification protocol (``Type=notify``, ``WatchdogSec=``).

A daemon provides ``start() -> handle``, ``close(handle)`` and, optionally,
``reload(handle)``; this module runs them on uvloop and tells systemd what
happens (sd_notify(3)):

* ``READY=1`` once ``start`` returned (the ports are open);
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a SIGHUP starts a reload, and
  ``READY=1`` again when it is over, whatever its outcome (a refused reload
  leaves the daemon running as before);
* ``WATCHDOG=1`` every half of ``WatchdogSec=`` (``$WATCHDOG_USEC``), sent from
  the event loop, so that a loop stuck in a blocking call stops the pings and
  systemd restarts the daemon;
* ``STOPPING=1`` when SIGTERM or SIGINT arrives, before ``close`` drains the
  requests in flight.

A SIGHUP that arrives while the daemon starts is kept and served once it is
ready (its default action would kill the process); several SIGHUPs during a
reload make one more reload, not several.

A task the daemon cannot work without (a disk's applier, a shipper) is
registered with :func:`vital`: if it ends on an unexpected error, the error
is logged as critical and the daemon stops and exits with
:data:`EX_SOFTWARE`, so that systemd restarts it (``Restart=on-failure``)
and it recovers its state from disk, rather than running on with one disk
silently stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import uvloop

log = logging.getLogger("blockrepl.service")

T = TypeVar("T")

#: The signals that stop a daemon gracefully: systemd's stop and Ctrl-C.
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
#: The signal that reloads the configuration (``systemctl reload``, ``ExecReload=``).
RELOAD_SIGNAL: Final = signal.SIGHUP
#: Watchdog pings per ``WatchdogSec=``: sd_watchdog_enabled(3) advises half
#: the interval, so one late ping never trips the watchdog.
WATCHDOG_PINGS_PER_INTERVAL: Final = 2
#: The exit status after a vital task died on a bug (sysexits.h EX_SOFTWARE).
EX_SOFTWARE: Final = 70

#: Set by :func:`_serve` while a daemon runs: what a dying vital task triggers.
_stop_on_crash: list[Callable[[str], None]] = []


def vital(task: asyncio.Task[T]) -> asyncio.Task[T]:
    """Make ``task`` one the daemon stops without (see the module's text).

    Outside :func:`run_daemon` (tests that run a daemon in-process) the
    error is only logged.
    """

    def done(finished: asyncio.Task[T]) -> None:
        if finished.cancelled() or finished.exception() is None:
            return
        log.critical(
            "task %s stopped on an unexpected error; the daemon exits to be restarted",
            finished.get_name(),
            exc_info=finished.exception(),
        )
        for stop in _stop_on_crash:
            stop(finished.get_name())

    task.add_done_callback(done)
    return task


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


def watchdog_interval_s() -> float | None:
    """Seconds between watchdog pings systemd asked for, or None (sd_watchdog_enabled(3)).

    systemd sets ``WATCHDOG_USEC`` to ``WatchdogSec=`` and ``WATCHDOG_PID`` to
    the main process; a child that inherited the variables must not ping.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / WATCHDOG_PINGS_PER_INTERVAL


async def _ping_watchdog(interval_s: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


async def _serve_reloads(requested: asyncio.Event, reload: Callable[[], Awaitable[object]]) -> None:
    """Run one reload per burst of SIGHUPs, one at a time."""
    while True:
        await requested.wait()
        requested.clear()
        # MONOTONIC_USEC lets systemd (Type=notify-reload) tell this reload from an older one.
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            await reload()
        except Exception:
            # A bug, not a refused config (reload reports those itself): keep
            # replicating with what is running, and say so loudly.
            log.exception("the reload failed; the daemon keeps running as before")
        finally:
            sd_notify("READY=1")


async def _serve(
    start: Callable[[], Awaitable[T]],
    close: Callable[[T], Awaitable[None]],
    reload: Callable[[T], Awaitable[object]] | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_requested = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    # Installed before start: SIGHUP's default action would kill a daemon
    # that is still recovering its state.
    loop.add_signal_handler(RELOAD_SIGNAL, reload_requested.set)
    crashed: list[str] = []

    def stop_on_crash(name: str) -> None:
        crashed.append(name)
        stop.set()

    _stop_on_crash.append(stop_on_crash)
    try:
        await _serve_started(start, close, reload, stop, reload_requested)
    finally:
        _stop_on_crash.remove(stop_on_crash)
    if crashed:
        raise SystemExit(EX_SOFTWARE)


async def _serve_started(
    start: Callable[[], Awaitable[T]],
    close: Callable[[T], Awaitable[None]],
    reload: Callable[[T], Awaitable[object]] | None,
    stop: asyncio.Event,
    reload_requested: asyncio.Event,
) -> None:
    loop = asyncio.get_running_loop()
    handle = await start()
    sd_notify("READY=1")
    helpers: list[asyncio.Task[None]] = []
    interval = watchdog_interval_s()
    if interval is not None:
        helpers.append(asyncio.create_task(_ping_watchdog(interval), name="watchdog"))
    if reload is not None:
        helpers.append(
            asyncio.create_task(
                _serve_reloads(reload_requested, lambda: reload(handle)), name="reloads"
            )
        )
    else:
        loop.remove_signal_handler(RELOAD_SIGNAL)
        loop.add_signal_handler(
            RELOAD_SIGNAL, lambda: log.warning("this daemon reloads nothing: restart it")
        )
    try:
        await stop.wait()
    finally:
        sd_notify("STOPPING=1")
        log.info("stopping")
        try:
            await close(handle)
        finally:
            for task in helpers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def run_daemon(
    start: Callable[[], Awaitable[T]],
    close: Callable[[T], Awaitable[None]],
    reload: Callable[[T], Awaitable[object]] | None = None,
) -> None:
    """Run a daemon on uvloop until SIGTERM or SIGINT; SIGHUP calls ``reload``.

    Args:
        start: opens everything and returns the daemon's handle.
        close: drains and closes the daemon.
        reload: rereads the configuration; it reports a refused reload
            itself (log, metrics) and must not raise for one.

    Raises:
        whatever ``start`` raises (the caller turns it into an exit status).
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(start, close, reload))
