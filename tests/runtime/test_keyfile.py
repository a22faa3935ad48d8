"""The data key file: its exact text, its checks, its mode, and refusing to replace it."""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol.keyring import KeyRing
from runtime.errors import AlreadyExistsError, KeyFileError
from runtime.keyfile import (
    KEYRING_FORMAT,
    load_keyring,
    new_keyring_file_text,
    parse_keyring,
    write_new_keyring,
)

NOW = dt.datetime(2026, 11, 22, 2, 19, 32, 999, tzinfo=dt.UTC)
KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode()


def fixed_rng(*chunks: bytes) -> Callable[[int], bytes]:
    """A random source that returns the given chunks in turn, checking their sizes."""
    queue = list(chunks)

    def rng(size: int) -> bytes:
        chunk = queue.pop(0)
        assert len(chunk) == size
        return chunk

    return rng


def key_file_text(*entries: tuple[int, str], active: int, extra: str = "") -> str:
    lines = [f'format = "{KEYRING_FORMAT}"', f"active = {active:#x}", extra]
    for key_id, key in entries:
        lines += [
            "[[key]]",
            f"id = {key_id:#x}",
            f'key = "{key}"',
            "created = 2026-11-22T02:19:32Z",
        ]
    return "\n".join(lines) + "\n"


def test_new_keyring_file_text_is_exactly_the_documented_format() -> None:
    text = new_keyring_file_text(rng=fixed_rng(b"\x1a\x2b\x3c\x4d", KEY), now=NOW)
    assert text == (
        "# blockrepl data key ring. Anyone holding this file can read every replicated write:"
        " mode 0600, back it up offline.\n"
        'format = "blockrepl-keyring-1"\n'
        "active = 0x1a2b3c4d\n"
        "\n"
        "[[key]]\n"
        "id = 0x1a2b3c4d\n"
        f'key = "{KEY_B64}"\n'
        "created = 2026-11-22T02:19:32Z\n"
    )
    ring = parse_keyring(text, source="<test>")
    assert ring.active_id == 0x1A2B3C4D
    assert dict(ring.keys) == {0x1A2B3C4D: KEY}


def test_new_key_id_is_never_zero() -> None:
    text = new_keyring_file_text(rng=fixed_rng(bytes(4), b"\x00\x00\x00\x07", KEY), now=NOW)
    assert "active = 0x00000007\n" in text
    with pytest.raises(KeyFileError, match="zero key id twice"):
        new_keyring_file_text(rng=fixed_rng(bytes(4), bytes(4)), now=NOW)


def test_new_key_time_is_written_in_utc() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    text = new_keyring_file_text(
        rng=fixed_rng(b"\x00\x00\x00\x01", KEY), now=dt.datetime(2026, 1, 1, 0, 30, tzinfo=paris)
    )
    assert "created = 2025-12-31T23:30:00Z\n" in text


def test_write_new_keyring_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    written = write_new_keyring(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_keyring(path)
    assert isinstance(loaded, KeyRing)
    assert loaded == written
    assert len(loaded.data_key(loaded.active_id)) == 32
    # A fresh ring each time: ids and keys are random.
    other = write_new_keyring(tmp_path / "other.toml")
    assert other.data_key(other.active_id) != loaded.data_key(loaded.active_id)


def test_write_new_keyring_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    write_new_keyring(path)
    before = (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino)
    with pytest.raises(AlreadyExistsError, match=r"keys\.toml exists already; refusing to replace"):
        write_new_keyring(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert os.listdir(tmp_path) == ["keys.toml"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o700 | 0o004])
def test_load_refuses_a_key_file_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys.toml"
    write_new_keyring(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as caught:
        load_keyring(path)
    assert f"has mode {mode:04o}" in caught.value.message
    assert f"chmod 600 {path}" in caught.value.message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_owner_only_modes(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys.toml"
    write_new_keyring(path)
    path.chmod(mode)
    assert load_keyring(path).active_id


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"cannot open key file .*absent\.toml"):
        load_keyring(tmp_path / "absent.toml")


def test_load_through_a_symlink_checks_the_target_mode(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    ring = write_new_keyring(real)
    (tmp_path / "link.toml").symlink_to(real)  # a symlink itself is always 0777
    assert load_keyring(tmp_path / "link.toml") == ring
    real.chmod(0o644)
    with pytest.raises(KeyFileError, match="has mode 0644"):
        load_keyring(tmp_path / "link.toml")


def test_rotated_ring_keeps_old_keys(tmp_path: Path) -> None:
    old = base64.b64encode(b"\x01" * 32).decode()
    text = key_file_text((0x11, old), (0x22, KEY_B64), active=0x22)
    ring = parse_keyring(text, source="<test>")
    assert ring.active_id == 0x22
    assert ring.data_key(0x11) == b"\x01" * 32


BAD_FILES = [
    (
        key_file_text((1, KEY_B64), active=1).replace(KEYRING_FORMAT, "blockrepl-keyring-9"),
        "expected format = \"blockrepl-keyring-1\", found 'blockrepl-keyring-9'",
    ),
    (key_file_text((1, KEY_B64), active=1).replace("format", "# format"), "expected format ="),
    (key_file_text((1, KEY_B64), active=1).replace("active = 0x1", ""), "missing 'active'"),
    (key_file_text((1, KEY_B64), active=2), "active key id 0x00000002 has no [[key]] entry"),
    (
        key_file_text((1, KEY_B64), active=1).replace("active = 0x1", "active = true"),
        "active: expected an integer key id, found True",
    ),
    (
        key_file_text((1, KEY_B64), active=1).replace("active = 0x1", 'active = "0x1"'),
        "active: expected an integer key id",
    ),
    (key_file_text((0, KEY_B64), active=0), "active: key id must be in 1..4294967295, found 0"),
    (key_file_text((2**32, KEY_B64), active=1), "key[0].id: key id must be in 1..4294967295"),
    (key_file_text(active=1), "expected at least one [[key]] table"),
    (key_file_text((1, "not base64!"), active=1), "key[0].key: expected base64 of 32 bytes"),
    (key_file_text((1, KEY_B64[:-4]), active=1), "key[0].key: expected 32 bytes, found 30"),
    (
        key_file_text((1, base64.b64encode(bytes(33)).decode()), active=1),
        "expected 32 bytes, found 33",
    ),
    (key_file_text((1, KEY_B64), (1, KEY_B64), active=1), "key id 0x00000001 appears twice"),
    (key_file_text((1, KEY_B64), active=1, extra="actve = 1"), "unknown key actve"),
    (key_file_text((1, KEY_B64), active=1) + "comment = 'x'\n", "unknown key key[0].comment"),
    (
        key_file_text((1, KEY_B64), active=1).replace("created = 2026-11-22T02:19:32Z\n", ""),
        "key[0]: missing 'created'",
    ),
    (
        key_file_text((1, KEY_B64), active=1).replace("2026-11-22T02:19:32Z", '"yesterday"'),
        "key[0].created: expected a date-time",
    ),
    (
        key_file_text((1, KEY_B64), active=1).replace('key = "', "key = 5 #"),
        "key[0].key: expected a base64 string",
    ),
    ("format = = 1\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_load_refuses_bad_contents(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        load_keyring(path)
    assert caught.value.message.startswith(f"key file {path}")
    assert message in caught.value.message
    assert caught.value.exit_code == 78


def test_load_refuses_an_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    with path.open("w") as file:
        file.writelines(itertools.repeat("# padding padding padding padding\n", 40_000))
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a key file"):
        load_keyring(path)


def test_write_new_keyring_losing_a_race_leaves_the_other_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file appears after the up-front check: link(2) still refuses it.
    path = tmp_path / "keys.toml"
    path.write_bytes(b"theirs")
    monkeypatch.setattr(os.path, "lexists", lambda _path: False)
    with pytest.raises(AlreadyExistsError, match="refusing to replace"):
        write_new_keyring(path)
    assert path.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["keys.toml"]
