"""The process-server pool's failure policy: no failure is answered at once,
a command gives up, a service rides out an outage with a bounded log.

The waits are recorded instead of slept (``asyncio.sleep`` of agent/pool.py
is replaced); the policy, the clients and their errors are the real ones.
"""

from __future__ import annotations

import logging
import ssl
import time

import pytest

from agent import pool as pool_module
from agent.errors import ProcessServerUnavailableError
from agent.pool import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    FAILOVER_AFTER_FAILURES,
    ProcessServerPool,
)

URLS = ("https://ps-a:9443", "https://ps-b:9443")


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []

    async def record(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(pool_module.asyncio, "sleep", record)
    return waited


def _pool(urls: tuple[str, ...] = URLS[:1], *, gives_up: bool = True) -> ProcessServerPool:
    return ProcessServerPool(
        urls, ssl.create_default_context(), request_timeout_s=5, connect_timeout_s=5,
        give_up_after_s=60, gives_up=gives_up,
    )  # fmt: skip


def _down(url: str = URLS[0]) -> ProcessServerUnavailableError:
    return ProcessServerUnavailableError(f"{url}: POST failed: Cannot connect to host")


def _past_the_limit(pool: ProcessServerPool) -> None:
    """An outage that began 61 s ago, without waiting for it."""
    pool._failing_since = time.monotonic() - 61


async def test_a_retry_after_of_zero_still_waits_the_floor(waits: list[float]) -> None:
    pool = _pool()
    for retry_after in (0.0, 0.01, 3.0, 3600.0):
        await pool.failed(ProcessServerUnavailableError("busy", retry_after_s=retry_after))
    assert waits == [BACKOFF_FIRST_S, BACKOFF_FIRST_S, 3.0, 30.0]


async def test_failures_back_off_doubling_to_the_maximum(waits: list[float]) -> None:
    pool = _pool()
    for _ in range(12):
        await pool.failed(_down())
    assert all(w >= BACKOFF_FIRST_S / 2 for w in waits)
    assert waits[0] <= BACKOFF_FIRST_S * 1.5
    assert all(BACKOFF_MAX_S / 2 <= w <= BACKOFF_MAX_S * 1.5 for w in waits[-4:])


async def test_a_command_gives_up_past_the_limit(waits: list[float]) -> None:
    pool = _pool()
    _past_the_limit(pool)
    with pytest.raises(ProcessServerUnavailableError, match="no process server made progress"):
        await pool.failed(_down())


async def test_a_service_never_gives_up_and_reports_once_a_minute(
    waits: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    pool = _pool(URLS, gives_up=False)
    _past_the_limit(pool)
    with caplog.at_level(logging.DEBUG, logger="blockrepl.agent.client"):
        for _ in range(300):
            await pool.failed(_down(pool.current.url))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    reports = [w for w in warnings if w.startswith("no process server made progress")]
    assert len(reports) == 1, warnings
    assert "ps-a:9443: POST failed" in reports[0]
    assert "https://ps-a:9443: https" not in reports[0]
    # Two moves are news (to b, back to a); after every server was tried, moves are debug.
    moves = [w for w in warnings if w.startswith("moving from process server")]
    assert len(moves) == 2, moves
    # Every third failure moves on at once; the others wait, soon the maximum.
    assert len(waits) == 300 - 300 // FAILOVER_AFTER_FAILURES
    assert all(w >= BACKOFF_MAX_S / 2 for w in waits[10:])


async def test_the_first_answer_after_an_outage_is_reported(
    waits: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    pool = _pool(gives_up=False)
    _past_the_limit(pool)
    await pool.failed(_down())
    with caplog.at_level(logging.WARNING, logger="blockrepl.agent.client"):
        pool.succeeded()
    assert "answered again after 61 s" in caplog.text
    assert pool.failing_s == 0


async def test_an_outage_is_timed_from_its_first_failure_not_the_last_exchange(
    waits: list[float],
) -> None:
    pool = _pool()
    pool._failing_since = None
    await pool.failed(_down())  # the first failure after it starts the clock: no give-up
    assert 0 <= pool.failing_s < 1
