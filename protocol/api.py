"""The JSON bodies of the two data APIs (docs/api.md), as typed messages.

Both sides use these: a server builds its answer as a message and sends
``to_json()``; a client reads a peer's answer with ``parse`` (an object
``json.loads`` gave) or ``parse_bytes`` (the body). Parsing is strict about
what a client acts on — every documented field present, of its type, in
range — and ignores fields it does not know. Anything else is a
:class:`~protocol.errors.MalformedError` naming what was expected and what
was found; the client treats it as a failed exchange and tries again later.

Answers of the process server (9443)::

    POST batches     BatchesAnswer     200 AckedPosition; 409 gap, overlap, stale-generation
    POST generation  GenerationAnswer  200 AckedPosition; 409 stale-generation
    GET state        PsDiskState       200

and of the master target (9444)::

    PUT hrl          HrlAnswer         200 ReceivedPosition; 409 gap, overlap,
                                       stale-generation, failed-over
    GET state        MtDiskState       200
    GET /v1/disks    DiskList          200

Every other answer of either is an :class:`ErrorBody`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from protocol.errors import BlockreplError, MalformedError
from protocol.jsonbody import JsonObject, loads
from protocol.limits import MAX_DISK_BYTES, KiB
from protocol.sequencing import Admission, Fit

#: The longest answer a client of a data API reads. The longest is a state
#: answer of a few hundred bytes, or an error whose message names a few
#: paths; a peer sending more is broken, and is not buffered without end.
MAX_ANSWER_BYTES: Final = 64 * KiB
#: The statuses whose body a client acts on; any other answer is an ErrorBody.
OK: Final = 200
CONFLICT: Final = 409


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """``{"error": CODE, "message": TEXT, ...details}``: every answer that is not a success."""

    error: str
    message: str
    details: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: BlockreplError) -> ErrorBody:
        return cls(exc.code, exc.message, exc.details)

    def to_json(self) -> dict[str, object]:
        return {"error": self.error, "message": self.message, **self.details}

    @classmethod
    def parse(cls, obj: object) -> ErrorBody:
        body = JsonObject(obj, "an error answer")
        return cls(body.text("error"), body.text("message"), body.rest("error", "message"))

    @classmethod
    def parse_bytes(cls, raw: bytes) -> ErrorBody:
        return cls.parse(loads(raw, "an error answer"))

    @classmethod
    def explain(cls, raw: bytes) -> ErrorBody:
        """The error a body tells, or — where only the status counts and the body
        only explains (a proxy's HTML page, say) — what is wrong with it."""
        try:
            return cls.parse_bytes(raw)
        except MalformedError as exc:
            start = raw[:200].decode("utf-8", "replace")
            return cls("malformed-answer", f"{exc.message} (the body began {start!r})")


# --- refusals: where a run does not fit in a disk's stream (protocol/sequencing.py) ---


@dataclass(frozen=True, slots=True)
class SeqRefusal:
    """409 ``gap`` or ``overlap``: the receiver expects ``expected_seq`` next."""

    code: Literal["gap", "overlap"]
    expected_seq: int
    message: str

    def to_json(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, "expected_seq": self.expected_seq}


@dataclass(frozen=True, slots=True)
class StaleGeneration:
    """409 ``stale-generation``: the receiver is on ``current_generation``."""

    current_generation: int
    message: str

    def to_json(self) -> dict[str, object]:
        return {"error": "stale-generation", "message": self.message,
                "current_generation": self.current_generation}  # fmt: skip


@dataclass(frozen=True, slots=True)
class FailedOver:
    """409 ``failed-over`` (the master target): the disk takes no more data."""

    message: str

    def to_json(self) -> dict[str, object]:
        return {"error": "failed-over", "message": self.message}


StreamRefusal = SeqRefusal | StaleGeneration
Refusal = SeqRefusal | StaleGeneration | FailedOver


def refusal_of(admission: Admission) -> StreamRefusal:
    """The answer to a run that is not next and not a duplicate.

    Raises:
        ValueError: the admission is NEXT or DUPLICATE (a caller's bug).
    """
    if admission.fit is Fit.STALE:
        return StaleGeneration(
            admission.generation,
            f"generation is older than the current generation {admission.generation}",
        )
    if admission.fit in (Fit.GAP, Fit.OVERLAP):
        return SeqRefusal(
            "gap" if admission.fit is Fit.GAP else "overlap",
            admission.expected_seq,
            f"expected seq {admission.expected_seq} of generation {admission.generation} next",
        )
    raise ValueError(f"expected a refused admission, found {admission.fit.value}")


def _refusal(body: JsonObject, allowed: tuple[str, ...]) -> Refusal:
    code = body.choice("error", allowed)
    message = body.text("message")
    if code in ("gap", "overlap"):
        kind: Literal["gap", "overlap"] = "gap" if code == "gap" else "overlap"
        return SeqRefusal(kind, body.integer("expected_seq", low=1), message)
    if code == "stale-generation":
        return StaleGeneration(body.integer("current_generation", low=1), message)
    return FailedOver(message)


def _status(status: int, allowed: tuple[int, ...], what: str) -> None:
    if status not in allowed:
        raise MalformedError(f"expected {what} with status {allowed}, found status {status}")


# --- the process server (9443) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AckedPosition:
    """``{"disk", "generation", "acked_seq"}``: how far the process server holds a disk's stream."""

    disk: str
    generation: int
    acked_seq: int

    def to_json(self) -> dict[str, object]:
        return {"disk": self.disk, "generation": self.generation, "acked_seq": self.acked_seq}

    @classmethod
    def parse(cls, obj: object) -> AckedPosition:
        body = JsonObject(obj, "a process server's position")
        return cls(
            body.identifier("disk", "disk"), body.integer("generation"), body.integer("acked_seq")
        )


@dataclass(frozen=True, slots=True)
class BatchesAnswer:
    """The answer of ``POST /v1/disks/{disk}/batches``: 200 (every batch stored
    or a duplicate) or 409 (``refusal``), each with the disk's position."""

    position: AckedPosition
    refusal: StreamRefusal | None = None

    @property
    def status(self) -> int:
        return OK if self.refusal is None else CONFLICT

    def to_json(self) -> dict[str, object]:
        refused = {} if self.refusal is None else self.refusal.to_json()
        return {**refused, **self.position.to_json()}

    @classmethod
    def parse(cls, status: int, obj: object) -> BatchesAnswer:
        _status(status, (OK, CONFLICT), "an answer to batches")
        position = AckedPosition.parse(obj)
        if status == OK:
            return cls(position)
        refusal = _refusal(
            JsonObject(obj, "a refusal of batches"), ("gap", "overlap", "stale-generation")
        )
        assert not isinstance(refusal, FailedOver)
        return cls(position, refusal)

    @classmethod
    def parse_bytes(cls, status: int, raw: bytes) -> BatchesAnswer:
        return cls.parse(status, loads(raw, "an answer to batches"))


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """``{"generation": N}``: start generation N of a disk's stream."""

    generation: int

    def to_json(self) -> dict[str, object]:
        return {"generation": self.generation}

    @classmethod
    def parse(cls, obj: object) -> GenerationRequest:
        return cls(JsonObject(obj, 'a generation request {"generation": N}').integer("generation"))

    @classmethod
    def parse_bytes(cls, raw: bytes) -> GenerationRequest:
        return cls.parse(loads(raw, 'a generation request {"generation": N}'))


@dataclass(frozen=True, slots=True)
class GenerationAnswer:
    """The answer of ``POST /v1/disks/{disk}/generation``: 200 with the disk's
    new position, or 409 ``stale-generation`` naming the current one."""

    outcome: AckedPosition | StaleGeneration

    @property
    def status(self) -> int:
        return OK if isinstance(self.outcome, AckedPosition) else CONFLICT

    def to_json(self) -> dict[str, object]:
        return self.outcome.to_json()

    @classmethod
    def parse(cls, status: int, obj: object) -> GenerationAnswer:
        _status(status, (OK, CONFLICT), "an answer to a generation request")
        if status == OK:
            return cls(AckedPosition.parse(obj))
        refusal = _refusal(JsonObject(obj, "a refusal of a generation"), ("stale-generation",))
        assert isinstance(refusal, StaleGeneration)
        return cls(refusal)

    @classmethod
    def parse_bytes(cls, status: int, raw: bytes) -> GenerationAnswer:
        return cls.parse(status, loads(raw, "an answer to a generation request"))


@dataclass(frozen=True, slots=True)
class PsDiskState:
    """``GET /v1/disks/{disk}/state`` of the process server."""

    disk: str
    generation: int
    acked_seq: int
    #: the last seq the master target acknowledged to this process server
    shipped_seq: int
    backlog_bytes: int
    backlog_age_s: float
    resync_required: bool

    def to_json(self) -> dict[str, object]:
        return {
            "disk": self.disk, "generation": self.generation, "acked_seq": self.acked_seq,
            "shipped_seq": self.shipped_seq, "backlog_bytes": self.backlog_bytes,
            "backlog_age_s": self.backlog_age_s, "resync_required": self.resync_required,
        }  # fmt: skip

    @classmethod
    def parse(cls, obj: object) -> PsDiskState:
        body = JsonObject(obj, "a process server's disk state")
        return cls(
            body.identifier("disk", "disk"),
            body.integer("generation"),
            body.integer("acked_seq"),
            body.integer("shipped_seq"),
            body.integer("backlog_bytes"),
            body.number("backlog_age_s"),
            body.flag("resync_required"),
        )

    @classmethod
    def parse_bytes(cls, raw: bytes) -> PsDiskState:
        return cls.parse(loads(raw, "a process server's disk state"))


# --- the master target (9444) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedPosition:
    """How far the master target holds a disk's stream (received) and has applied it."""

    disk: str
    generation: int
    received_seq: int
    applied_generation: int
    applied_seq: int

    def to_json(self) -> dict[str, object]:
        return {"disk": self.disk, "generation": self.generation,
                "received_seq": self.received_seq, "applied_generation": self.applied_generation,
                "applied_seq": self.applied_seq}  # fmt: skip

    @classmethod
    def parse(cls, obj: object) -> ReceivedPosition:
        body = JsonObject(obj, "a master target's position")
        return cls(
            body.identifier("disk", "disk"),
            body.integer("generation"),
            body.integer("received_seq"),
            body.integer("applied_generation"),
            body.integer("applied_seq"),
        )


@dataclass(frozen=True, slots=True)
class HrlAnswer:
    """The answer of ``PUT /v1/disks/{disk}/hrl/{generation}/{seq}``: 200 (the
    file is durable, or a duplicate) or 409 (``refusal``). Every answer but
    ``failed-over`` carries the disk's position."""

    position: ReceivedPosition | None
    refusal: Refusal | None = None

    def __post_init__(self) -> None:
        if (self.position is None) != isinstance(self.refusal, FailedOver):
            raise ValueError("expected a position in every HRL answer but failed-over")

    @property
    def status(self) -> int:
        return OK if self.refusal is None else CONFLICT

    def to_json(self) -> dict[str, object]:
        refused = {} if self.refusal is None else self.refusal.to_json()
        return {**refused, **({} if self.position is None else self.position.to_json())}

    @classmethod
    def parse(cls, status: int, obj: object) -> HrlAnswer:
        _status(status, (OK, CONFLICT), "an answer to an HRL file")
        if status == OK:
            return cls(ReceivedPosition.parse(obj))
        refusal = _refusal(
            JsonObject(obj, "a refusal of an HRL file"),
            ("gap", "overlap", "stale-generation", "failed-over"),
        )
        if isinstance(refusal, FailedOver):
            return cls(None, refusal)
        return cls(ReceivedPosition.parse(obj), refusal)

    @classmethod
    def parse_bytes(cls, status: int, raw: bytes) -> HrlAnswer:
        return cls.parse(status, loads(raw, "an answer to an HRL file"))


@dataclass(frozen=True, slots=True)
class MtDiskState:
    """``GET /v1/disks/{disk}/state`` of the master target."""

    position: ReceivedPosition
    target_size: int
    #: replicating, resync-required, paused or failed-over (docs/api.md)
    state: str
    resync_open: bool
    last_apply_error: str
    inbox_files: int
    inbox_bytes: int

    def to_json(self) -> dict[str, object]:
        return {
            **self.position.to_json(),
            "target_size": self.target_size,
            "state": self.state,
            "resync_open": self.resync_open,
            "last_apply_error": self.last_apply_error,
            "inbox_files": self.inbox_files,
            "inbox_bytes": self.inbox_bytes,
        }

    @classmethod
    def parse(cls, obj: object) -> MtDiskState:
        body = JsonObject(obj, "a master target's disk state")
        return cls(
            ReceivedPosition.parse(obj),
            body.integer("target_size", high=MAX_DISK_BYTES),
            body.text("state"),
            body.flag("resync_open"),
            body.text("last_apply_error"),
            body.integer("inbox_files"),
            body.integer("inbox_bytes"),
        )

    @classmethod
    def parse_bytes(cls, raw: bytes) -> MtDiskState:
        return cls.parse(loads(raw, "a master target's disk state"))


@dataclass(frozen=True, slots=True)
class DiskSummary:
    """One disk of ``GET /v1/disks``."""

    disk: str
    state: str
    applied_seq: int

    def to_json(self) -> dict[str, object]:
        return {"disk": self.disk, "state": self.state, "applied_seq": self.applied_seq}

    @classmethod
    def parse(cls, obj: object) -> DiskSummary:
        body = JsonObject(obj, "a disk of the master target's list")
        return cls(body.identifier("disk", "disk"), body.text("state"), body.integer("applied_seq"))


@dataclass(frozen=True, slots=True)
class DiskList:
    """``GET /v1/disks``: every disk the master target replicates."""

    disks: tuple[DiskSummary, ...]

    def to_json(self) -> dict[str, object]:
        return {"disks": [d.to_json() for d in self.disks]}

    @classmethod
    def parse(cls, obj: object) -> DiskList:
        body = JsonObject(obj, "the master target's disk list")
        return cls(tuple(DiskSummary.parse(d) for d in body.array("disks")))

    @classmethod
    def parse_bytes(cls, raw: bytes) -> DiskList:
        return cls.parse(loads(raw, "the master target's disk list"))
