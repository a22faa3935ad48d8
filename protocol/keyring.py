"""The key ring: key id -> 32-byte data key, and the per-file key derivation.

Each HRL file is encrypted under a key and nonce of its own, derived with
HKDF-SHA256 from the data key named by the header's key id and the header's
random 32-byte salt (docs/design.md invariant 8). Two files share a (key, nonce)
pair only if their salts collide, which for 256 random bits does not happen;
within one file the nonce is used once. Key ids let a deployment rotate: new
files use the active key, old files still name the key that sealed them.

Sans-IO: the salt is an argument, drawn by the caller from ``os.urandom``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import MalformedError, UnknownKeyError

#: AES-256 needs 32 bytes of key.
DATA_KEY_BYTES: Final = 32
#: The HKDF salt in each HRL header: 256 random bits make a collision between
#: two files' derived keys as unlikely as guessing the data key.
SALT_BYTES: Final = 32
#: The GCM nonce length the AES-GCM standard recommends (96 bits).
NONCE_BYTES: Final = 12
#: Key ids are u32 on the wire; 0 is reserved as "no key" so a zeroed header
#: never names a real key.
MAX_KEY_ID: Final = 2**32 - 1

#: Binds derived keys to this use: the same data key used elsewhere (a future
#: format version) derives unrelated keys.
HKDF_INFO: Final = b"blockrepl hrl v1 aes-256-gcm key+nonce"


def check_key_id(key_id: int) -> int:
    """Return ``key_id`` if it is a valid key id (1 .. 2**32-1).

    Raises:
        MalformedError: out of range.
    """
    if not 1 <= key_id <= MAX_KEY_ID:
        raise MalformedError(f"key id must be in 1..{MAX_KEY_ID}, found {key_id}")
    return key_id


@dataclass(frozen=True)
class FileKey:
    """The AES-256-GCM key and nonce of one HRL file."""

    key: bytes
    nonce: bytes


def derive_file_key(data_key: bytes, salt: bytes) -> FileKey:
    """Derive the key and nonce of one HRL file from the data key and its salt.

    Raises:
        MalformedError: the data key or the salt has the wrong length.
    """
    if len(data_key) != DATA_KEY_BYTES:
        raise MalformedError(f"data key must be {DATA_KEY_BYTES} bytes, found {len(data_key)}")
    if len(salt) != SALT_BYTES:
        raise MalformedError(f"KDF salt must be {SALT_BYTES} bytes, found {len(salt)}")
    okm = HKDF(
        algorithm=SHA256(), length=DATA_KEY_BYTES + NONCE_BYTES, salt=salt, info=HKDF_INFO
    ).derive(data_key)
    return FileKey(key=okm[:DATA_KEY_BYTES], nonce=okm[DATA_KEY_BYTES:])


@dataclass(frozen=True)
class KeyRing:
    """Data keys by id, and which one seals new files.

    Args:
        keys: key id -> 32-byte data key.
        active_id: the id new HRL files are sealed with; must be in ``keys``.

    Raises:
        MalformedError: an id out of range, a key of the wrong length, or an
            active id that is not in the ring.
    """

    keys: Mapping[int, bytes]
    active_id: int

    def __post_init__(self) -> None:
        for key_id, key in self.keys.items():
            check_key_id(key_id)
            if len(key) != DATA_KEY_BYTES:
                raise MalformedError(
                    f"data key {key_id:08x} must be {DATA_KEY_BYTES} bytes, found {len(key)}"
                )
        if self.active_id not in self.keys:
            raise MalformedError(
                f"active key id {self.active_id:08x} is not in the key ring "
                f"(ids present: {', '.join(f'{k:08x}' for k in sorted(self.keys)) or 'none'})"
            )
        # A read-only copy: the caller's dict can change no key after the check.
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    def __repr__(self) -> str:  # never print key material
        ids = ", ".join(f"{k:08x}" for k in sorted(self.keys))
        return f"KeyRing(ids=[{ids}], active_id={self.active_id:08x})"

    def data_key(self, key_id: int) -> bytes:
        """The data key with this id.

        Raises:
            UnknownKeyError: the ring has no such key.
        """
        try:
            return self.keys[key_id]
        except KeyError:
            raise UnknownKeyError(
                f"key id {key_id:08x} is not in the key ring "
                f"(ids present: {', '.join(f'{k:08x}' for k in sorted(self.keys))})",
                details={"key_id": f"{key_id:08x}"},
            ) from None

    def file_key(self, key_id: int, salt: bytes) -> FileKey:
        """The key and nonce of the HRL file sealed with ``key_id`` and ``salt``."""
        return derive_file_key(self.data_key(key_id), salt)
