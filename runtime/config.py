"""TOML configuration loaded into frozen dataclasses, with errors that name the key and file.

Each daemon declares one frozen dataclass with unit-bearing field names
(``rpo_threshold_s``, ``cache_quota_bytes``) and loads it with
:func:`load_config`. The loader is typed by the dataclass itself: a field's
annotation says what the TOML value must be.

Supported field types: ``int`` (a boolean is refused), ``float`` (an integer is
accepted), ``bool``, ``str``, ``pathlib.Path`` (relative paths are resolved
against the config file's directory), ``Literal["a", "b"]`` of strings,
``tuple[X, ...]`` of a supported type (a TOML array), nested dataclasses (TOML
tables) and ``X | None``. A field without a default is required.

Unknown keys are errors: a typo must not silently leave a default in force.
A dataclass may check its values in ``__post_init__`` and raise
:class:`FieldValueError` naming the field; the loader adds the dotted key and
the file to the message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

from runtime.errors import ConfigError

T = TypeVar("T")

#: Log level names accepted in ``[logging] level``, as Python's logging module spells them.
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
#: TCP ports a listener may use; 0 ("any free port") is not a configurable address.
MIN_PORT: Final = 1
MAX_PORT: Final = 65535
#: Longest a configured timeout may be: a day; anything longer is a typo.
MAX_TIMEOUT_S: Final = 86400.0


class FieldValueError(ValueError):
    """A dataclass field holds a value outside what it allows.

    Raised from ``__post_init__``; :func:`from_table` turns it into a
    :class:`~runtime.errors.ConfigError` that names the dotted key and the file.

    Args:
        field: the field's name.
        message: what was expected and what was found.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_seconds(name: str, value: float, *, most: float | None = MAX_TIMEOUT_S) -> None:
    """Refuse a number of seconds that is not above 0 and at most ``most``.

    Args:
        name: the field, for the message.
        value: the seconds configured.
        most: the bound (a day by default: any longer timeout is a typo);
            None for a span that has none (a retention window).

    Raises:
        FieldValueError: naming ``name``, when it is not.
    """
    if most is None:
        if not value > 0:
            raise FieldValueError(name, f"expected seconds > 0, found {value}")
    elif not 0 < value <= most:
        raise FieldValueError(name, f"expected 0 < seconds <= {most:g}, found {value}")


def check_https_url(name: str, url: str) -> None:
    """Refuse a peer's URL that is not ``https://HOST[:PORT]`` with nothing after it.

    The clients put their API paths after it; a path, query, fragment or
    user name in the config would be silently dropped or end up in every
    request, and plain http would break mutual TLS (docs/design.md invariant 7).

    Raises:
        FieldValueError: naming ``name``, when it is not.
    """
    shape = f"expected https://HOST[:PORT] with nothing after it, found {url!r}"
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" or "]": not even a URL
        raise FieldValueError(name, shape) from None
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise FieldValueError(name, shape)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise FieldValueError(name, shape)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise FieldValueError(name, f"expected a port {MIN_PORT}..{MAX_PORT} in {url!r}")


# --- the building blocks every daemon's config reuses ------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The files of one side of a mutual-TLS connection (see docs/operations.md).

    Args:
        ca_file: the deployment CA certificate (``ca.pem``); the only CA trusted.
        cert_file: this program's certificate.
        key_file: its private key (mode 0600).
        crl_file: the CA's revocation list (``crl.pem`` from ``blockrepl certs
            revoke``); when set, a peer certificate it lists is refused.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path | None = None


#: Seconds a connection may sit without a whole request: before its first
#: request (a client that never finishes its headers, one byte at a time or
#: none) and between requests. Agents reconnect at once, so a minute costs
#: them nothing and bounds what an idle or slow client holds.
DEFAULT_IDLE_TIMEOUT_S: Final = 60.0
#: Seconds a request body may go without a new piece before the request is
#: answered 408 and the connection closed: far above any round trip and TCP
#: retransmission back-off of a working link, and it frees the disk the
#: stalled sender was writing.
DEFAULT_BODY_TIMEOUT_S: Final = 30.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConnectionTimeouts:
    """How long a data listener waits for a slow or silent client (``[connections]``).

    Args:
        idle_timeout_s: without a whole request (headers), from connect or the
            last answer, the connection is closed.
        body_timeout_s: without a new piece of the body, the request is
            answered 408 ``body-timeout`` and the connection closed.
    """

    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S

    def __post_init__(self) -> None:
        check_seconds("idle_timeout_s", self.idle_timeout_s)
        check_seconds("body_timeout_s", self.body_timeout_s)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsListen:
    """Address of a daemon's plain-HTTP Prometheus and health listener.

    Args:
        port: TCP port, 1..65535 (each daemon has its own default).
        host: address to bind; loopback by default, as metrics are not authenticated.
    """

    port: int
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not MIN_PORT <= self.port <= MAX_PORT:
            raise FieldValueError("port", f"expected {MIN_PORT}..{MAX_PORT}, found {self.port}")
        if not self.host:
            raise FieldValueError("host", "expected an address to bind, found an empty string")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """How a program logs to standard error.

    Args:
        level: one of :data:`LOG_LEVELS`.
        format: ``"text"`` for people (and journald), ``"json"`` for log shippers.
    """

    level: str = "info"
    format: Literal["text", "json"] = "text"

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise FieldValueError(
                "level", f"expected one of {', '.join(LOG_LEVELS)}, found {self.level!r}"
            )

    @property
    def level_number(self) -> int:
        """The level as a number of the logging module."""
        number: int = logging.getLevelName(self.level.upper())
        return number


# --- loading ------------------------------------------------------------------------


def load_config(cls: type[T], path: str | Path) -> T:
    """Read the TOML file ``path`` into the dataclass ``cls``.

    Relative paths in the file are resolved against the file's directory, so
    a config works the same whatever the working directory of the daemon.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or a key is unknown,
            missing or of the wrong type or value (the message names it).
    """
    source = Path(path)
    try:
        with source.open("rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: expected UTF-8 text, found invalid byte(s): {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return from_table(cls, table, source=str(source), base_dir=source.absolute().parent)


def from_table(
    cls: type[T],
    table: Mapping[str, object],
    *,
    source: str,
    prefix: str = "",
    base_dir: Path | None = None,
) -> T:
    """Build the dataclass ``cls`` from a parsed TOML table.

    Args:
        cls: a dataclass whose field annotations are supported types.
        table: the parsed TOML (or a sub-table of it).
        source: where the table came from, for messages (normally the file name).
        prefix: the dotted key of ``table`` within the file, ending in a dot
            (``"tls."``), for messages; empty at the top level.
        base_dir: the directory relative paths are resolved against; None
            leaves them relative.

    Raises:
        ConfigError: unknown, missing, mistyped or invalid keys.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]}"
            f" (expected one of: {', '.join(prefix + name for name in sorted(fields))})"
        )
    values: dict[str, Any] = {}
    for name, field in fields.items():
        key = prefix + name
        if name in table:
            values[name] = _convert(hints[name], table[name], key, source, base_dir)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {key}")
    try:
        return cls(**values)
    except FieldValueError as exc:
        raise ConfigError(f"{source}: {prefix}{exc.field}: {exc.message}") from exc


def _convert(kind: Any, value: object, key: str, source: str, base_dir: Path | None) -> Any:
    """Check ``value`` against the annotation ``kind`` and convert it."""
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        # TOML has no null: an optional field is either absent (its default)
        # or holds a value of the other type.
        options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(options) != 1:
            raise TypeError(f"{key}: only 'X | None' unions are supported, found {kind!r}")
        return _convert(options[0], value, key, source, base_dir)
    if origin is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed or isinstance(value, bool):
            choices = " or ".join(_show(choice) for choice in allowed)
            raise _mistyped(key, source, choices, value)
        return value
    if origin is tuple:
        return _convert_tuple(kind, value, key, source, base_dir)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        if not isinstance(value, dict):
            raise _mistyped(key, source, f"a table [{key}]", value)
        return from_table(kind, value, source=source, prefix=f"{key}.", base_dir=base_dir)
    return _convert_scalar(kind, value, key, source, base_dir)


def _convert_tuple(kind: Any, value: object, key: str, source: str, base_dir: Path | None) -> Any:
    """Convert a TOML array into ``tuple[X, ...]``."""
    args = typing.get_args(kind)
    if len(args) != 2 or args[1] is not Ellipsis:
        raise TypeError(f"{key}: only tuple[X, ...] is supported, found {kind!r}")
    if not isinstance(value, list):
        raise _mistyped(key, source, f"an array (of {_type_name(args[0], plural=True)})", value)
    return tuple(
        _convert(args[0], item, f"{key}[{index}]", source, base_dir)
        for index, item in enumerate(value)
    )


def _convert_scalar(kind: Any, value: object, key: str, source: str, base_dir: Path | None) -> Any:
    """Convert a TOML scalar into int, float, bool, str or Path."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        # bool is a subclass of int in Python; ``true`` for a count is a mistake.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is Path:
        if isinstance(value, str) and value:
            path = Path(value)
            return base_dir / path if base_dir is not None and not path.is_absolute() else path
        if value == "":
            raise ConfigError(f"{source}: {key}: expected a path, found an empty string")
    else:
        raise TypeError(f"{key}: unsupported config field type {kind!r}")
    raise _mistyped(key, source, _type_name(kind), value)


def _mistyped(key: str, source: str, expected: str, value: object) -> ConfigError:
    """The error for a value of the wrong type, naming the key and the file."""
    return ConfigError(f"{source}: {key}: expected {expected}, found {_describe(value)}")


def _type_name(kind: Any, *, plural: bool = False) -> str:
    """How a message names a supported type, in TOML's words."""
    singular = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    plurals = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if kind is Path:
        return "paths (strings)" if plural else "a path (string)"
    names = plurals if plural else singular
    return names.get(kind, getattr(kind, "__name__", repr(kind)))


def _describe(value: object) -> str:
    """A TOML value as a message shows it: its TOML type and, for scalars, the value."""
    if isinstance(value, bool):
        shown = f"a boolean {'true' if value else 'false'}"
    elif isinstance(value, int | float):
        shown = f"{'an integer' if isinstance(value, int) else 'a float'} {value}"
    elif isinstance(value, str):
        shown = f"a string {_show(value)}"
    elif isinstance(value, list | dict):
        shown = "an array" if isinstance(value, list) else "a table"
    elif isinstance(value, dt.datetime | dt.date | dt.time):
        shown = f"a date/time {value.isoformat()}"
    else:
        shown = repr(value)
    return shown


def _show(value: object) -> str:
    """A value as TOML writes it."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
