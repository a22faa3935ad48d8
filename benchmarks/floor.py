"""The floor: what each byte must cost on the way, measured on a run's own data.

Some work no implementation of this pipeline can skip. For each GB of write
data, on one core, the CPU seconds of:

- ``tls_encrypt`` / ``tls_decrypt``: TLS 1.3 (AES-256-GCM) through Python's
  ``ssl`` the way asyncio and uvloop use it (an ``SSLObject`` over memory
  BIOs), on each hop's bytes: the batches from the sources, the sealed files
  to the master target;
- ``encode``: the load generator (or agent) laying out its batches
  (protocol/batch.py: the table and the payload's XXH3-128);
- ``check``: the process server checking each batch as it decodes it
  (protocol/batch.py: the header, the payload's XXH3-128, the records),
  fed in the pieces TLS hands out;
- ``seal``: the process server sealing a batch's payload into an HRL file
  (zstd, AES-256-GCM: protocol/hrl.py);
- ``store``: the process server making each sealed file durable in its
  cache before it acknowledges it (a new file, written and fdatasync'd:
  docs/design.md invariant 1);
- ``verify``: the master target opening each file whole (AES-GCM, zstd,
  XXH3-128, the records: ``open_hrl``);
- ``before_image``: the master target's undo journal: reading what a write
  will overwrite, compressing and encrypting it into an undo file
  (protocol/undo.py), and syncing it;
- ``pwrite``: the write itself, with one ``fdatasync`` per file.

Each daemon's floor is the sum of its steps (the ship hop's TLS on the sealed
bytes, which compression makes fewer), and ``floor_MBps`` is what the
cores in use could carry if everything but the floor cost nothing:
cores ÷ (sources' + process server's + master target's floor). Each step is
the best of a few interleaved rounds, timed with the thread's CPU clock.
"""

from __future__ import annotations

import os
import random
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import zstandard

from agent.pki import init_ca, issue_machine
from protocol.batch import BatchDecoder, BatchHeader, EncodedBatch, lay_out_batch
from protocol.hrl import HrlSealer, open_hrl
from protocol.keyring import KeyRing
from protocol.records import Record, Write
from protocol.undo import seal_undo
from runtime.keyfile import load_keyring, write_new_keyring

#: TLS records carry at most 16 KiB; asyncio hands the SSL object up to
#: 256 KiB at a time (its read and write buffers).
TLS_WRITE_BYTES: Final = 256 * 2**10
#: The file the pwrite and before-image steps use: the writes fall at random
#: slots of it, sparse.
FILE_BYTES: Final = 1 << 30
GB: Final = 1e9


@dataclass(frozen=True)
class Floor:
    """CPU seconds per GB of write data of each step, and what they make."""

    steps: dict[str, float]
    compression_ratio: float
    cores: int

    @property
    def source_s_per_GB(self) -> float:
        return self.steps["encode"] + self.steps["tls_encrypt"]

    @property
    def ps_s_per_GB(self) -> float:
        ship = 1 / self.compression_ratio  # the sealed bytes per write byte
        return (
            self.steps["tls_decrypt"]
            + self.steps["check"]
            + self.steps["seal"]
            + self.steps["store"]
            + self.steps["tls_encrypt"] * ship
        )

    @property
    def mt_s_per_GB(self) -> float:
        ship = 1 / self.compression_ratio
        return (
            self.steps["tls_decrypt"] * ship
            + self.steps["verify"]
            + self.steps["before_image"]
            + self.steps["pwrite"]
        )

    @property
    def floor_MBps(self) -> float:
        total = self.source_s_per_GB + self.ps_s_per_GB + self.mt_s_per_GB
        return self.cores / total * 1000

    def figures(self) -> dict[str, object]:
        return {
            "floor_steps_s_per_GB": {k: round(v, 3) for k, v in self.steps.items()},
            "source_floor_s_per_GB": round(self.source_s_per_GB, 3),
            "ps_floor_s_per_GB": round(self.ps_s_per_GB, 3),
            "mt_floor_s_per_GB": round(self.mt_s_per_GB, 3),
            "floor_MBps": round(self.floor_MBps, 1),
            "floor_cores": self.cores,
        }


def measure_floor(
    blocks: list[bytes], per_batch: int, *, directory: Path, cores: int, rounds: int = 3
) -> Floor:
    """Each step on ``blocks``, cut into batches of ``per_batch`` writes."""
    with tempfile.TemporaryDirectory(dir=directory, prefix="floor-") as tmp:
        work = Path(tmp)
        keyring = _keyring(work)
        batches = _batches(blocks, per_batch)
        data_bytes = sum(len(b) for b in blocks)
        sealer = HrlSealer(keyring)
        laid = [_lay_out(records, seq) for seq, records in enumerate(batches, 1)]
        payloads = [b"".join(bytes(p) for p in batch.segments[1:]) for batch in laid]
        sealed = [
            _seal(sealer, batch.header, payload)
            for batch, payload in zip(laid, payloads, strict=True)
        ]
        sealed_bytes = sum(len(s) for s in sealed)
        tls = TlsPair.handshaken(work)
        wire = b"".join(payloads)
        pieces = _pieces(laid)
        fd = os.open(work / "target.img", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, FILE_BYTES)
            _pwrite(fd, batches)  # before-images are of data, as on a disk in use
            steps = {
                "encode": lambda: [_lay_out(r, n) for n, r in enumerate(batches, 1)],
                "check": lambda: _check(pieces, len(laid)),
                "seal": lambda: [
                    _seal(sealer, b.header, p) for b, p in zip(laid, payloads, strict=True)
                ],
                "store": lambda: _store(sealed, work),
                "verify": lambda: [open_hrl(s, keyring) for s in sealed],
                "before_image": lambda: _before_images(fd, batches, keyring, work),
                "pwrite": lambda: _pwrite(fd, batches),
            }
            best = dict.fromkeys([*steps, "tls_encrypt", "tls_decrypt"], float("inf"))
            for _ in range(rounds):  # interleaved: a noisy neighbour hurts each alike
                for name, step in steps.items():
                    best[name] = min(best[name], _cpu(step))
                encrypt, decrypt = tls.round(wire)
                best["tls_encrypt"] = min(best["tls_encrypt"], encrypt)
                best["tls_decrypt"] = min(best["tls_decrypt"], decrypt)
        finally:
            os.close(fd)
    per_gb = {name: seconds / data_bytes * GB for name, seconds in best.items()}
    return Floor(per_gb, data_bytes / sealed_bytes, cores)


def _keyring(work: Path) -> KeyRing:
    path = work / "keys.toml"
    write_new_keyring(path)
    return load_keyring(path)


def _batches(blocks: list[bytes], per_batch: int) -> list[list[Record]]:
    rng = random.Random(len(blocks))
    size = len(blocks[0])
    slots = FILE_BYTES // size
    records: list[Record] = [Write(rng.randrange(slots) * size, b) for b in blocks]
    return [records[i : i + per_batch] for i in range(0, len(records), per_batch)]


def _lay_out(records: list[Record], seq: int) -> EncodedBatch:
    now = time.time_ns()
    return lay_out_batch(
        disk_id="d", generation=1, first_seq=seq * 65_536, records=records,
        first_capture_ns=now, last_capture_ns=now,
    )  # fmt: skip


def _seal(sealer: HrlSealer, header: BatchHeader, payload: bytes) -> bytes:
    return sealer.seal(
        disk_id=header.disk_id, generation=header.generation, first_seq=header.first_seq,
        record_count=header.record_count, first_capture_ns=header.first_capture_ns,
        last_capture_ns=header.last_capture_ns, receive_ns=time.time_ns(), plaintext=payload,
        data_len=header.data_len, salt=os.urandom(32),
        plaintext_xxh3_128=header.payload_xxh3_128,
    ).to_bytes()  # fmt: skip


def _before_images(fd: int, batches: list[list[Record]], keyring: KeyRing, work: Path) -> None:
    """Read what each batch overwrites, seal it into an undo file, write and sync it."""
    compressor = zstandard.ZstdCompressor(level=1)
    path = work / "undo"
    for n, records in enumerate(batches, 1):
        before: list[Record] = [
            Write(r.offset, os.pread(fd, len(r.data), r.offset))
            for r in records
            if isinstance(r, Write)
        ]
        sealed = seal_undo(
            before, keyring=keyring, compressor=compressor, disk_id="d", generation=1,
            first_seq=n, last_seq=n, chunk=0, chunks=1, capture_ns=time.time_ns(),
            salt=os.urandom(32),
        )  # fmt: skip
        with path.open("wb") as out:
            out.write(sealed)
            out.flush()
            os.fdatasync(out.fileno())


def _pieces(laid: list[EncodedBatch]) -> list[bytes]:
    """The batches' wire bytes in the pieces TLS hands a server (made before timing)."""
    wire = memoryview(b"".join(bytes(part) for batch in laid for part in batch.segments))
    return [bytes(wire[i : i + TLS_WRITE_BYTES]) for i in range(0, len(wire), TLS_WRITE_BYTES)]


def _check(pieces: list[bytes], expected: int) -> int:
    """Decode batches from their wire pieces, every check made."""
    decoder = BatchDecoder(expected_disk_id="d")
    taken = 0
    for piece in pieces:
        decoder.feed(piece)
        taken += sum(1 for _ in decoder.events())
    decoder.feed_eof()
    taken += sum(1 for _ in decoder.events())
    if taken != expected:
        raise RuntimeError(f"expected {expected} batches decoded, found {taken}")
    return taken


def _store(sealed: list[bytes], work: Path) -> None:
    """Each sealed file written as a new file and made durable, then removed
    (as the shipper does once the master target holds it)."""
    for n, data in enumerate(sealed):
        path = work / f"cached-{n}.hrl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        path.unlink()


def _pwrite(fd: int, batches: list[list[Record]]) -> None:
    for records in batches:
        for record in records:
            if isinstance(record, Write):
                os.pwrite(fd, record.data, record.offset)
        os.fdatasync(fd)


def _cpu(step: Callable[[], object]) -> float:
    began = time.thread_time()
    step()
    return time.thread_time() - began


@dataclass
class TlsPair:
    """A client and a server SSL object over memory BIOs, as asyncio drives them."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    #: the client's outgoing records, and the server's incoming ones
    from_client: ssl.MemoryBIO
    to_server: ssl.MemoryBIO

    @classmethod
    def handshaken(cls, work: Path) -> TlsPair:
        """A pair that finished a TLS 1.3 handshake (certificates made under ``work``)."""
        pki = work / "pki"
        init_ca(pki)
        issue_machine(pki, "server")
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        server_ctx.load_cert_chain(pki / "machine-server.pem", pki / "machine-server.key")
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        to_client, from_client, to_server, from_server = (ssl.MemoryBIO() for _ in range(4))
        pair = cls(
            client_ctx.wrap_bio(to_client, from_client),
            server_ctx.wrap_bio(to_server, from_server, server_side=True),
            from_client,
            to_server,
        )
        for _ in range(10):
            done = 0
            for side in (pair.client, pair.server):
                try:
                    side.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            to_server.write(from_client.read())
            to_client.write(from_server.read())
            if done == 2:
                return pair
        raise RuntimeError("expected the TLS handshake over memory BIOs to finish, it did not")

    def round(self, data: bytes) -> tuple[float, float]:
        """CPU seconds to encrypt ``data`` on one side and decrypt it on the other."""
        view = memoryview(data)
        encrypt = decrypt = 0.0
        for start in range(0, len(view), TLS_WRITE_BYTES):
            began = time.thread_time()
            self.client.write(view[start : start + TLS_WRITE_BYTES])
            records = self.from_client.read()
            encrypt += time.thread_time() - began
            began = time.thread_time()
            self.to_server.write(records)
            while True:
                try:
                    if not self.server.read(TLS_WRITE_BYTES):
                        break
                except ssl.SSLWantReadError:
                    break
            decrypt += time.thread_time() - began
        return encrypt, decrypt
