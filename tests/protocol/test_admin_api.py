"""The admin API's JSON bodies as typed messages: docs/api.md's shapes both
ways, requests refused as the admin socket refuses them, broken answers refused."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from protocol.admin_api import (
    FailoverRequest,
    GroupPointEntry,
    GroupPointsListing,
    GroupRecoverAnswer,
    GroupRecoverRequest,
    MemberPosition,
    PointEntry,
    PointsListing,
    RecoverAnswer,
    RecoveredDisk,
    RecoverRequest,
    Window,
)
from protocol.jsonbody import loads
from tests.protocol.api_cases import check_every_mutation_refused, check_refused

POINT = {"time": "2026-11-22T03:39:55Z", "capture_ns": 1795318795000000000,
         "applied_ns": 1795318795412000000, "kind": "crash", "name": "", "generation": 3,
         "seq": 1200, "tag_id": "", "group_id": ""}  # fmt: skip
WINDOW = {"oldest": "2026-11-21T03:40:00.000000001Z", "newest": "2026-11-22T03:39:55Z",
          "points": 17250, "window_s": 86395.0}  # fmt: skip
RECOVERED = {"point": POINT, "copied_bytes": 1073741824, "undo_parts": 412,
             "undo_bytes": 268435456, "copy_s": 3.1, "total_s": 5.4}  # fmt: skip
GROUP_POINT = {"time": "2026-11-22T03:39:00Z", "capture_ns": 1795318740000000000,
               "applied_ns": 1795318740512000000, "kind": "crash",
               "name": "crash-20261122T033900Z", "tag_id": "5f0c",
               "disks": {"app01-disk0": {"generation": 3, "seq": 1200},
                         "db01-disk0": {"generation": 1, "seq": 88410}}}  # fmt: skip
LISTING = {"disk": "vm01-disk0", "window": WINDOW, "points": [POINT], "more": True}
GROUP_LISTING = {"group": "erp", "disks": ["app01-disk0", "db01-disk0"], "window": WINDOW,
                 "points": [GROUP_POINT], "more": False}  # fmt: skip
GROUP_RECOVERED = {"group": "erp", "point": GROUP_POINT,
                   "disks": {"app01-disk0": {"output": "/srv/erp/app01-disk0.raw", **RECOVERED}},
                   "total_s": 7.9}  # fmt: skip

Parse = Callable[[object], object]

#: (name, parse, the JSON the daemon sends)
ANSWERS: list[tuple[str, Parse, dict[str, object]]] = [
    ("point", PointEntry.parse, POINT),
    ("window", Window.parse, WINDOW),
    ("points", PointsListing.parse, LISTING),
    ("recover", RecoverAnswer.parse, RECOVERED),
    ("group-point", GroupPointEntry.parse, GROUP_POINT),
    ("group-points", GroupPointsListing.parse, GROUP_LISTING),
    ("group-recover", GroupRecoverAnswer.parse, GROUP_RECOVERED),
]


@pytest.mark.parametrize(("parse", "wire"), [(p, w) for _, p, w in ANSWERS],
                         ids=[n for n, _, _ in ANSWERS])  # fmt: skip
def test_the_answers_both_ways(parse: Parse, wire: dict[str, object]) -> None:
    message = parse(json.loads(json.dumps(wire)))
    assert message.to_json() == wire  # type: ignore[attr-defined]


@pytest.mark.parametrize(("parse", "wire"), [(p, w) for _, p, w in ANSWERS],
                         ids=[n for n, _, _ in ANSWERS])  # fmt: skip
def test_every_broken_field_of_an_answer_is_refused(parse: Parse, wire: dict[str, object]) -> None:
    refused = check_every_mutation_refused(
        lambda raw: parse(loads(raw, "x")), wire, nullable=("oldest", "newest")
    )
    assert refused > len(wire)


def test_a_broken_nested_field_is_refused() -> None:
    deeper = json.loads(json.dumps(GROUP_RECOVERED))
    deeper["disks"]["app01-disk0"]["point"]["seq"] = -1
    raw = json.dumps(deeper).encode()
    check_refused(lambda raw: GroupRecoverAnswer.parse(loads(raw, "x")), raw)
    bad_disk = {**GROUP_POINT, "disks": {"../x": {"generation": 1, "seq": 1}}}
    raw = json.dumps(bad_disk).encode()
    check_refused(lambda raw: GroupPointEntry.parse(loads(raw, "x")), raw)


def test_the_typed_answers_are_what_the_daemon_sends() -> None:
    point = PointEntry("2026-11-22T03:39:55Z", 1795318795000000000, 1795318795412000000,
                       "crash", "", 3, 1200, "", "")  # fmt: skip
    answer = RecoverAnswer(point, 1073741824, 412, 268435456, 3.1, 5.4)
    group = GroupRecoverAnswer(
        "erp",
        GroupPointEntry("2026-11-22T03:39:00Z", 1795318740000000000, 1795318740512000000,
                        "crash", "crash-20261122T033900Z", "5f0c",
                        {"app01-disk0": MemberPosition(3, 1200),
                         "db01-disk0": MemberPosition(1, 88410)}),
        {"app01-disk0": RecoveredDisk("/srv/erp/app01-disk0.raw", answer)}, 7.9,
    )  # fmt: skip
    assert answer.to_json() == RECOVERED
    assert group.to_json() == GROUP_RECOVERED
    assert GroupRecoverAnswer.parse(GROUP_RECOVERED) == group


def test_requests_both_ways() -> None:
    recover = RecoverRequest("latest", "/srv/out.raw", "vmdk")
    assert RecoverRequest.parse_bytes(json.dumps(recover.to_json()).encode()) == recover
    assert RecoverRequest.parse_bytes(b'{"point": "latest", "output": "/o"}').format == "raw"
    assert FailoverRequest.parse_bytes(b'{"point": "tag:x"}') == FailoverRequest("tag:x")
    group = GroupRecoverRequest("latest-app", "/srv/erp")
    assert GroupRecoverRequest.parse_bytes(json.dumps(group.to_json()).encode()) == group


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"point": "latest", "output": "out.raw"}, "expected 'output' to be an absolute path"),
        ({"point": "latest"}, "expected 'output' to be an absolute path"),
        ({"point": "latest", "output": "/o", "format": "qcow2"}, "expected 'format' raw or vmdk"),
        ({"point": 5, "output": "/o"}, "expected 'point' to be a SPEC string"),
        ({"output": "/o"}, "expected 'point' to be a SPEC string"),
    ],
)
def test_recover_requests_are_refused_as_before(body: dict[str, object], said: str) -> None:
    error = check_refused(RecoverRequest.parse_bytes, json.dumps(body).encode())
    assert error.message.startswith(said), error.message


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[]", b'"latest"', b"\xff\xfe", b"[" * 2000, b"null"],
    ids=["empty", "cut", "array", "string", "not-utf8", "nested", "null"],
)  # fmt: skip
def test_request_bodies_that_are_no_object_are_refused(raw: bytes) -> None:
    for parse in (RecoverRequest.parse_bytes, FailoverRequest.parse_bytes,
                  GroupRecoverRequest.parse_bytes):  # fmt: skip
        check_refused(parse, raw)
