"""Consistency tags across the disks of one machine: two captured disks, real
daemons, ``blockrepl agent tag`` / ``agent tags``, and the recovery points the
master target makes of the tags, recovered and compared."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from protocol.limits import KiB, MiB
from tests.conftest import Deployment, require_binary
from tests.e2e.capture import (
    CaptureProcess,
    require_capture_peers,
)
from tests.e2e.conftest import BLOCKREPL, Site, build_site, make_source, start

SIZE = 16 * MiB
DISKS = ("vm01-d0", "vm01-d1")


def _two_disks(
    deployment: Deployment, tmp_path: Path, tags: dict[str, object] | None = None
) -> tuple[Site, dict[str, CaptureProcess]]:
    require_capture_peers()
    tables: dict[str, dict[str, object]] = {"capture": {"hold_max_s": 2}}
    if tags:
        tables["tags"] = tags
    site = build_site(
        deployment, tmp_path, size=SIZE, disks=DISKS, sync={"region_bytes": 4 * MiB},
        agent_tables=tables,
    )  # fmt: skip
    rng = random.Random(17)
    captures = {}
    for disk in DISKS:
        source = tmp_path / f"{disk}.raw"
        make_source(source, SIZE, [(0, rng.randbytes(4 * MiB))])
        captures[disk] = CaptureProcess(site, source, disk)
    start(site)
    for capture in captures.values():
        capture.start()
    for capture in captures.values():
        capture.settle()
    return site, captures


def _tag(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BLOCKREPL), "agent", "tag", "--config", str(site.agent_config), "--json", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_crash_and_app_tags_mark_every_disk_at_one_point(
    deployment: Deployment, tmp_path: Path
) -> None:
    quiesce_url = "nbd://127.0.0.1:{port}"
    site, captures = _two_disks(deployment, tmp_path)
    d0, d1 = captures[DISKS[0]], captures[DISKS[1]]
    for capture, pattern in ((d0, 0x11), (d1, 0x22)):
        capture.qemu_io(f"write -P {pattern} 1M 256k")
    crash = _tag(site, "--name", "before-upgrade")
    assert crash.returncode == 0, crash.stderr
    report = json.loads(crash.stdout)
    assert report["kind"] == "crash"
    assert [d["disk"] for d in report["disks"]] == list(DISKS)
    assert all(d["consistent"] for d in report["disks"])
    snapshots = {disk: tmp_path / f"{disk}-at-tag.raw" for disk in DISKS}
    for disk, capture in captures.items():
        shutil.copyfile(capture.source, snapshots[disk])
    for capture, pattern in ((d0, 0x33), (d1, 0x44)):
        capture.qemu_io(f"write -P {pattern} 1M 512k", f"write -z 3M {64 * KiB}")

    # App-consistent: the quiesce command writes through the export (an
    # application flushing), the unquiesce one overwrites it afterwards.
    url = quiesce_url.format(port=d0.port)
    qemu_io = require_binary("qemu-io")
    tags = {
        "quiesce": [f"{qemu_io} -f raw -t none {url} -c 'write -P 0xaa 8M 4k'"],
        "unquiesce": [f"{qemu_io} -f raw -t none {url} -c 'write -P 0xbb 8M 4k'"],
    }
    with site.agent_config.open("a") as config:
        config.write("[tags]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in tags.items()))
    app = _tag(site, "--name", "app-1", "--app")
    assert app.returncode == 0, app.stderr
    app_report = json.loads(app.stdout)
    assert app_report["kind"] == "app"
    assert app_report["frozen_s"] > 0
    for capture in captures.values():
        capture.settle()

    # One tag id across the disks, as the master target lists them.
    for name, kind, tag_id in (("before-upgrade", "crash", report["tag_id"]),
                               ("app-1", "app", app_report["tag_id"])):  # fmt: skip
        for disk in DISKS:
            found = [p for p in site.points(disk) if p["name"] == name]
            assert [(p["kind"], p["tag_id"]) for p in found] == [(kind, tag_id)], (disk, found)
    # Recovered at the crash tag, each disk is as it was when the tag was taken.
    for disk in DISKS:
        recovered = tmp_path / f"{disk}-recovered.raw"
        site.recover("tag:before-upgrade", recovered, disk)
        site.assert_identical(snapshots[disk], recovered)
    # At the app tag: the quiesce write is in, the unquiesce write is not.
    app_point = tmp_path / "d0-app.raw"
    site.recover("latest-app", app_point, DISKS[0])
    with app_point.open("rb") as recovered, d0.source.open("rb") as now:
        assert recovered.read(8 * MiB) == now.read(8 * MiB)
        assert recovered.read(4096) == b"\xaa" * 4096
        assert now.read(4096) == b"\xbb" * 4096
    for disk, capture in captures.items():
        site.assert_identical(capture.source, site.targets[disk])


async def test_a_round_with_a_disk_not_running_is_abandoned(
    deployment: Deployment, tmp_path: Path
) -> None:
    site, captures = _two_disks(deployment, tmp_path)
    status, _ = captures[DISKS[1]].stop()
    assert status == 0
    result = _tag(site, "--name", "half")
    assert result.returncode == 75, result.stderr
    assert f"disk {DISKS[1]}: its capture is not running" in result.stderr
    captures[DISKS[0]].settle()
    assert not [p for p in site.points(DISKS[0]) if p["name"] == "half"]


async def test_a_hold_is_bounded_even_if_its_coordinator_goes_silent(
    deployment: Deployment, tmp_path: Path
) -> None:
    site, captures = _two_disks(deployment, tmp_path)
    d0 = captures[DISKS[0]]
    with socket.socket(socket.AF_UNIX) as coordinator:
        coordinator.connect(str(d0.control))
        coordinator.sendall(b'{"op": "hold", "timeout_s": 5}\n')
        assert json.loads(coordinator.recv(4096))["ok"] is True
        started = time.monotonic()
        d0.qemu_io("write -P 5 0 4k")  # waits for the hold to end (hold_max_s = 2)
        waited = time.monotonic() - started
        assert 1.5 < waited < 10, waited
        request = {"op": "tag", "kind": "crash", "name": "late", "tag_id": "00" * 16, "time_ns": 1}
        coordinator.sendall(json.dumps(request).encode() + b"\n")
        answer = json.loads(coordinator.recv(4096))
    assert (answer["ok"], answer["error"]) == (False, "not-held")
    assert "expired" in answer["message"]
    d0.settle()
    site.assert_identical(d0.source, site.targets[DISKS[0]])


async def test_tags_at_an_interval_reach_every_disk(deployment: Deployment, tmp_path: Path) -> None:
    site, captures = _two_disks(
        deployment, tmp_path, tags={"crash_interval_s": 1, "app_interval_s": 0}
    )
    log = (tmp_path / "tags.log").open("wb")
    tagger = subprocess.Popen(
        [str(BLOCKREPL), "agent", "tags", "--config", str(site.agent_config), "--json"],
        stdout=subprocess.PIPE, stderr=log,
    )  # fmt: skip
    try:
        captures[DISKS[0]].qemu_io(*(f"write -P {n} {n}M 4k" for n in range(1, 8)))
        time.sleep(3.5)
        tagger.send_signal(signal.SIGTERM)
        out, _ = tagger.communicate(timeout=30)
    finally:
        if tagger.poll() is None:
            tagger.kill()
    assert tagger.returncode == 0, (tmp_path / "tags.log").read_text()
    rounds = json.loads(out)
    assert rounds["rounds"] >= 2
    assert rounds["abandoned"] == 0
    ids = {}
    for disk in DISKS:
        captures[disk].settle()
        ids[disk] = [p["tag_id"] for p in site.points(disk) if p["kind"] == "crash" and p["name"]]
        assert len(ids[disk]) == rounds["rounds"], ids
    assert sorted(ids[DISKS[0]]) == sorted(ids[DISKS[1]])


async def test_a_stop_lets_the_round_under_way_finish(
    deployment: Deployment, tmp_path: Path
) -> None:
    """SIGTERM in the middle of a round: the round ends on every disk, then the
    tagger exits (a stop that cut it short could tag one disk and not the other)."""
    marker = tmp_path / "quiescing"
    site, captures = _two_disks(
        deployment, tmp_path,
        tags={"crash_interval_s": 0, "app_interval_s": 1, "freeze_max_s": 10,
              "quiesce": [f"sh -c 'touch {marker}; sleep 1'"]},
    )  # fmt: skip
    tagger = subprocess.Popen(
        [str(BLOCKREPL), "agent", "tags", "--config", str(site.agent_config), "--json"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "tags.log").open("wb"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, (tmp_path / "tags.log").read_text()
            time.sleep(0.02)
        tagger.send_signal(signal.SIGTERM)
        out, _ = tagger.communicate(timeout=30)
    finally:
        if tagger.poll() is None:
            tagger.kill()
    assert tagger.returncode == 0, (tmp_path / "tags.log").read_text()
    rounds = json.loads(out)
    assert (rounds["rounds"], rounds["abandoned"]) == (1, 0)
    for disk in DISKS:
        captures[disk].settle()
        assert [p["kind"] for p in site.points(disk) if p["name"]] == ["app"]


async def test_a_hold_ends_at_its_own_bound_and_a_group_tag_names_its_group(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A consistency group's round bounds each hold (max_s) well below
    capture.hold_max_s, in the capture itself; a GROUP tag carries its group."""
    site, captures = _two_disks(deployment, tmp_path)  # capture.hold_max_s = 2
    d0 = captures[DISKS[0]]
    with socket.socket(socket.AF_UNIX) as coordinator:
        coordinator.connect(str(d0.control))
        coordinator.sendall(b'{"op": "hold", "timeout_s": 5, "max_s": 0.3}\n')
        assert json.loads(coordinator.recv(4096))["ok"] is True
        started = time.monotonic()
        d0.qemu_io("write -P 6 0 4k")  # waits for the hold's own 0.3 s, not 2 s
        assert time.monotonic() - started < 1.5
        coordinator.sendall(b'{"op": "hold", "timeout_s": 5}\n')
        assert json.loads(coordinator.recv(4096))["ok"] is True
        request = {"op": "tag", "kind": "group", "name": "g1", "tag_id": "ab" * 16, "time_ns": 1}
        coordinator.sendall(json.dumps(request).encode() + b"\n")
        refused = json.loads(coordinator.recv(4096))
        coordinator.sendall(json.dumps({**request, "group": "erp"}).encode() + b"\n")
        tagged = json.loads(coordinator.recv(4096))
    assert (refused["ok"], refused["error"]) == (False, "malformed")
    assert tagged["ok"] is True
    d0.settle()
    [point] = [p for p in site.points(DISKS[0]) if p["name"] == "g1"]
    assert (point["kind"], point["group_id"], point["seq"]) == ("group", "erp", tagged["seq"])
