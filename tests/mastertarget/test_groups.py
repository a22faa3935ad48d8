"""Consistency groups at the master target: the points common to every disk of a
group, listed and recovered through the daemon and offline, and the pure rules
that decide which tag ids are group points."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from mastertarget.errors import PointNotFoundError
from mastertarget.groups import common_points, select_group_point
from mastertarget.points import PointKind, RecoveryPoint
from mastertarget.pointspec import format_time_ns, parse_spec
from protocol.records import Record, StreamFlags, Tag, TagKind, Write
from protocol.sequencing import StreamPosition
from runtime.errors import ConfigError
from tests.conftest import Deployment, assert_image_holds

from .conftest import Pusher, write_config

SIZE = 2**20
DISKS = ("vm01-d0", "vm01-d1", "db01-d0")
GROUP = "erp"
#: the round times: one second apart from a fixed start
T0 = 1_800_000_000 * 10**9


# --- the rules, without a daemon ---------------------------------------------------------


def _point(disk: str, seq: int, kind: PointKind, tag: int, *, consistent: bool = True,
           group: str = GROUP) -> RecoveryPoint:  # fmt: skip
    return RecoveryPoint(
        disk, 1, seq, T0 + tag, T0 + tag + 5, kind, f"r{tag}", bytes([tag]) * 16,
        group if kind is PointKind.GROUP else "", consistent,
    )  # fmt: skip


def test_a_tag_id_is_a_group_point_only_on_every_disk_and_consistent_on_each() -> None:
    points = [
        # r1 on every disk; r2 misses db01-d0 (the round aborted there); r3 is
        # inside a resync on vm01-d1; r4 belongs to another group on one disk
        *(_point(d, 10, PointKind.GROUP, 1) for d in DISKS),
        *(_point(d, 20, PointKind.GROUP, 2) for d in DISKS[:2]),
        _point(DISKS[0], 30, PointKind.GROUP, 3), _point(DISKS[2], 30, PointKind.GROUP, 3),
        _point(DISKS[1], 30, PointKind.GROUP, 3, consistent=False),
        *(_point(d, 40, PointKind.GROUP, 4) for d in DISKS[1:]),
        _point(DISKS[0], 40, PointKind.GROUP, 4, group="other"),
        # r5 app-consistent: an APP tag right before the GROUP tag on every disk
        *(_point(d, 49, PointKind.APP, 5) for d in DISKS),
        *(_point(d, 50, PointKind.GROUP, 5) for d in DISKS),
        # r6: APP tags on two disks only, so crash-consistent as a group
        *(_point(d, 59, PointKind.APP, 6) for d in DISKS[:2]),
        *(_point(d, 60, PointKind.GROUP, 6) for d in DISKS),
        _point(DISKS[0], 70, PointKind.CRASH, 7),
    ]  # fmt: skip
    found = common_points(GROUP, DISKS, reversed(points))
    assert [(p.name, p.kind) for p in found] == [("r1", "crash"), ("r5", "app"), ("r6", "crash")]
    r5 = found[1]
    assert [m.disk_id for m in r5.members] == list(DISKS)
    assert {m.seq for m in r5.members} == {50}
    assert r5.applied_ns == T0 + 10  # when the last disk applied it
    assert common_points(GROUP, DISKS[:2], points)[1].name == "r2"


def test_a_spec_picks_a_group_point_and_a_miss_names_the_window() -> None:
    points = common_points(
        GROUP, DISKS,
        [*(_point(d, 10, PointKind.GROUP, 1) for d in DISKS),
         *(_point(d, 19, PointKind.APP, 2) for d in DISKS),
         *(_point(d, 20, PointKind.GROUP, 2) for d in DISKS),
         *(_point(d, 30, PointKind.GROUP, 3) for d in DISKS)],
    )  # fmt: skip

    def pick(spec: str) -> str:
        return select_group_point(parse_spec(spec), GROUP, points).name

    assert pick("latest") == pick("latest-processed") == "r3"
    assert pick("latest-app") == "r2"
    assert pick("tag:r1") == "r1"
    assert pick(format_time_ns(T0 + 2)) == "r2"
    with pytest.raises(PointNotFoundError, match="newest names: r3, r2, r1"):
        pick("tag:nope")
    with pytest.raises(PointNotFoundError, match="before the earliest group point"):
        pick(format_time_ns(T0))
    with pytest.raises(PointNotFoundError, match="no common point yet") as none:
        select_group_point(parse_spec("latest"), GROUP, [])
    assert none.value.details["group"] == GROUP


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ('[[groups]]\nid = "erp"\ndisks = ["d0", "vm02-d0"]\n',
         "disk 'vm02-d0' is not protected by this master target"),
        ('[[groups]]\nid = "erp"\ndisks = ["d0"]\n[[groups]]\nid = "crm"\ndisks = ["d0"]\n',
         "disk 'd0' is in groups erp and crm"),
        ('[[groups]]\nid = "erp"\ndisks = ["d0"]\n[[groups]]\nid = "erp"\ndisks = ["d1"]\n',
         "unique group ids"),
        ('[[groups]]\nid = "erp"\ndisks = []\n', "found none"),
        ('[[groups]]\nid = "a/b"\ndisks = ["d0"]\n', r"groups\[0\]\.id"),
    ],
)  # fmt: skip
def test_a_group_the_master_target_cannot_hold_whole_is_refused(
    deployment: Deployment, tmp_path: Path, groups: str, message: str
) -> None:
    from mastertarget.config import load  # noqa: PLC0415 - beside its only use

    path = write_config(
        deployment, tmp_path,
        [{"id": d, "target": tmp_path / f"{d}.raw", "create": True, "size_bytes": SIZE}
         for d in ("d0", "d1")],
    )  # fmt: skip
    path.write_text(path.read_text() + groups)
    with pytest.raises(ConfigError, match=message) as refused:
        load(path)
    assert str(path) in refused.value.message


# --- a daemon with a group of three disks ---------------------------------------------------


class Streams:
    """Each disk's next seq, the model of each disk, and its copy at every tag."""

    def __init__(self, pusher: Pusher) -> None:
        self.pusher = pusher
        self.seq = dict.fromkeys(DISKS, 1)
        self.model = {d: bytearray(SIZE) for d in DISKS}
        self.at: dict[tuple[str, str], bytes] = {}

    async def round(
        self, tag: int, disks: tuple[str, ...] = DISKS, *, app: bool = False,
        flags: dict[str, StreamFlags] | None = None,
    ) -> None:  # fmt: skip
        """A write on every disk, then (on ``disks``) the round's tags."""
        name, tag_id = f"r{tag}", bytes([tag]) * 16
        for disk in DISKS:
            data = bytes([tag]) * 4096
            self.model[disk][tag * 4096 : (tag + 1) * 4096] = data
            records: list[Record] = [Write(tag * 4096, data)]
            if disk in disks:
                self.at[(disk, name)] = bytes(self.model[disk])
                if app:
                    records.append(Tag(TagKind.APP, tag_id, name, T0 + tag))
                records.append(Tag(TagKind.GROUP, tag_id, name, T0 + tag, GROUP))
            sealed = self.pusher.seal(
                disk, 1, self.seq[disk], records, (flags or {}).get(disk, StreamFlags(0))
            )
            status, body = await self.pusher.send(sealed)
            assert status == 200, body
            self.seq[disk] += len(records)


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mastertarget.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_group_points_listed_and_recovered_online_and_offline(
    deployment: Deployment,
    start_mt,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config = write_config(
        deployment, tmp_path,
        [{"id": d, "target": tmp_path / f"{d}.raw", "create": True, "size_bytes": SIZE}
         for d in DISKS],
    )  # fmt: skip
    config.write_text(config.read_text() + f'[[groups]]\nid = "{GROUP}"\ndisks = {list(DISKS)}\n')
    mt, pusher = await start_mt(config)
    streams = Streams(pusher)
    resync = StreamFlags.RESYNC
    await streams.round(1)
    await streams.round(2, app=True)
    await streams.round(3, DISKS[:2])  # aborted before db01-d0 was tagged
    await streams.round(4, flags={DISKS[1]: resync})  # vm01-d1 inside a resync
    await streams.round(5, flags={DISKS[1]: resync | StreamFlags.RESYNC_END})
    await streams.round(6)
    for disk in DISKS:
        await mt.replicas[disk].wait_applied(StreamPosition(1, streams.seq[disk] - 1))

    code, out, err = await _cli("points", "--config", str(config), "--group", GROUP, "--json")
    assert code == 0, err
    listing = json.loads(out)
    assert [(p["name"], p["kind"]) for p in listing["points"]] == [
        ("r6", "crash"), ("r2", "app"), ("r1", "crash"),
    ]  # fmt: skip
    assert listing["window"]["points"] == 3
    assert listing["points"][1]["disks"] == {
        disk: {"generation": 1, "seq": 5} for disk in DISKS
    }  # fmt: skip
    code, out, err = await _cli("points", "--config", str(config), "--group", GROUP)
    assert code == 0, err
    assert "3 common points" in out

    await mt.housekeep()
    registry = mt.metrics.registry
    assert registry.get_sample_value(
        "blockrepl_mastertarget_group_recovery_points", {"group": GROUP}
    ) == 3  # fmt: skip
    rpo = registry.get_sample_value("blockrepl_mastertarget_group_rpo_seconds", {"group": GROUP})
    assert rpo is not None
    assert rpo >= (time.time_ns() - T0 - 6) / 1e9 - 5  # counted from the round's time

    online = tmp_path / "online"
    code, out, err = await _cli(
        "recover", "--config", str(config), "--group", GROUP, "--point", "latest-app",
        "--output-dir", str(online), "--json",
    )  # fmt: skip
    assert code == 0, err
    answer = json.loads(out)
    assert answer["point"]["name"] == "r2"
    assert sorted(answer["disks"]) == sorted(DISKS)
    for disk in DISKS:
        assert_image_holds(online / f"{disk}.raw", streams.at[(disk, "r2")])
    code, _, err = await _cli(
        "recover", "--config", str(config), "--group", GROUP, "--point", "tag:r1",
        "--output-dir", str(online),
    )  # fmt: skip
    assert code == 73, err  # a group goes into new files only (EX_CANTCREAT, as offline)
    assert "exists" in err

    await mt.close()
    offline = tmp_path / "offline"
    code, out, err = await _cli(
        "recover", "--config", str(config), "--group", GROUP, "--point", "tag:r1",
        "--output-dir", str(offline), "--json",
    )  # fmt: skip
    assert code == 0, err
    for disk in DISKS:
        assert_image_holds(offline / f"{disk}.raw", streams.at[(disk, "r1")])
    code, out, err = await _cli("points", "--config", str(config), "--group", GROUP, "--json")
    assert code == 0, err
    assert [p["name"] for p in json.loads(out)["points"]] == ["r6", "r2", "r1"]
    code, _, err = await _cli(
        "recover", "--config", str(config), "--group", GROUP, "--point", "tag:r3",
        "--output-dir", str(tmp_path / "r3"),
    )  # fmt: skip
    assert code == 66, err
    assert "no group point is named 'r3'" in err
    assert not (tmp_path / "r3").exists()
    code, _, err = await _cli("points", "--config", str(config), "--group", "nope")
    assert code == 64, err
    assert "group 'nope' is not in the master target's config; configured: erp" in err
