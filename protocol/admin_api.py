"""The JSON bodies of the master target's admin API (docs/api.md, "Master
target admin API"), as typed messages: recovery points, recover and failover
of a disk or a consistency group.

The daemon builds its answers with these and reads its requests with
``parse_bytes``; ``mastertarget points|recover|failover`` read the daemon's
answers with ``parse``, and print ``to_json()`` for ``--json``. As in
protocol/api.py, anything that breaks the form is a
:class:`~protocol.errors.MalformedError` saying what was expected and what
was found.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from protocol.errors import MalformedError
from protocol.jsonbody import JsonObject, describe, loads
from protocol.limits import MiB

#: The longest admin answer the command reads: a points listing of the most
#: points one answer may hold (100 000), each with a 128-byte name escaped
#: six bytes a character at worst, is about 100 MB.
MAX_ADMIN_ANSWER_BYTES: Final = 128 * MiB

OutputFormat = Literal["raw", "vmdk"]
FORMATS: Final = ("raw", "vmdk")
#: What a point is consistent for (mastertarget/points.py).
POINT_KINDS: Final = ("crash", "app", "group")


def _format(body: JsonObject) -> OutputFormat:
    value = body.fields.get("format", "raw")
    if value == "raw":
        return "raw"
    if value == "vmdk":
        return "vmdk"
    raise MalformedError(f"expected 'format' raw or vmdk, found {describe(value)}")


def _absolute_path(body: JsonObject, key: str) -> str:
    value = body.fields.get(key)
    if not isinstance(value, str) or not posixpath.isabs(value):
        raise MalformedError(f"expected {key!r} to be an absolute path, found {describe(value)}")
    return value


def _spec(body: JsonObject) -> str:
    value = body.fields.get("point")
    if not isinstance(value, str):
        raise MalformedError(f"expected 'point' to be a SPEC string, found {describe(value)}")
    return value


# --- requests -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecoverRequest:
    """``POST /v1/disks/{disk}/recover``: write the disk at ``point`` into ``output``."""

    point: str
    output: str
    format: OutputFormat = "raw"

    def to_json(self) -> dict[str, object]:
        return {"point": self.point, "output": self.output, "format": self.format}

    @classmethod
    def parse_bytes(cls, raw: bytes) -> RecoverRequest:
        body = JsonObject(loads(raw, "a recover request"), "a recover request")
        output, fmt = _absolute_path(body, "output"), _format(body)
        return cls(_spec(body), output, fmt)


@dataclass(frozen=True, slots=True)
class FailoverRequest:
    """``POST /v1/disks/{disk}/failover``: roll the target back to ``point``."""

    point: str

    def to_json(self) -> dict[str, object]:
        return {"point": self.point}

    @classmethod
    def parse_bytes(cls, raw: bytes) -> FailoverRequest:
        return cls(_spec(JsonObject(loads(raw, "a failover request"), "a failover request")))


@dataclass(frozen=True, slots=True)
class GroupRecoverRequest:
    """``POST /v1/groups/{group}/recover``: every disk at one common point, into ``output_dir``."""

    point: str
    output_dir: str
    format: OutputFormat = "raw"

    def to_json(self) -> dict[str, object]:
        return {"point": self.point, "output_dir": self.output_dir, "format": self.format}

    @classmethod
    def parse_bytes(cls, raw: bytes) -> GroupRecoverRequest:
        body = JsonObject(loads(raw, "a group recover request"), "a group recover request")
        directory, fmt = _absolute_path(body, "output_dir"), _format(body)
        return cls(_spec(body), directory, fmt)


# --- answers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """The span of the points offered: capture times in UTC (ISO-8601), or null for none."""

    oldest: str | None
    newest: str | None
    points: int
    window_s: float

    def to_json(self) -> dict[str, object]:
        return {"oldest": self.oldest, "newest": self.newest, "points": self.points,
                "window_s": self.window_s}  # fmt: skip

    @classmethod
    def parse(cls, obj: object) -> Window:
        body = JsonObject(obj, "a window of points")
        return cls(
            body.optional_text("oldest"),
            body.optional_text("newest"),
            body.integer("points"),
            body.number("window_s"),
        )


@dataclass(frozen=True, slots=True)
class PointEntry:
    """One recovery point of one disk."""

    time: str
    capture_ns: int
    applied_ns: int
    kind: str
    name: str
    generation: int
    seq: int
    #: 16 bytes in hex; empty for the end of a file
    tag_id: str
    group_id: str

    def to_json(self) -> dict[str, object]:
        return {
            "time": self.time, "capture_ns": self.capture_ns, "applied_ns": self.applied_ns,
            "kind": self.kind, "name": self.name, "generation": self.generation, "seq": self.seq,
            "tag_id": self.tag_id, "group_id": self.group_id,
        }  # fmt: skip

    @classmethod
    def parse(cls, obj: object) -> PointEntry:
        body = JsonObject(obj, "a recovery point")
        return cls(
            body.text("time"),
            body.integer("capture_ns"),
            body.integer("applied_ns"),
            body.choice("kind", POINT_KINDS),
            body.text("name"),
            body.integer("generation"),
            body.integer("seq"),
            body.text("tag_id"),
            body.text("group_id"),
        )


@dataclass(frozen=True, slots=True)
class PointsListing:
    """``GET /v1/disks/{disk}/points``: the window, and the newest points, newest first."""

    disk: str
    window: Window
    points: tuple[PointEntry, ...]
    #: older points exist than those listed
    more: bool

    def to_json(self) -> dict[str, object]:
        return {
            "disk": self.disk,
            "window": self.window.to_json(),
            "points": [p.to_json() for p in self.points],
            "more": self.more,
        }

    @classmethod
    def parse(cls, obj: object) -> PointsListing:
        body = JsonObject(obj, "a points listing")
        return cls(
            body.identifier("disk", "disk"),
            Window.parse(body.value("window")),
            tuple(PointEntry.parse(p) for p in body.array("points")),
            body.flag("more"),
        )


@dataclass(frozen=True, slots=True)
class RecoverAnswer:
    """What a recover or failover of one disk did."""

    point: PointEntry
    copied_bytes: int
    undo_parts: int
    undo_bytes: int
    copy_s: float
    total_s: float

    def to_json(self) -> dict[str, object]:
        return {
            "point": self.point.to_json(),
            "copied_bytes": self.copied_bytes,
            "undo_parts": self.undo_parts,
            "undo_bytes": self.undo_bytes,
            "copy_s": self.copy_s,
            "total_s": self.total_s,
        }

    @classmethod
    def parse(cls, obj: object) -> RecoverAnswer:
        body = JsonObject(obj, "a recover answer")
        return cls(
            PointEntry.parse(body.value("point")),
            body.integer("copied_bytes"),
            body.integer("undo_parts"),
            body.integer("undo_bytes"),
            body.number("copy_s"),
            body.number("total_s"),
        )


@dataclass(frozen=True, slots=True)
class MemberPosition:
    """Where one disk of a group point stands in its stream."""

    generation: int
    seq: int

    def to_json(self) -> dict[str, object]:
        return {"generation": self.generation, "seq": self.seq}

    @classmethod
    def parse(cls, obj: object) -> MemberPosition:
        body = JsonObject(obj, "a member's position")
        return cls(body.integer("generation"), body.integer("seq"))


@dataclass(frozen=True, slots=True)
class GroupPointEntry:
    """One point common to every disk of a group."""

    time: str
    capture_ns: int
    applied_ns: int
    kind: str
    name: str
    tag_id: str
    disks: Mapping[str, MemberPosition]

    def to_json(self) -> dict[str, object]:
        return {
            "time": self.time,
            "capture_ns": self.capture_ns,
            "applied_ns": self.applied_ns,
            "kind": self.kind,
            "name": self.name,
            "tag_id": self.tag_id,
            "disks": {disk: m.to_json() for disk, m in self.disks.items()},
        }

    @classmethod
    def parse(cls, obj: object) -> GroupPointEntry:
        body = JsonObject(obj, "a group point")
        return cls(
            body.text("time"),
            body.integer("capture_ns"),
            body.integer("applied_ns"),
            body.choice("kind", POINT_KINDS),
            body.text("name"),
            body.text("tag_id"),
            {d: MemberPosition.parse(m) for d, m in body.by_identifier("disks", "disk").items()},
        )


@dataclass(frozen=True, slots=True)
class GroupPointsListing:
    """``GET /v1/groups/{group}/points``: the window of common points, and the newest of them."""

    group: str
    disks: tuple[str, ...]
    window: Window
    points: tuple[GroupPointEntry, ...]
    more: bool

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "disks": list(self.disks),
            "window": self.window.to_json(),
            "points": [p.to_json() for p in self.points],
            "more": self.more,
        }

    @classmethod
    def parse(cls, obj: object) -> GroupPointsListing:
        body = JsonObject(obj, "a group points listing")
        return cls(
            body.identifier("group", "group"),
            body.identifiers("disks", "disk"),
            Window.parse(body.value("window")),
            tuple(GroupPointEntry.parse(p) for p in body.array("points")),
            body.flag("more"),
        )


@dataclass(frozen=True, slots=True)
class RecoveredDisk:
    """One disk of a group recover: where it was written, and what its recover did."""

    output: str
    result: RecoverAnswer

    def to_json(self) -> dict[str, object]:
        return {"output": self.output, **self.result.to_json()}

    @classmethod
    def parse(cls, obj: object) -> RecoveredDisk:
        return cls(JsonObject(obj, "a recovered disk").text("output"), RecoverAnswer.parse(obj))


@dataclass(frozen=True, slots=True)
class GroupRecoverAnswer:
    """What a recover of a group did: the point, and each disk's output and recover."""

    group: str
    point: GroupPointEntry
    disks: Mapping[str, RecoveredDisk]
    total_s: float

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "point": self.point.to_json(),
            "disks": {disk: r.to_json() for disk, r in self.disks.items()},
            "total_s": self.total_s,
        }

    @classmethod
    def parse(cls, obj: object) -> GroupRecoverAnswer:
        body = JsonObject(obj, "a group recover answer")
        return cls(
            body.identifier("group", "group"),
            GroupPointEntry.parse(body.value("point")),
            {d: RecoveredDisk.parse(r) for d, r in body.by_identifier("disks", "disk").items()},
            body.number("total_s"),
        )
