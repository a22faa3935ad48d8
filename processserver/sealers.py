"""Sealing batches into HRL files on the executor's threads.

zstd and AES-GCM release the GIL, so the executor's threads seal batches of
many disks at once; a zstd context is not thread-safe, so each thread keeps
a sealer of its own (protocol/hrl.py). Each file is sealed under a key and
nonce of its own, derived from a fresh random salt (docs/design.md invariant 8).
"""

from __future__ import annotations

import os
import threading

from protocol.batch import Batch
from protocol.hrl import HrlSealer, SealedHrl
from protocol.keyring import SALT_BYTES, KeyRing


class Sealers:
    """One HrlSealer per executor thread: a zstd context is not thread-safe."""

    def __init__(self, keyring: KeyRing, zstd_level: int) -> None:
        self._keyring = keyring
        self._level = zstd_level
        self._local = threading.local()

    def set_level(self, zstd_level: int) -> None:
        """Seal with this zstd level from now on (a reload); each thread makes a new sealer."""
        self._level = zstd_level

    def seal(self, batch: Batch, receive_ns: int) -> SealedHrl:
        """``batch`` as an HRL file (blocking: run it on the executor)."""
        sealer: HrlSealer | None = getattr(self._local, "sealer", None)
        if sealer is None or getattr(self._local, "level", None) != self._level:
            level = self._level
            sealer = self._local.sealer = HrlSealer(self._keyring, zstd_level=level)
            self._local.level = level
        h = batch.header
        return sealer.seal(
            disk_id=h.disk_id,
            generation=h.generation,
            first_seq=h.first_seq,
            record_count=h.record_count,
            first_capture_ns=h.first_capture_ns,
            last_capture_ns=h.last_capture_ns,
            receive_ns=receive_ns,
            plaintext=batch.payload,
            data_len=h.data_len,
            salt=os.urandom(SALT_BYTES),
            flags=h.flags,
            plaintext_xxh3_128=h.payload_xxh3_128,
        )
