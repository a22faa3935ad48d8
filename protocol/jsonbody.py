"""Reading JSON bodies field by field, for the typed messages of the APIs.

protocol/api.py and protocol/admin_api.py build their messages from a
peer's bytes with these. Every way a body can break the form is a
:class:`~protocol.errors.MalformedError` saying what was expected and what
was found: no bytes, not UTF-8, not JSON, nested deeper than the parser
goes, not an object, a field missing, of another type (``true`` is not an
integer, though Python's ``bool`` is an ``int``), out of range (a negative
seq), or not finite (``NaN``, ``Infinity``, which Python's json reads).
Fields the reader does not ask for are ignored: a newer peer may add some.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Final

from protocol.errors import MalformedError
from protocol.limits import MAX_SEQ, check_id

#: Characters of an offending value quoted in a message: enough to know it
#: again, not a whole document echoed into a log line.
MAX_QUOTED_CHARS: Final = 80


def loads(raw: bytes, what: str) -> object:
    """``raw`` as JSON.

    Args:
        what: the body's name for messages ("the state answer", ...).

    Raises:
        MalformedError: ``raw`` is empty, not UTF-8, not JSON, or nested too deep.
    """
    if not raw:
        raise MalformedError(f"expected {what} as JSON, found an empty body")
    try:
        return json.loads(raw)
    except RecursionError:  # a C stack's worth of [ or {: json gives up this way
        raise MalformedError(
            f"expected {what} as JSON, found JSON nested deeper than it can be read"
        ) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        raise MalformedError(
            f"expected {what} as JSON, found bytes that do not parse: {exc}"
        ) from None


def describe(value: object) -> str:
    """A short account of a JSON value for a message (containers by size, never by content)."""
    if isinstance(value, dict):
        return f"an object of {len(value)} fields"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."


class JsonObject:
    """One JSON object of a body, read field by field.

    Args:
        value: what ``json.loads`` gave.
        what: the object's name for messages.

    Raises:
        MalformedError: ``value`` is not an object.
    """

    def __init__(self, value: object, what: str) -> None:
        if not isinstance(value, dict):
            raise MalformedError(f"expected {what} to be a JSON object, found {describe(value)}")
        self.fields: Mapping[str, object] = value
        self.what = what

    def value(self, key: str) -> object:
        """The field as it is.

        Raises:
            MalformedError: there is no such field.
        """
        if key not in self.fields:
            raise MalformedError(f"expected {self.what} to hold {key!r}, found no such field")
        return self.fields[key]

    def _wrong(self, key: str, expected: str, value: object) -> MalformedError:
        return MalformedError(
            f"expected {key!r} of {self.what} to be {expected}, found {describe(value)}"
        )

    def integer(self, key: str, *, low: int = 0, high: int = MAX_SEQ) -> int:
        """An integer in ``low..high`` (0..2**63-1 unless told: a seq, a count, a size)."""
        value = self.value(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self._wrong(key, f"an integer in {low}..{high}", value)
        return value

    def number(self, key: str) -> float:
        """A finite number at or above zero (seconds)."""
        value = self.value(key)
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise self._wrong(key, "a finite number at or above 0", value)
        return float(value)

    def text(self, key: str) -> str:
        value = self.value(key)
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def optional_text(self, key: str) -> str | None:
        """A string or null."""
        value = self.value(key)
        if value is not None and not isinstance(value, str):
            raise self._wrong(key, "a string or null", value)
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.value(key)
        if value not in allowed:
            raise self._wrong(key, " or ".join(allowed), value)
        assert isinstance(value, str)
        return value

    def identifier(self, key: str, kind: str) -> str:
        """A disk or group id (protocol/limits.py)."""
        value = self.value(key)
        if not _is_id(kind, value):
            raise self._wrong(key, f"a {kind} id", value)
        assert isinstance(value, str)
        return value

    def identifiers(self, key: str, kind: str) -> tuple[str, ...]:
        """An array of disk or group ids."""
        values = self.array(key)
        for value in values:
            if not _is_id(kind, value):
                raise self._wrong(key, f"an array of {kind} ids", value)
        return tuple(str(v) for v in values)

    def by_identifier(self, key: str, kind: str) -> dict[str, object]:
        """An object whose keys are disk or group ids, its values as they are."""
        value = self.value(key)
        if not isinstance(value, dict):
            raise self._wrong(key, f"an object by {kind} id", value)
        for name in value:
            if not _is_id(kind, name):
                raise self._wrong(key, f"an object by {kind} id", name)
        return dict(value)

    def flag(self, key: str) -> bool:
        value = self.value(key)
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false", value)
        return value

    def array(self, key: str) -> list[object]:
        value = self.value(key)
        if not isinstance(value, list):
            raise self._wrong(key, "an array", value)
        return value

    def rest(self, *known: str) -> dict[str, object]:
        """The fields other than ``known``, as they are."""
        return {k: v for k, v in self.fields.items() if k not in known}


def _is_id(kind: str, value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        check_id(kind, value)
    except MalformedError:
        return False
    return True
