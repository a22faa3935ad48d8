"""Operations tests start the daemons as processes: none may outlive its test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.daemons import RUNNING


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    yield
    while RUNNING:
        RUNNING.pop().kill_if_running()
