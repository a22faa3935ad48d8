"""The messages of a group round between the coordinator and a member (sans-IO).

One JSON object per line each way, on one mutual-TLS connection per round
(docs/groups.md, "The round on the wire"). The coordinator sends, in order:

=========================================  ==============================================
request                                    answer
=========================================  ==============================================
``{"op": "prepare", "version": 1,          ``{"ok": true, "machine": M, "disks": [D, ...]}``
"group": G, "kind": "crash"|"app",         once every disk's capture answers (and, for
"name": N, "tag_id": HEX32, "time_ns":     ``app``, the quiesce commands ran)
NS, "barrier_max_s": B}``
``{"op": "hold"}``                         ``{"ok": true}`` once every disk's writes are held
``{"op": "tag"}``                          ``{"ok": true, "disks": [{"disk": D,
                                           "generation": G, "seq": S, "consistent": B}]}``
``{"op": "resume", "outcome":              ``{"ok": true, "held_s": X}`` once every disk is
"committed"|"aborted"}``                   released (the unquiesce commands then run)
=========================================  ==============================================

A refusal is ``{"ok": false, "error": CODE, "message": TEXT}``. A member
that loses the connection, or whose barrier bound passes, releases at once.

Nothing here does I/O: bytes in, checked values out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from protocol.errors import MalformedError
from protocol.limits import MAX_TAG_NAME_BYTES, check_id
from protocol.records import TAG_ID_BYTES

#: The version a prepare carries; a member refuses one it does not speak.
PROTOCOL_VERSION: Final = 1
#: Longest line either way: a prepare is a few hundred bytes, a tag answer
#: a hundred per disk; anything near this is not a peer of ours.
MAX_LINE_BYTES: Final = 64 * 1024
#: What a round may be.
KINDS: Final = ("crash", "app")
OUTCOMES: Final = ("committed", "aborted")
OPS: Final = ("prepare", "hold", "tag", "resume")


@dataclass(frozen=True, slots=True)
class RoundSpec:
    """What one round is, as the coordinator announces it in its prepare."""

    group: str
    kind: str
    name: str
    tag_id: str
    time_ns: int
    barrier_max_s: float

    def __post_init__(self) -> None:
        check_id("group", self.group)
        if self.kind not in KINDS:
            raise MalformedError(f"expected kind crash or app, found {self.kind!r}")
        if len(self.name.encode("utf-8", "surrogatepass")) > MAX_TAG_NAME_BYTES:
            raise MalformedError(f"expected a name of at most {MAX_TAG_NAME_BYTES} bytes")
        try:
            raw = bytes.fromhex(self.tag_id)
        except ValueError:
            raw = b""
        if len(raw) != TAG_ID_BYTES:
            raise MalformedError(f"expected a tag_id of {TAG_ID_BYTES * 2} hex digits")
        if not 0 < self.barrier_max_s <= 60:
            raise MalformedError(f"expected barrier_max_s in (0, 60], found {self.barrier_max_s}")

    @property
    def app(self) -> bool:
        return self.kind == "app"

    def prepare(self) -> dict[str, object]:
        """The prepare request that announces this round."""
        return {"op": "prepare", "version": PROTOCOL_VERSION, "group": self.group,
                "kind": self.kind, "name": self.name, "tag_id": self.tag_id,
                "time_ns": self.time_ns, "barrier_max_s": self.barrier_max_s}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a member reads it: ``spec`` for a prepare, ``outcome`` for a resume."""

    op: str
    spec: RoundSpec | None = None
    outcome: str = ""


def encode(message: dict[str, object]) -> bytes:
    """One message as its line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, object]:
    """A line as the JSON object it must be.

    Raises:
        MalformedError: not one JSON object, or longer than MAX_LINE_BYTES.
    """
    if len(line) > MAX_LINE_BYTES:
        raise MalformedError(f"expected a line of at most {MAX_LINE_BYTES} bytes")
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json parses
        value = None
    if not isinstance(value, dict):
        raise MalformedError(f"expected one JSON object per line, found {line[:80]!r}")
    return value


def parse_request(line: bytes) -> Request:
    """A member's view of one request line.

    Raises:
        MalformedError: not a request of this protocol (the message says why).
    """
    message = decode(line)
    op = message.get("op")
    if op not in OPS:
        raise MalformedError(f"expected op {', '.join(OPS)}, found {op!r}")
    if op == "resume":
        outcome = message.get("outcome")
        if outcome not in OUTCOMES:
            raise MalformedError(f"expected outcome committed or aborted, found {outcome!r}")
        return Request("resume", outcome=str(outcome))
    if op != "prepare":
        return Request(str(op))
    if message.get("version") != PROTOCOL_VERSION:
        raise MalformedError(
            f"expected group protocol version {PROTOCOL_VERSION}, found {message.get('version')!r}"
        )
    texts = [message.get(key) for key in ("group", "kind", "name", "tag_id")]
    strings = [text for text in texts if isinstance(text, str)]
    if len(strings) != len(texts):
        raise MalformedError("expected group, kind, name and tag_id as strings")
    time_ns, barrier = message.get("time_ns"), message.get("barrier_max_s")
    if not isinstance(time_ns, int) or isinstance(time_ns, bool):
        raise MalformedError(f"expected time_ns as an integer, found {time_ns!r}")
    if not isinstance(barrier, int | float) or isinstance(barrier, bool):
        raise MalformedError(f"expected barrier_max_s as a number, found {barrier!r}")
    group, kind, name, tag_id = strings
    return Request("prepare", spec=RoundSpec(group, kind, name, tag_id, time_ns, float(barrier)))


def refusal(code: str, message: str) -> dict[str, object]:
    return {"ok": False, "error": code, "message": message}
