"""Logging setup: text with and without timestamps, journald priorities, JSON, idempotence."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.config import LoggingConfig
from runtime.logs import is_journal_stream, setup_logging

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_has_utc_timestamps_and_level() -> None:
    stream = io.StringIO()
    setup_logging(LoggingConfig(level="info"), stream=stream)
    logging.getLogger("blockrepl.test").info("cache at %d%%", 42)
    assert re.fullmatch(rf"{TIMESTAMP} INFO blockrepl\.test: cache at 42%\n", stream.getvalue())


def test_level_filters() -> None:
    stream = io.StringIO()
    setup_logging(LoggingConfig(level="warning"), stream=stream)
    logger = logging.getLogger("blockrepl.test")
    logger.info("hidden")
    logger.warning("shown")
    assert "hidden" not in stream.getvalue()
    assert "WARNING blockrepl.test: shown" in stream.getvalue()


def test_journal_stream_drops_timestamps_and_adds_priorities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "journal").open("w+") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert is_journal_stream(stream)
        setup_logging(LoggingConfig(level="debug"), stream=stream)
        logger = logging.getLogger("blockrepl.test")
        logger.debug("d")
        logger.info("i")
        logger.warning("w")
        logger.error("e")
        logger.critical("c")
        stream.flush()
        stream.seek(0)
        assert stream.read().splitlines() == [
            "<7>blockrepl.test: d",
            "<6>blockrepl.test: i",
            "<4>blockrepl.test: w",
            "<3>blockrepl.test: e",
            "<2>blockrepl.test: c",
        ]


def test_journal_stream_of_another_file_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A child whose stderr was redirected inherits JOURNAL_STREAM but not the journal.
    with (tmp_path / "journal").open("w") as journal, (tmp_path / "log").open("w+") as other:
        info = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert not is_journal_stream(other)
        setup_logging(LoggingConfig(), stream=other)
        logging.getLogger("x").warning("m")
        other.seek(0)
        assert re.fullmatch(rf"{TIMESTAMP} WARNING x: m\n", other.read())
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not is_journal_stream(io.StringIO())


def test_json_lines_with_extras_and_exceptions() -> None:
    stream = io.StringIO()
    setup_logging(LoggingConfig(format="json"), stream=stream)
    logger = logging.getLogger("blockrepl.ingest")
    logger.info("batch accepted", extra={"disk": "d1", "seq": 7, "path": Path("/x")})
    try:
        int("boom")
    except ValueError:
        logger.exception("batch failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert re.fullmatch(TIMESTAMP, first.pop("ts"))
    assert first == {
        "level": "info",
        "logger": "blockrepl.ingest",
        "msg": "batch accepted",
        "disk": "d1",
        "seq": 7,
        "path": "/x",
    }
    assert second["level"] == "error"
    assert second["msg"] == "batch failed"
    assert "ValueError: invalid literal" in second["exc"]


def test_setup_twice_does_not_duplicate_lines_and_keeps_other_handlers() -> None:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    setup_logging(LoggingConfig(), stream=first)
    setup_logging(LoggingConfig(format="json"), stream=second)
    logging.getLogger("x").warning("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1
    assert other in logging.getLogger().handlers


def _raise(exc: BaseException) -> None:
    raise exc


def _raised(exc: BaseException) -> BaseException:
    try:
        _raise(exc)
    except BaseException as caught:
        return caught


def test_a_peer_dropping_its_connection_is_one_info_line() -> None:
    stream = io.StringIO()
    setup_logging(LoggingConfig(level="info"), stream=stream)
    server = logging.getLogger("aiohttp.server")
    server.error(
        "Error handling request from %s", "127.0.0.1",
        exc_info=_raised(ConnectionResetError(104, "Connection reset by peer")),
    )  # fmt: skip
    server.error("Error handling request", exc_info=_raised(ValueError("a real bug")))
    lines = stream.getvalue()
    assert re.search(
        r"INFO aiohttp\.server: Error handling request from 127\.0\.0\.1: the peer dropped "
        r"the connection \(\[Errno 104\] Connection reset by peer\)\n",
        lines,
    )
    assert lines.count("Traceback") == 1  # only the real bug keeps its traceback
    assert "ERROR aiohttp.server: Error handling request\nTraceback" in lines
