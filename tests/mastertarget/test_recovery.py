"""Recovery points for real: a workload with tags at known moments, then the
disk rebuilt at each point — as a copy while replication goes on, and in
place by failover — and checked with qemu-img compare."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from mastertarget.points import PointKind
from protocol.errors import ProtocolError
from protocol.records import Record, StreamFlags, Tag, TagKind, Write
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment, assert_image_holds

from .conftest import Pusher, apply_to_model, random_workload, write_config

SIZE = 8 * 2**20


async def _stream_with_tags(
    pusher: Pusher, rng: random.Random, files: int
) -> tuple[dict[tuple[int, str], bytes], int]:
    """Push files, some with an APP tag in the middle; keep the model at every point."""
    model = bytearray(SIZE)
    snapshots: dict[tuple[int, str], bytes] = {}
    seq = 1
    for n in range(files):
        records: list[Record] = random_workload(rng, SIZE, rng.randint(1, 4), max_len=100_000)
        if n % 3 == 1:
            tag = Tag(TagKind.APP, rng.randbytes(16), f"app-{n}", time.time_ns())
            cut = rng.randint(0, len(records))
            apply_to_model(model, records[:cut])
            snapshots[(seq + cut, f"app-{n}")] = bytes(model)
            apply_to_model(model, records[cut:])
            records = [*records[:cut], tag, *records[cut:]]
        else:
            apply_to_model(model, records)
        last = seq + len(records) - 1
        sealed = pusher.sealer.seal_records(
            records, disk_id="d0", generation=1, first_seq=seq,
            first_capture_ns=time.time_ns(), last_capture_ns=time.time_ns(), receive_ns=0,
            salt=rng.randbytes(32),
        )  # fmt: skip
        status, _ = await pusher.send(sealed)
        assert status == 200
        snapshots[(last, "")] = bytes(model)
        seq = last + 1
    return snapshots, seq - 1


@pytest.fixture
def disk_config(deployment: Deployment, tmp_path: Path) -> Path:
    return write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": tmp_path / "target.vmdk", "format": "vmdk", "create": True,
          "size_bytes": SIZE}],
    )  # fmt: skip


async def test_recover_at_every_point_equals_the_source_then(
    start_mt,
    disk_config: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    mt, pusher = await start_mt(disk_config)
    snapshots, last = await _stream_with_tags(pusher, random.Random(11), files=12)
    replica = mt.replicas["d0"]
    await replica.wait_applied(StreamPosition(1, last))
    points = await replica.history.points()
    assert {(p.seq, p.name) for p in points} == set(snapshots)
    assert all(p.consistent for p in points)
    assert {p.kind for p in points if p.name} == {PointKind.APP}
    for index, point in enumerate(points):
        fmt = "vmdk" if index % 2 else "raw"
        output = tmp_path / f"recovered-{index}.{fmt}"
        result = await replica.history.recover(point, output, fmt)
        assert result.point == point
        assert_image_holds(output, snapshots[(point.seq, point.name)], fmt=fmt)
    # replication went on meanwhile: a new file still applies
    status, _ = await pusher.send(pusher.seal("d0", 1, last + 1, [Write(0, b"after")]))
    assert status == 200
    await replica.wait_applied(StreamPosition(1, last + 1))


async def test_failover_rolls_back_in_place_and_refuses_later_files(
    start_mt,
    disk_config: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    mt, pusher = await start_mt(disk_config)
    snapshots, last = await _stream_with_tags(pusher, random.Random(5), files=9)
    replica = mt.replicas["d0"]
    await replica.wait_applied(StreamPosition(1, last))
    app_points = [p for p in (await replica.history.points()) if p.kind is PointKind.APP]
    point = app_points[0]
    await replica.history.failover(point)
    state = await pusher.state("d0")
    assert (state["state"], state["applied_seq"]) == ("failed-over", point.seq)
    assert all(p.seq <= point.seq for p in (await replica.history.points()))
    status, body = await pusher.send(pusher.seal("d0", 1, point.seq + 1, [Write(0, b"x")]))
    assert (status, body["error"]) == (409, "failed-over")
    await mt.close()
    assert_image_holds(tmp_path / "target.vmdk", snapshots[(point.seq, point.name)], fmt="vmdk")


async def test_points_inside_a_resync_are_not_consistent(
    start_mt,
    disk_config: Path,  # type: ignore[no-untyped-def]
) -> None:
    mt, pusher = await start_mt(disk_config)
    replica = mt.replicas["d0"]
    await pusher.send(pusher.seal("d0", 1, 1, [Write(0, b"a")]))
    resync = StreamFlags.RESYNC
    await pusher.send(pusher.seal("d0", 1, 2, [Write(0, b"b")], resync))
    await pusher.send(pusher.seal("d0", 1, 3, [Write(0, b"c")], resync | StreamFlags.RESYNC_END))
    await replica.wait_applied(StreamPosition(1, 3))
    consistent = {p.seq: p.consistent for p in (await replica.history.points())}
    assert consistent == {1: True, 2: False, 3: True}


async def test_a_corrupt_undo_file_fails_only_the_points_that_need_it(
    start_mt,
    disk_config: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """A bit flipped at rest in the newest undo file: recovering to a point
    behind it is refused naming the file, with no output left and the target
    untouched; the newest point, which needs no undo, still recovers."""
    mt, pusher = await start_mt(disk_config)
    snapshots, last = await _stream_with_tags(pusher, random.Random(12), files=6)
    replica = mt.replicas["d0"]
    await replica.wait_applied(StreamPosition(1, last))
    undo_files = sorted((tmp_path / "retention" / "journal" / "d0").glob("*.undo"))
    assert undo_files
    newest = undo_files[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    target_before = (tmp_path / "target.vmdk").read_bytes()
    points = await replica.history.points()
    output = tmp_path / "old.raw"
    with pytest.raises(ProtocolError, match=newest.name) as refused:
        await replica.history.recover(points[0], output, "raw")
    assert refused.value.code == "authentication-failed"
    assert not output.exists()  # the name asked for never holds a wrong disk
    assert (tmp_path / "old.raw.incomplete").exists()
    with pytest.raises(ProtocolError, match=newest.name):
        await replica.history.failover(points[0])
    assert (tmp_path / "target.vmdk").read_bytes() == target_before
    latest = tmp_path / "latest.raw"
    await replica.history.recover(points[-1], latest, "raw")
    assert_image_holds(latest, snapshots[(points[-1].seq, points[-1].name)])
