"""Key ring and per-file key derivation."""

from __future__ import annotations

import os

import pytest

from protocol.errors import MalformedError, UnknownKeyError
from protocol.keyring import KeyRing, derive_file_key

from .test_hrl import _hkdf_sha256


def test_derivation_is_hkdf_sha256_of_key_and_salt() -> None:
    key, salt = os.urandom(32), os.urandom(32)
    fk = derive_file_key(key, salt)
    okm = _hkdf_sha256(key, salt, b"blockrepl hrl v1 aes-256-gcm key+nonce", 44)
    assert (fk.key, fk.nonce) == (okm[:32], okm[32:])


def test_every_salt_gives_its_own_key_and_nonce() -> None:
    key = os.urandom(32)
    derived = {derive_file_key(key, os.urandom(32)).nonce for _ in range(1000)}
    assert len(derived) == 1000


@pytest.mark.parametrize(("key", "salt"), [(b"k" * 31, b"s" * 32), (b"k" * 32, b"s" * 16)])
def test_lengths_are_checked(key: bytes, salt: bytes) -> None:
    with pytest.raises(MalformedError):
        derive_file_key(key, salt)


def test_ring_checks_ids_keys_and_active() -> None:
    with pytest.raises(MalformedError, match="key id"):
        KeyRing({0: os.urandom(32)}, 0)
    with pytest.raises(MalformedError, match="32 bytes"):
        KeyRing({1: b"short"}, 1)
    with pytest.raises(MalformedError, match="not in the key ring"):
        KeyRing({1: os.urandom(32)}, 2)


def test_ring_is_frozen_and_never_prints_keys() -> None:
    source = {1: b"K" * 32}
    ring = KeyRing(source, 1)
    source[1] = b"X" * 32
    assert ring.data_key(1) == b"K" * 32
    assert "KKKK" not in repr(ring)
    with pytest.raises(UnknownKeyError, match="00000002"):
        ring.data_key(2)
