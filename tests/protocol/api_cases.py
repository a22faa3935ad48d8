"""Shared checks for the typed API messages: every way a body can break the form."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator

import pytest

from protocol.errors import MalformedError

Parse = Callable[[bytes], object]

#: Bodies that are no JSON object at all, whatever the message.
NOT_AN_OBJECT: dict[str, bytes] = {
    "empty": b"",
    "not-json": b"<html>502 Bad Gateway</html>",
    "not-utf8": b'{"disk": "\xff"}',
    "cut": b'{"disk": "vm01-d0", "generation": 1',
    "array": b"[1, 2]",
    "string": b'"ok"',
    "null": b"null",
    "number": b"200",
    "nested-deep": b"[" * 100_000 + b"]" * 100_000,
    "object-nested-deep": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
}


def wrong_values(value: object) -> Iterator[object]:
    """Values of the wrong type or range for a field that holds ``value``."""
    if isinstance(value, bool):
        yield from (1, 0, "true", None)
    elif isinstance(value, int):
        yield from (True, False, -1, 2**63, "1", 1.5, None, [value], {"n": value})
    elif isinstance(value, float):
        yield from (True, -1.0, math.nan, math.inf, "1.0", None)
    elif isinstance(value, str):
        yield from (5, None, True, [value])
    elif value is None:
        yield from (5, True, [1])
    else:
        yield from (5, "x", None)


def mutations(
    body: dict[str, object], nullable: tuple[str, ...] = ()
) -> Iterator[tuple[str, dict[str, object]]]:
    """``body`` without each field, and with each field given each wrong value
    (but null for the ``nullable`` ones)."""
    for key, value in body.items():
        yield f"no-{key}", {k: v for k, v in body.items() if k != key}
        for n, wrong in enumerate(wrong_values(value)):
            if not (wrong is None and key in nullable):
                yield f"{key}-{n}", {**body, key: wrong}


def check_refused(parse: Parse, raw: bytes) -> MalformedError:
    """``parse(raw)`` raises MalformedError (and nothing else) with a message saying both sides."""
    with pytest.raises(MalformedError) as caught:
        parse(raw)
    assert caught.value.code == "malformed"
    assert "expected" in caught.value.message
    assert "found" in caught.value.message
    return caught.value


def check_every_mutation_refused(
    parse: Parse, body: dict[str, object], nullable: tuple[str, ...] = ()
) -> int:
    """Every mutation of ``body`` is refused; ``body`` itself is not. Returns how many."""
    parse(json.dumps(body).encode())
    count = 0
    for name, broken in mutations(body, nullable):
        try:
            raw = json.dumps(broken, allow_nan=True).encode()
        except ValueError:  # pragma: no cover - every value above encodes
            continue
        try:
            check_refused(parse, raw)
        except BaseException as exc:
            raise AssertionError(f"mutation {name} was not refused: {broken}") from exc
        count += 1
    for name, raw in NOT_AN_OBJECT.items():
        try:
            check_refused(parse, raw)
        except BaseException as exc:
            raise AssertionError(f"body {name} was not refused") from exc
        count += 1
    return count
