"""The dirty map (agent/capture/plugin/dirtymap.py): its file, and when a region goes clean."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from agent.capture.dirty import CleanMarker, create_map, load_map, take_marker
from agent.capture.plugin import dirtymap
from agent.capture.plugin.dirtymap import (
    DirtyMapError,
    Geometry,
    MappedDirtyMap,
    RegionTracker,
    region_bytes_for,
)

MiB = 2**20
G = Geometry(MiB, 10 * MiB + 4096)  # 11 regions, the last one short


@pytest.mark.parametrize(
    ("disk", "region"),
    [(64 * MiB, MiB), (256 * 2**30, MiB), (2**40, 4 * MiB), (62 * 2**40, 256 * MiB)],
)
def test_region_size_keeps_the_map_small(disk: int, region: int) -> None:
    assert region_bytes_for(disk) == region
    assert Geometry(region, disk).regions <= dirtymap.MAX_REGIONS


def test_geometry_maps_bytes_to_regions() -> None:
    assert G.regions == 11
    assert list(G.regions_of(MiB - 1, 2)) == [0, 1]
    assert list(G.regions_of(5 * MiB, MiB)) == [5]
    assert list(G.regions_of(0, 0)) == []
    assert G.span(10) == (10 * MiB, 4096)
    assert dirtymap.merge_regions(G, [3, 1, 2, 7, 10]) == [(MiB, 3 * MiB), (7 * MiB, MiB),
                                                          (10 * MiB, 4096)]  # fmt: skip


def _header(**change: object) -> bytes:
    fields = {"magic": b"BRDM", "version": 1, "r1": b"", "region": MiB, "disk": 10 * MiB,
              "regions": 10, "r2": b""}  # fmt: skip
    fields.update(change)
    body = dirtymap.HEADER.pack(*fields.values(), 0)[: dirtymap.CRC_COVERS]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"BRDM", "expected a 64-byte header, found 4"),
        (_header(magic=b"BRDX"), "expected magic b'BRDM', found b'BRDX'"),
        (_header(version=2), "expected version 1, found 2"),
        (_header()[:-1] + b"\0", "header checksum must be"),
        (_header(r2=b"\1"), "reserved header bytes must be zero"),
        (_header(region=MiB + 1), "power-of-two region size"),
        (_header(regions=9), "make 10 regions, the header says 9"),
    ],
    ids=["short", "magic", "version", "crc", "reserved", "region", "regions"],
)
def test_a_damaged_header_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(DirtyMapError, match=message.replace("(", r"\(")):
        dirtymap.decode_header(data, what="map")


def test_the_agent_makes_reads_and_distrusts_maps(tmp_path: Path) -> None:
    path = tmp_path / "d.map"
    geometry = create_map(path, 10 * MiB, dirty=True)
    assert load_map(path, 10 * MiB) == (geometry, list(range(10)))
    create_map(path, 10 * MiB, dirty=False)
    assert load_map(path, 10 * MiB) == (geometry, [])
    assert load_map(path, 20 * MiB) is None  # another disk size
    assert load_map(tmp_path / "none.map", MiB) is None
    data = bytearray(path.read_bytes())
    data[-1] = 2  # a cell that is neither 0 nor 1
    path.write_bytes(data)
    assert load_map(path, 10 * MiB) is None
    path.write_bytes(bytes(data[:-1]))  # torn
    assert load_map(path, 10 * MiB) is None


class Persisted:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, first: int, end: int) -> None:
        self.calls.append((first, end))


def _tracker(dirty: tuple[int, ...] = ()) -> tuple[RegionTracker, bytearray, Persisted]:
    cells = bytearray(G.regions)
    for region in dirty:
        cells[region] = 1
    persisted = Persisted()
    return RegionTracker(G, cells, persisted), cells, persisted


def _dirty(cells: bytearray) -> list[int]:
    return [index for index, cell in enumerate(cells) if cell]


def test_a_region_is_made_dirty_durably_before_the_write_and_only_once() -> None:
    tracker, cells, persisted = _tracker()
    tracker.begin(MiB - 512, 1024, rid=1)
    assert _dirty(cells) == [0, 1]
    assert persisted.calls == [(0, 2)]
    tracker.begin(MiB, 4096, rid=2)  # already dirty: no msync on the write path
    assert persisted.calls == [(0, 2)]


def test_a_region_goes_clean_once_its_last_write_is_shipped() -> None:
    tracker, cells, _ = _tracker()
    tracker.begin(0, 4096, rid=1)
    tracker.begin(2 * MiB, 4096, rid=2)
    tracker.begin(0, 4096, rid=3)  # region 0 written again
    assert tracker.shipped(2) == 1  # region 2 only: region 0 waits for request 3
    assert _dirty(cells) == [0]
    assert tracker.shipped(3) == 1
    assert _dirty(cells) == []


def test_a_request_left_dirty_is_cleared_only_by_a_resync_that_covers_it() -> None:
    tracker, cells, _ = _tracker()
    tracker.begin(0, 4096, rid=1)
    tracker.left_dirty(0, 4096, rid=1)  # the journal was full
    tracker.begin(0, 4096, rid=2)
    assert tracker.shipped(5) == 0  # shipped requests do not clear a pending region
    assert _dirty(cells) == [0]
    assert tracker.resynced([(0, MiB)], rid=0) == 0  # a pass older than request 1
    tracker.left_dirty(0, 4096, rid=4)  # left dirty again during the pass
    assert tracker.resynced([(0, MiB)], rid=3) == 0
    assert tracker.resynced([(0, MiB)], rid=4) == 1
    assert _dirty(cells) == []


def test_a_resync_keeps_a_region_whose_live_write_is_not_shipped() -> None:
    tracker, cells, _ = _tracker(dirty=(4,))
    assert tracker.pending == {4: 0}  # dirty at start: to resync
    tracker.begin(4 * MiB, 10, rid=1)
    assert tracker.resynced([(4 * MiB, MiB)], rid=1) == 0
    assert _dirty(cells) == [4]
    assert tracker.shipped(1) == 1
    assert _dirty(cells) == []


def test_a_new_generation_turns_unshipped_journaled_writes_into_pending_regions() -> None:
    tracker, cells, persisted = _tracker()
    tracker.begin(MiB, 10, rid=1)
    tracker.begin(3 * MiB, 10, rid=2)
    tracker.shipped(1)
    tracker.begin(6 * MiB, 10, rid=3)  # after the rid of the PENDING: stays live
    assert tracker.mark_pending([], rid=2, live=True) == [(3 * MiB, MiB)]
    assert tracker.pending == {3: 2}
    persisted.calls.clear()
    everything = tracker.mark_pending([(0, G.disk_bytes)], rid=3)
    assert everything == [(0, G.disk_bytes)]
    assert persisted.calls == [(0, 11)]
    assert _dirty(cells) == list(range(11))


def test_the_mapped_file_is_what_the_tracker_changes(tmp_path: Path) -> None:
    path = tmp_path / "d.map"
    create_map(path, 4 * MiB, dirty=False)
    mapped = MappedDirtyMap(str(path), 4 * MiB)
    tracker = RegionTracker(mapped.geometry, mapped.cells, mapped.persist)
    tracker.begin(2 * MiB, 1, rid=1)
    assert dirtymap.read_map(str(path))[1] == [2]  # persisted: visible in the file
    tracker.shipped(1)
    mapped.flush()
    mapped.close()
    assert dirtymap.read_map(str(path))[1] == []
    with pytest.raises(DirtyMapError, match="for a disk of 8388608 bytes"):
        MappedDirtyMap(str(path), 8 * MiB)


@pytest.mark.parametrize(
    ("content", "marker"),
    [
        (b'{"generation": 3, "end_seq": 42}', CleanMarker(3, 42)),
        (b'{"generation": 3}', None),
        (b"[3, 42]", None),
        (b"BRDM\x01\x9f not UTF-8", None),
        (b'{"generation": 1e999, "end_seq": 42}', None),
        (b"[" * 2000, None),
        (b"", None),
    ],
)
def test_a_clean_marker_is_taken_once_and_a_damaged_one_means_a_crash(
    tmp_path: Path, content: bytes, marker: CleanMarker | None
) -> None:
    path = tmp_path / "d0.clean"
    path.write_bytes(content)
    assert take_marker(path) == marker
    assert not path.exists()
    assert take_marker(path) is None
