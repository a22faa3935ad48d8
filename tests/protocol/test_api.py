"""The data APIs' JSON bodies as typed messages: the wire shape of docs/api.md
both ways, and every way a peer's body can break it refused with MalformedError."""

from __future__ import annotations

import contextlib
import json
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.api import (
    AckedPosition,
    BatchesAnswer,
    DiskList,
    DiskSummary,
    ErrorBody,
    FailedOver,
    GenerationAnswer,
    GenerationRequest,
    HrlAnswer,
    MtDiskState,
    PsDiskState,
    ReceivedPosition,
    SeqRefusal,
    StaleGeneration,
    refusal_of,
)
from protocol.errors import MalformedError
from protocol.sequencing import Admission, Fit
from tests.protocol.api_cases import check_every_mutation_refused, check_refused

DISK = "vm01-disk0"
ACKED = AckedPosition(DISK, 3, 1200)
RECEIVED = ReceivedPosition(DISK, 3, 1200, 3, 1100)

# The examples of docs/api.md, as a peer sends them.
PS_STATE = {"disk": DISK, "generation": 3, "acked_seq": 1200, "shipped_seq": 1100,
            "backlog_bytes": 3145728, "backlog_age_s": 2.4, "resync_required": False}  # fmt: skip
MT_STATE = {
    "disk": DISK, "generation": 3, "received_seq": 1200, "applied_generation": 3,
    "applied_seq": 1100, "target_size": 10737418240, "state": "replicating",
    "resync_open": False, "last_apply_error": "", "inbox_files": 4, "inbox_bytes": 3145728,
}  # fmt: skip
MT_POSITION = {"disk": DISK, "generation": 3, "received_seq": 1200, "applied_generation": 3,
               "applied_seq": 1100}  # fmt: skip
PS_POSITION = {"disk": DISK, "generation": 3, "acked_seq": 1200}

#: (name, message, the JSON a daemon sends for it)
WIRE: list[tuple[str, object, dict[str, object]]] = [
    ("batches-200", BatchesAnswer(ACKED), PS_POSITION),
    ("batches-gap", BatchesAnswer(ACKED, SeqRefusal("gap", 1201, "m")),
     {"error": "gap", "message": "m", "expected_seq": 1201, **PS_POSITION}),
    ("batches-overlap", BatchesAnswer(ACKED, SeqRefusal("overlap", 1201, "m")),
     {"error": "overlap", "message": "m", "expected_seq": 1201, **PS_POSITION}),
    ("batches-stale", BatchesAnswer(ACKED, StaleGeneration(3, "m")),
     {"error": "stale-generation", "message": "m", "current_generation": 3, **PS_POSITION}),
    ("generation-200", GenerationAnswer(ACKED), PS_POSITION),
    ("generation-stale", GenerationAnswer(StaleGeneration(3, "m")),
     {"error": "stale-generation", "message": "m", "current_generation": 3}),
    ("generation-request", GenerationRequest(4), {"generation": 4}),
    ("ps-state", PsDiskState(DISK, 3, 1200, 1100, 3145728, 2.4, False), PS_STATE),
    ("hrl-200", HrlAnswer(RECEIVED), MT_POSITION),
    ("hrl-gap", HrlAnswer(RECEIVED, SeqRefusal("gap", 1201, "m")),
     {"error": "gap", "message": "m", "expected_seq": 1201, **MT_POSITION}),
    ("hrl-stale", HrlAnswer(RECEIVED, StaleGeneration(3, "m")),
     {"error": "stale-generation", "message": "m", "current_generation": 3, **MT_POSITION}),
    ("hrl-failed-over", HrlAnswer(None, FailedOver("m")), {"error": "failed-over", "message": "m"}),
    ("mt-state", MtDiskState(RECEIVED, 10737418240, "replicating", False, "", 4, 3145728),
     MT_STATE),
    ("disks", DiskList((DiskSummary(DISK, "paused", 7),)),
     {"disks": [{"disk": DISK, "state": "paused", "applied_seq": 7}]}),
    ("error", ErrorBody("cache-full", "m", {"x": 1}),
     {"error": "cache-full", "message": "m", "x": 1}),
]  # fmt: skip


def _parser(message: object) -> partial[object]:
    """The parse_bytes of ``message``'s class, with its status where it takes one."""
    cls = type(message)
    status = getattr(message, "status", None)
    if status is None:
        return partial(cls.parse_bytes)  # type: ignore[attr-defined]
    return partial(cls.parse_bytes, status)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("message", "wire"), [(m, w) for _, m, w in WIRE],
                         ids=[n for n, _, _ in WIRE])  # fmt: skip
def test_the_wire_shape_both_ways(message: object, wire: dict[str, object]) -> None:
    assert message.to_json() == wire  # type: ignore[attr-defined]
    assert list(message.to_json()) == list(wire)  # the keys in the order the daemons send them
    assert _parser(message)(json.dumps(wire).encode()) == message


@pytest.mark.parametrize(("message", "wire"), [(m, w) for n, m, w in WIRE if n != "error"],
                         ids=[n for n, _, _ in WIRE if n != "error"])  # fmt: skip
def test_every_broken_field_is_refused(message: object, wire: dict[str, object]) -> None:
    assert check_every_mutation_refused(_parser(message), wire) > len(wire)


def test_fields_a_peer_adds_are_ignored() -> None:
    newer = {**PS_STATE, "compression": "zstd", "backlog_files": 3}
    assert PsDiskState.parse_bytes(json.dumps(newer).encode()).acked_seq == 1200


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, {"error": "gap", "message": "m", "expected_seq": 5, **PS_POSITION}),
        (409, {"error": "cache-full", "message": "m", **PS_POSITION}),  # not a 409 of batches
        (409, {"error": "failed-over", "message": "m", **PS_POSITION}),  # the master target's
        (409, {"error": "gap", "message": "m", "expected_seq": 0, **PS_POSITION}),
        (409, PS_POSITION),
        (503, PS_POSITION),
    ],
    ids=["200-with-gap", "409-cache-full", "409-failed-over", "expected-0", "409-bare", "503"],
)
def test_batches_answers_that_make_no_sense(status: int, body: dict[str, object]) -> None:
    raw = json.dumps(body).encode()
    if status == 200:  # a 200 is a 200: its extra fields are ignored
        assert BatchesAnswer.parse_bytes(status, raw).refusal is None
        return
    check_refused(partial(BatchesAnswer.parse_bytes, status), raw)


def test_a_generation_refusal_is_only_stale_generation() -> None:
    raw = json.dumps({"error": "gap", "message": "m", "expected_seq": 1}).encode()
    check_refused(partial(GenerationAnswer.parse_bytes, 409), raw)


def test_a_failed_over_answer_needs_no_position_and_others_do() -> None:
    failed = HrlAnswer.parse_bytes(409, b'{"error": "failed-over", "message": "m"}')
    assert failed == HrlAnswer(None, FailedOver("m"))
    check_refused(partial(HrlAnswer.parse_bytes, 409),
                  b'{"error": "gap", "message": "m", "expected_seq": 3}')  # fmt: skip
    with pytest.raises(ValueError, match="position"):
        HrlAnswer(None, SeqRefusal("gap", 3, "m"))


def test_disk_ids_are_checked() -> None:
    for disk in ("../etc", "", "x" * 65, "vm 01"):
        check_refused(PsDiskState.parse_bytes, json.dumps({**PS_STATE, "disk": disk}).encode())


@pytest.mark.parametrize(
    ("fit", "refusal"),
    [
        (Fit.GAP, SeqRefusal("gap", 11, "expected seq 11 of generation 3 next")),
        (Fit.OVERLAP, SeqRefusal("overlap", 11, "expected seq 11 of generation 3 next")),
        (Fit.STALE, StaleGeneration(3, "generation is older than the current generation 3")),
    ],
)
def test_refusal_of_an_admission(fit: Fit, refusal: object) -> None:
    assert refusal_of(Admission(fit, 11, 3)) == refusal


@pytest.mark.parametrize("fit", [Fit.NEXT, Fit.DUPLICATE])
def test_an_admitted_run_has_no_refusal(fit: Fit) -> None:
    with pytest.raises(ValueError, match="refused"):
        refusal_of(Admission(fit, 11, 3))


def test_an_error_body_that_breaks_the_form_is_still_explained() -> None:
    assert ErrorBody.explain(b'{"error": "forbidden", "message": "no"}').error == "forbidden"
    explained = ErrorBody.explain(b"<html>403 Forbidden</html>")
    assert explained.error == "malformed-answer"
    assert "<html>403 Forbidden" in explained.message
    assert ErrorBody.explain(b"[" * 100_000).error == "malformed-answer"


def test_generation_request_refuses_what_is_no_generation() -> None:
    for body in (b'{"generation": "7"}', b'{"generation": true}', b'{"generation": -1}',
                 b'{"generation": 9223372036854775808}', b"{}", b"7"):  # fmt: skip
        check_refused(GenerationRequest.parse_bytes, body)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
FIELDS = sorted({*PS_STATE, *MT_STATE, "error", "message", "expected_seq",
                 "current_generation", "disks", "acked_seq"})  # fmt: skip


@given(
    st.one_of(JSON, st.dictionaries(st.sampled_from(FIELDS), JSON)),
    st.sampled_from([200, 409]),
)
def test_any_json_parses_or_is_refused_as_malformed(value: object, status: int) -> None:
    raw = json.dumps(value).encode()
    for parse in (
        partial(BatchesAnswer.parse_bytes, status), partial(GenerationAnswer.parse_bytes, status),
        partial(HrlAnswer.parse_bytes, status), PsDiskState.parse_bytes, MtDiskState.parse_bytes,
        DiskList.parse_bytes, GenerationRequest.parse_bytes, ErrorBody.parse_bytes,
    ):  # fmt: skip
        with contextlib.suppress(MalformedError):  # anything else fails the test
            parse(raw)
