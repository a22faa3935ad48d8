"""The agent's side of a disk's dirty map (plugin/dirtymap.py): made, read and
judged before nbdkit starts, and the *clean marker* left by a clean stop.

Files, per disk, in ``STATE_DIR/capture/``:

- ``DISK.map`` — the dirty map; while capture runs, the plugin alone writes it.
- ``DISK.clean`` — written after a clean stop (nbdkit answered every
  request, each journaled, nothing left to resync): the generation and the
  last journaled seq. It says the dirty regions are exactly those whose
  journaled writes are not yet at the master target, so the next start
  needs no resync, only the journal. Removed, durably, at every start: a
  crash later cannot be mistaken for a clean stop.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.capture.plugin.dirtymap import (
    DirtyMapError,
    Geometry,
    encode_header,
    read_map,
    region_bytes_for,
)
from runtime.crashsafe import fsync_dir, write_file_atomic
from runtime.errors import DurabilityError

log = logging.getLogger("blockrepl.agent.capture")

#: The map and the marker hold which parts of a disk changed: the service user's alone.
FILE_MODE: Final = 0o600


@dataclass(frozen=True, slots=True)
class CleanMarker:
    """What a clean stop left: the stream's generation and its last journaled seq."""

    generation: int
    end_seq: int


def capture_dir(state_dir: Path) -> Path:
    return state_dir / "capture"


def map_path(state_dir: Path, disk_id: str) -> Path:
    return capture_dir(state_dir) / f"{disk_id}.map"


def marker_path(state_dir: Path, disk_id: str) -> Path:
    return capture_dir(state_dir) / f"{disk_id}.clean"


def create_map(path: Path, disk_bytes: int, *, dirty: bool) -> Geometry:
    """Write a new dirty map for a disk of ``disk_bytes``, every region dirty or clean.

    Raises:
        DurabilityError: it could not be written durably.
    """
    geometry = Geometry(region_bytes_for(disk_bytes), disk_bytes)
    cells = (b"\x01" if dirty else b"\x00") * geometry.regions
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file_atomic(path, [encode_header(geometry), cells], mode=FILE_MODE)
    return geometry


def load_map(path: Path, disk_bytes: int) -> tuple[Geometry, list[int]] | None:
    """The map's geometry and dirty regions, or None when there is none that fits.

    A missing map, a damaged one, or one of another disk size means the agent
    cannot know what changed: the caller makes a new map with every region
    dirty (a whole-disk comparison).
    """
    try:
        geometry, dirty = read_map(str(path))
    except FileNotFoundError:
        return None
    except (DirtyMapError, OSError) as exc:
        log.warning("the dirty map cannot be used (%s); the whole disk will be compared", exc)
        return None
    if geometry.disk_bytes != disk_bytes:
        log.warning(
            "the dirty map %s is for a disk of %d bytes, the source has %d; the whole disk "
            "will be compared",
            path,
            geometry.disk_bytes,
            disk_bytes,
        )
        return None
    return geometry, dirty


def write_marker(path: Path, marker: CleanMarker) -> None:
    """Leave the clean marker (durable on return)."""
    body = json.dumps({"generation": marker.generation, "end_seq": marker.end_seq})
    write_file_atomic(path, body.encode(), mode=FILE_MODE)


def take_marker(path: Path) -> CleanMarker | None:
    """The clean marker, removed durably; None if there was none (or a damaged one).

    Raises:
        DurabilityError: it could not be removed.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DurabilityError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    try:
        os.unlink(path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise DurabilityError(f"cannot remove {path}: {exc.strerror}", path=str(path)) from exc
    try:
        data = json.loads(raw.decode("utf-8"))  # bytes that are not UTF-8 are a damaged marker too
        marker = CleanMarker(int(data["generation"]), int(data["end_seq"]))
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        # OverflowError: int() of an infinite number; RecursionError: nested too deep
        log.warning("the clean marker %s is damaged; taking the last stop as a crash", path)
        return None
    return marker


def forget_map(state_dir: Path, disk_id: str) -> None:
    """Remove the map and the marker (durably): what changed is no longer known.

    ``agent sync`` calls this before it starts a pass, so a capture after an
    interrupted sync compares the whole disk.

    Raises:
        DurabilityError: they could not be removed.
    """
    folder = capture_dir(state_dir)
    removed = False
    for path in (marker_path(state_dir, disk_id), map_path(state_dir, disk_id)):
        try:
            os.unlink(path)
            removed = True
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DurabilityError(f"cannot remove {path}: {exc.strerror}", path=str(path)) from exc
    if removed:
        fsync_dir(folder)
