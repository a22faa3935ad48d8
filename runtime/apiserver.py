"""What the data APIs of both daemons share: error answers, the caller's name, query numbers.

Every answer that is not a success is the JSON error body of docs/api.md
(``protocol.api.ErrorBody``); a 503 carries ``Retry-After``; a refusal
before the body was read, and an answer to a body that stopped coming,
close the connection (the unread rest must not be parsed as a request).
"""

from __future__ import annotations

import math
from typing import Final

from aiohttp import web

from protocol.api import ErrorBody
from protocol.errors import BlockreplError, MalformedError
from runtime.errors import BodyTimeoutError, PeerIdentityError
from runtime.tls import connection_identity

#: Seconds a client is asked to wait after a 503 (a full cache or inbox, a
#: write that failed): long enough for the receiver to drain some files.
RETRY_AFTER_S: Final = 5
#: The most digits of a decimal number in a URL: 2**63 - 1 has 19.
MAX_DECIMAL_DIGITS: Final = 19


def error_answer(status: int, code: str, message: str, **details: object) -> web.Response:
    """The JSON error body with ``status``; a 503 says when to come back."""
    response = web.json_response(ErrorBody(code, message, details).to_json(), status=status)
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def exception_answer(exc: BlockreplError) -> web.Response:
    """The answer to a request that ``exc`` stopped."""
    response = error_answer(exc.http_status, exc.code, exc.message, **exc.details)
    if isinstance(exc, BodyTimeoutError):
        response.force_close()  # the rest of the body is not read: the connection is spent
    return response


def forbidden(reason: str) -> web.Response:
    """403, before a byte of the body is read: the connection is closed with it."""
    refusal = error_answer(403, "forbidden", reason)
    refusal.force_close()  # the body stays unread: the connection cannot be reused
    return refusal


def caller(request: web.Request) -> tuple[str | None, str]:
    """The machine the client certificate names, or None and why there is none."""
    try:
        if request.transport is not None:
            return connection_identity(request.transport.get_extra_info("ssl_object")), ""
    except PeerIdentityError as exc:
        return None, exc.message
    return None, "no TLS connection"


def decimal(text: str, what: str) -> int:
    """``text`` as a decimal number of at most 19 ASCII digits.

    Raises:
        MalformedError: anything else (a sign, a space, a Unicode digit).
    """
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_DECIMAL_DIGITS:
        raise MalformedError(f"{what} must be a decimal number, found {text!r}")
    return int(text)


def query_int(request: web.Request, name: str, default: int | None = None) -> int:
    """The query parameter ``name`` as a decimal number; ``default`` when absent (None: required).

    Raises:
        MalformedError: absent and required, or not a decimal number.
    """
    text = request.query.get(name)
    if text is None:
        if default is None:
            raise MalformedError(f"query parameter {name} is required")
        return default
    return decimal(text, f"query parameter {name}")


def query_flag(request: web.Request, name: str) -> bool:
    """The query parameter ``name`` as ``1`` (true) or ``0`` (false); false when absent.

    Raises:
        MalformedError: any other value.
    """
    text = request.query.get(name, "0")
    if text not in ("0", "1"):
        raise MalformedError(f"query parameter {name} must be 0 or 1, found {text!r}")
    return text == "1"


def query_seconds(request: web.Request, name: str, most: float) -> float:
    """The query parameter ``name`` as seconds in 0..``most`` (0 when absent).

    Raises:
        MalformedError: not a number, or out of range.
    """
    text = request.query.get(name, "0")
    try:
        value = float(text)
    except ValueError:
        raise MalformedError(
            f"query parameter {name} must be seconds in 0..{most:g}, found {text!r}"
        ) from None
    if math.isnan(value) or not 0 <= value <= most:
        raise MalformedError(f"query parameter {name} must be in 0..{most:g}, found {text!r}")
    return value
