"""The retention window and the RPO monitor, on a real master target."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from pathlib import Path

import pytest

from protocol.records import Record, Write
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment, assert_image_holds

from .conftest import apply_to_model, random_workload, write_config

SIZE = 4 * 2**20
MINUTE_NS = 60 * 10**9


def _gauge(mt, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    value = mt.metrics.registry.get_sample_value(name, labels or None)
    assert value is not None, name
    return float(value)


async def test_old_points_go_and_the_rest_stay_recoverable(
    deployment: Deployment,
    start_mt,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": tmp_path / "t.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    with config.open("r+") as text:
        body = text.read().replace("[retention]", "[retention]\nwindow_s = 60")
        text.seek(0)
        text.write(body)
    mt, pusher = await start_mt(config)
    rng = random.Random(3)
    model = bytearray(SIZE)
    snapshots: dict[int, bytes] = {}
    now = time.time_ns()
    seq = 1
    for n in range(10):
        records: list[Record] = random_workload(rng, SIZE, 3, max_len=50_000)
        captured = now - (5 - n) * MINUTE_NS if n < 5 else now  # five files from minutes ago
        sealed = pusher.sealer.seal_records(
            records, disk_id="d0", generation=1, first_seq=seq, first_capture_ns=captured,
            last_capture_ns=captured, receive_ns=captured, salt=os.urandom(32),
        )  # fmt: skip
        assert (await pusher.send(sealed))[0] == 200
        apply_to_model(model, records)
        seq += len(records)
        snapshots[seq - 1] = bytes(model)
    replica = mt.replicas["d0"]
    await replica.wait_applied(StreamPosition(1, seq - 1))
    journal = tmp_path / "retention" / "journal" / "d0"
    files_before = len(list(journal.glob("*.undo")))
    await mt.housekeep()
    kept = await replica.history.points()
    assert [p.seq for p in kept] == sorted(snapshots)[5:]
    assert len(list(journal.glob("*.undo"))) < files_before
    assert _gauge(mt, "blockrepl_mastertarget_pruned_points_total", disk="d0",
                  reason="expired") == 5  # fmt: skip
    assert _gauge(mt, "blockrepl_mastertarget_retention_window_seconds", disk="d0") < 60
    for point in kept:
        out = tmp_path / f"r{point.seq}.raw"
        await replica.history.recover(point, out, "raw")
        assert_image_holds(out, snapshots[point.seq])


async def test_rpo_rises_when_shipping_stops_and_falls_when_it_resumes(
    deployment: Deployment,
    start_mt,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": tmp_path / "t.raw", "create": True, "size_bytes": SIZE}],
        rpo_threshold_s=1,
    )  # fmt: skip
    mt, pusher = await start_mt(config)
    replica = mt.replicas["d0"]
    caplog.set_level(logging.INFO, logger="blockrepl.mastertarget.rpo")
    assert (await pusher.send(pusher.seal("d0", 1, 1, [Write(0, b"a")])))[0] == 200
    await replica.wait_applied(StreamPosition(1, 1))
    await mt.housekeep()
    assert _gauge(mt, "blockrepl_mastertarget_rpo_exceeded", disk="d0") == 0
    assert _gauge(mt, "blockrepl_mastertarget_rpo_threshold_seconds") == 1
    await asyncio.sleep(1.3)  # shipping has stopped
    await mt.housekeep()
    assert _gauge(mt, "blockrepl_mastertarget_rpo_seconds", disk="d0") > 1
    assert _gauge(mt, "blockrepl_mastertarget_rpo_exceeded", disk="d0") == 1
    assert any("rpo-exceeded" in r.getMessage() or getattr(r, "event", "") == "rpo-exceeded"
               for r in caplog.records)  # fmt: skip
    assert (await pusher.send(pusher.seal("d0", 1, 2, [Write(0, b"b")])))[0] == 200
    await replica.wait_applied(StreamPosition(1, 2))
    await mt.housekeep()
    assert _gauge(mt, "blockrepl_mastertarget_rpo_exceeded", disk="d0") == 0
    assert _gauge(mt, "blockrepl_mastertarget_rpo_seconds", disk="d0") < 1
    events = [getattr(r, "event", r.getMessage()) for r in caplog.records]
    assert any("recovered" in str(e) for e in events), events
