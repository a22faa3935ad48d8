"""Logging to standard error: for a terminal, for journald, or as JSON lines.

Three shapes, chosen by :class:`~runtime.config.LoggingConfig` and the
environment:

* text on a terminal or into a file: ``2026-11-22T02:19:32.123Z INFO name: message``;
* text into journald (systemd sets ``JOURNAL_STREAM`` to the device and inode
  of the stream it connected): no timestamp, as the journal adds its own, and a
  ``<N>`` syslog priority prefix so ``journalctl -p`` filters by level;
* ``format = "json"``: one JSON object per line, with any ``extra=`` fields.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Final, TextIO

from runtime.config import LoggingConfig

#: syslog priorities by logging level, for journald's ``<N>`` prefix (sd-daemon(3)).
SYSLOG_PRIORITY: Final = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

#: The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_RECORD_FIELDS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


class _InstalledHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`setup_logging` installs; its class marks it for replacement."""


class UtcTextFormatter(logging.Formatter):
    """``2026-11-22T02:19:32.123Z INFO name: message``: UTC, so logs of two sites line up."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The record's time as ISO 8601 in UTC, without the milliseconds."""
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))


class JournalTextFormatter(logging.Formatter):
    """``<6>name: message``: journald stamps the time and reads the priority."""

    def format(self, record: logging.LogRecord) -> str:
        """The record with its syslog priority prefix."""
        priority = SYSLOG_PRIORITY.get(record.levelno, _nearest_priority(record.levelno))
        return f"<{priority}>{record.name}: {super().format(record)}"


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, extras, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, object] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_RECORD_FIELDS and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot hold (a Path) still gets logged.
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(config: LoggingConfig, *, stream: TextIO | None = None) -> None:
    """Send the root logger's records to ``stream`` in the configured format and level.

    Calling it again replaces the handler it installed before (so a reload
    does not print every line twice) and leaves other handlers alone.

    Args:
        config: level and format.
        stream: where to write; standard error (at call time) by default.
    """
    target = sys.stderr if stream is None else stream
    handler = _InstalledHandler(target)
    handler.addFilter(_quiet_peer_resets)
    if config.format == "json":
        handler.setFormatter(JsonLineFormatter())
    elif is_journal_stream(target):
        handler.setFormatter(JournalTextFormatter())
    else:
        handler.setFormatter(UtcTextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _InstalledHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level_number)


def is_journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journald connection systemd named in ``JOURNAL_STREAM``.

    systemd.exec(5): the variable holds ``DEVICE:INODE`` of the stream; a
    child whose standard error was redirected elsewhere inherits the variable
    but not the stream, hence the comparison.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        # No file descriptor (an in-memory stream) or a closed one: not the journal.
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def _utc_iso(created: float) -> str:
    """A record time as ``2026-11-22T02:19:32.123Z``."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


def _nearest_priority(levelno: int) -> int:
    """The priority of the highest standard level at or below a custom level."""
    standard = [level for level in SYSLOG_PRIORITY if level <= levelno]
    return SYSLOG_PRIORITY[max(standard)] if standard else SYSLOG_PRIORITY[logging.DEBUG]


def _quiet_peer_resets(record: logging.LogRecord) -> bool:
    """Log a client that dropped its connection as one INFO line, not an ERROR traceback.

    aiohttp logs "Error handling request" with a traceback at ERROR when a
    peer resets or closes mid-request: on a replication link that is a
    network event the sender recovers from (it resends from its last
    acknowledgement), not an error of the daemon that anyone must act on.
    """
    if record.name.startswith("aiohttp.") and record.exc_info:
        exc = record.exc_info[1]
        if isinstance(exc, ConnectionError):
            record.msg = f"{record.getMessage()}: the peer dropped the connection ({exc})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
    return True
