"""The data key file: the key ring every process server and master target loads.

Format (TOML, written by ``blockrepl keys init``)::

    # blockrepl data key ring. Anyone holding this file can read every replicated write: ...
    format = "blockrepl-keyring-1"
    active = 0x1a2b3c4d
    [[key]]
    id = 0x1a2b3c4d
    key = "<base64 of 32 bytes>"
    created = 2026-11-22T02:19:32Z

``active`` names the key that seals new HRL files; every ``[[key]]`` stays so
that files sealed before a rotation can still be read. Key ids are u32, never
0 (protocol/keyring.py). The file must not be readable or writable by group or
others: like ssh with a private key, loading refuses it otherwise.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Final

from protocol.errors import MalformedError
from protocol.keyring import DATA_KEY_BYTES, KeyRing, check_key_id
from runtime.crashsafe import create_file_exclusive
from runtime.errors import AlreadyExistsError, KeyFileError
from runtime.privatefile import read_private_file

#: The ``format`` value of this layout; a later layout gets a new one.
KEYRING_FORMAT: Final = "blockrepl-keyring-1"
#: The key file's permission bits: the owner (the daemon's user) alone reads it.
KEY_FILE_MODE: Final = 0o600
#: Bytes of a key id, drawn at random (u32 on the wire).
KEY_ID_BYTES: Final = 4
#: Draws of a random key id before giving up: a zero id (reserved) comes once
#: in 2**32 draws, so a second zero in a row means the random source is broken.
MAX_KEY_ID_DRAWS: Final = 2
#: Largest key file read: a ring of hundreds of keys is a few tens of KiB, and
#: anything far larger is not a key file.
MAX_KEY_FILE_BYTES: Final = 1024 * 1024

_HEADER: Final = (
    "# blockrepl data key ring. Anyone holding this file can read every replicated write:"
    " mode 0600, back it up offline.\n"
)
_TOP_LEVEL_KEYS: Final = frozenset({"format", "active", "key"})
_KEY_ENTRY_KEYS: Final = frozenset({"id", "key", "created"})


def new_keyring_file_text(
    *, rng: Callable[[int], bytes] = os.urandom, now: dt.datetime | None = None
) -> str:
    """The text of a new key file holding one fresh random key, which is active.

    Args:
        rng: source of random bytes (``os.urandom``; tests pass a fixed one).
        now: creation time to record; the current UTC time by default.

    Raises:
        KeyFileError: ``rng`` returned a zero key id twice, or the wrong number of bytes.
    """
    key_id = _random_key_id(rng)
    key = rng(DATA_KEY_BYTES)
    if len(key) != DATA_KEY_BYTES:
        raise KeyFileError(f"random source gave {len(key)} bytes, expected {DATA_KEY_BYTES}")
    created = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return (
        _HEADER
        + f'format = "{KEYRING_FORMAT}"\n'
        + f"active = 0x{key_id:08x}\n"
        + "\n[[key]]\n"
        + f"id = 0x{key_id:08x}\n"
        + f'key = "{base64.b64encode(key).decode("ascii")}"\n'
        + f"created = {created.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
    )


def write_new_keyring(
    path: str | Path,
    *,
    rng: Callable[[int], bytes] = os.urandom,
    now: dt.datetime | None = None,
) -> KeyRing:
    """Create a new key file at ``path`` (mode 0600); never replace one.

    Returns:
        The key ring written (parsed back from the text before it is stored).

    Raises:
        AlreadyExistsError: ``path`` exists; it is left byte for byte as it was.
        DurabilityError: the file could not be written durably.
    """
    target = Path(path)
    if os.path.lexists(target):
        raise _refuse_existing(target)
    text = new_keyring_file_text(rng=rng, now=now)
    ring = parse_keyring(text, source=str(target))
    try:
        create_file_exclusive(target, text.encode("utf-8"), mode=KEY_FILE_MODE)
    except AlreadyExistsError:
        # Created by someone else since the check above.
        raise _refuse_existing(target) from None
    return ring


def load_keyring(path: str | Path) -> KeyRing:
    """Read and check the key file at ``path``.

    Raises:
        KeyFileError: the file is missing or unreadable, is readable or
            writable by group or others (the message gives the chmod that
            fixes it), or does not hold a valid key ring.
    """
    source = Path(path)
    data = read_private_file(
        source,
        what="key file",
        why="anyone who can read it can read every replicated write",
        max_bytes=MAX_KEY_FILE_BYTES,
        error=KeyFileError,
    )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"key file {source}: expected UTF-8 text: {exc}") from exc
    return parse_keyring(text, source=str(source))


def parse_keyring(text: str, *, source: str) -> KeyRing:
    """Check the text of a key file and build its key ring.

    Args:
        text: the file's content.
        source: where it came from, for messages.

    Raises:
        KeyFileError: not TOML, wrong ``format``, unknown keys, a bad id,
            base64 or key length, a duplicate id, or an ``active`` id that is
            not in the file.
    """
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeyFileError(f"key file {source}: not valid TOML: {exc}") from exc
    _check_known_keys(table, _TOP_LEVEL_KEYS, source, "")
    file_format = table.get("format")
    if file_format != KEYRING_FORMAT:
        raise KeyFileError(
            f'key file {source}: expected format = "{KEYRING_FORMAT}", found {file_format!r}'
        )
    if "active" not in table:
        raise KeyFileError(f"key file {source}: missing 'active' (the id of the key in use)")
    active = _key_id(table["active"], source, "active")
    entries = table.get("key")
    if not isinstance(entries, list) or not entries:
        raise KeyFileError(f"key file {source}: expected at least one [[key]] table, found none")
    keys: dict[int, bytes] = {}
    for index, entry in enumerate(entries):
        key_id, key = _parse_entry(entry, source, index)
        if key_id in keys:
            raise KeyFileError(f"key file {source}: key id 0x{key_id:08x} appears twice")
        keys[key_id] = key
    if active not in keys:
        raise KeyFileError(
            f"key file {source}: active key id 0x{active:08x} has no [[key]] entry"
            f" (ids present: {', '.join(f'0x{k:08x}' for k in sorted(keys))})"
        )
    try:
        return KeyRing(keys=keys, active_id=active)
    except MalformedError as exc:
        raise KeyFileError(f"key file {source}: {exc.message}") from exc


def _parse_entry(entry: object, source: str, index: int) -> tuple[int, bytes]:
    """Check one ``[[key]]`` table; return its id and key bytes."""
    where = f"key[{index}]"
    if not isinstance(entry, dict):
        raise KeyFileError(f"key file {source}: {where}: expected a [[key]] table")
    _check_known_keys(entry, _KEY_ENTRY_KEYS, source, f"{where}.")
    missing = sorted(_KEY_ENTRY_KEYS - set(entry))
    if missing:
        raise KeyFileError(f"key file {source}: {where}: missing '{missing[0]}'")
    key_id = _key_id(entry["id"], source, f"{where}.id")
    encoded = entry["key"]
    if not isinstance(encoded, str):
        raise KeyFileError(f"key file {source}: {where}.key: expected a base64 string")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(
            f"key file {source}: {where}.key: expected base64 of {DATA_KEY_BYTES} bytes,"
            f" found invalid base64 ({exc})"
        ) from exc
    if len(key) != DATA_KEY_BYTES:
        raise KeyFileError(
            f"key file {source}: {where}.key: expected {DATA_KEY_BYTES} bytes, found {len(key)}"
        )
    if not isinstance(entry["created"], dt.datetime):
        raise KeyFileError(
            f"key file {source}: {where}.created: expected a date-time such as"
            f" 2026-11-22T02:19:32Z, found {entry['created']!r}"
        )
    return key_id, key


def _key_id(value: object, source: str, where: str) -> int:
    """Check a key id value (an integer, usually written in hex)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise KeyFileError(
            f"key file {source}: {where}: expected an integer key id, found {value!r}"
        )
    try:
        return check_key_id(value)
    except MalformedError as exc:
        raise KeyFileError(f"key file {source}: {where}: {exc.message}") from exc


def _check_known_keys(
    table: dict[str, object], known: frozenset[str], source: str, prefix: str
) -> None:
    """Refuse keys the format does not define (a misspelt ``active`` must not pass)."""
    unknown = sorted(set(table) - known)
    if unknown:
        raise KeyFileError(
            f"key file {source}: unknown key {prefix}{unknown[0]}"
            f" (expected: {', '.join(sorted(known))})"
        )


def _random_key_id(rng: Callable[[int], bytes]) -> int:
    """A random key id in 1..2**32-1."""
    for _ in range(MAX_KEY_ID_DRAWS):
        key_id = int.from_bytes(rng(KEY_ID_BYTES), "big")
        if key_id != 0:
            return key_id
    raise KeyFileError("random source gave a zero key id twice in a row: it is broken")


def _refuse_existing(target: Path) -> AlreadyExistsError:
    """The refusal to replace a key file: data sealed with its keys would become unreadable."""
    return AlreadyExistsError(
        f"key file {target} exists already; refusing to replace it (files sealed with its"
        " keys would become unreadable). Keep it, or move it away first if it is not in use",
        details={"path": str(target)},
    )
