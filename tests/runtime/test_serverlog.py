"""What aiohttp's server logs, sorted: malformed requests counted and throttled,
handler failures kept with their traceback within a bound, debug lines as they are."""

from __future__ import annotations

import logging

import pytest
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, LineTooLong
from prometheus_client import CollectorRegistry

from runtime.serverlog import ERROR_BURST, MALFORMED_BURST, RequestLogs, ServerLog, reason_label
from runtime.throttle import LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _log(clock: Clock, counts: list[tuple[str, str]]) -> ServerLog:
    return ServerLog(
        "data", lambda listener, reason: counts.append((listener, reason)),
        LogThrottle(MALFORMED_BURST, 1.0), LogThrottle(ERROR_BURST, 10.0), clock=clock,
    )  # fmt: skip


def test_reasons_are_bounded_names_of_aiohttps_exceptions() -> None:
    assert reason_label(BadStatusLine("x")) == "bad-status-line"
    assert reason_label(BadHttpMethod("x")) == "bad-http-method"
    assert reason_label(LineTooLong("x", "8190")) == "line-too-long"


def test_malformed_requests_are_counted_every_time_and_logged_a_few_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, counts = Clock(), []
    server_log = _log(clock, counts)
    with caplog.at_level(logging.DEBUG, logger="blockrepl.http"):
        for _ in range(1000):
            server_log.exception(
                "Error handling request from %s", "192.0.2.7", exc_info=BadStatusLine("'\\x16'")
            )
        clock.now = 1.0
        server_log.exception(
            "Error handling request from %s", "192.0.2.7", exc_info=BadStatusLine("'\\x16'")
        )
    assert counts == [("data", "bad-status-line")] * 1001
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * (MALFORMED_BURST + 1)
    assert all(r.exc_info is None for r in caplog.records)  # no traceback
    first, last = caplog.records[0].getMessage(), caplog.records[-1].getMessage()
    assert first.startswith("malformed request from 192.0.2.7 on the data listener, answered 400")
    assert "bad-status-line" in first
    assert last.endswith(f"({1000 - MALFORMED_BURST} more like it held back)")
    assert caplog.records[0].listener == "data"  # type: ignore[attr-defined]


def test_a_handler_failure_keeps_its_traceback_within_a_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, counts = Clock(), []
    server_log = _log(clock, counts)
    with caplog.at_level(logging.DEBUG, logger="blockrepl.http"):
        for _ in range(50):
            server_log.exception(
                "Error handling request from %s", "192.0.2.7", exc_info=RuntimeError("a bug")
            )
        server_log.debug("Ignored premature client disconnection")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == ERROR_BURST
    assert all(r.exc_info is not None for r in errors)
    assert counts == []
    assert caplog.records[-1].getMessage() == "Ignored premature client disconnection"


def test_each_daemon_counts_in_its_own_registry() -> None:
    registry = CollectorRegistry()
    logs = RequestLogs(registry, "blockrepl_test")
    logs.for_listener("admin").exception("from %s", "peer", exc_info=BadStatusLine("x"))
    labels = {"listener": "admin", "reason": "bad-status-line"}
    assert registry.get_sample_value("blockrepl_test_malformed_requests_total", labels) == 1.0
