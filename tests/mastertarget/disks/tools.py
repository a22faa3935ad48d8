"""qemu-img / qemu-io wrappers and the random workload the back-end tests share.

The reference for "the disk is right" is always qemu: a target is compared
with a plain raw model file by ``qemu-img compare`` and checked by
``qemu-img check``, tools that share no code with the back-ends.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mastertarget.disks.base import TargetDisk
from tests.conftest import require_binary

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run qemu-img; the caller looks at the exit status and output."""
    binary = require_binary("qemu-img")
    return subprocess.run(
        [binary, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def qemu_io(path: Path, fmt: str, *commands: str) -> str:
    """Run qemu-io commands on an image; fail the test if qemu-io does."""
    binary = require_binary("qemu-io")
    argv = [binary, "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run(
        [*argv, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "fail" not in result.stdout.lower(), result.stdout
    return result.stdout


def assert_same(target: Path, fmt: str, model: Path) -> None:
    """qemu-img compare says the target holds exactly the model's bytes."""
    result = qemu_img("compare", "-f", fmt, "-F", "raw", target, model)
    assert result.returncode == 0, result.stdout + result.stderr


def assert_checks(target: Path) -> str:
    """qemu-img check finds nothing wrong with a VMDK; returns what it said."""
    result = qemu_img("check", "-f", "vmdk", target)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def allocated_bytes(target: Path) -> int:
    """Bytes qemu reports as data in a VMDK (allocated grains)."""
    result = qemu_img("map", "--output=json", "-f", "vmdk", target)
    assert result.returncode == 0, result.stderr
    return sum(entry["length"] for entry in json.loads(result.stdout) if entry["data"])


class Model:
    """The expected content of a disk as a sparse raw file (qemu-img compare's reference)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        with open(path, "xb") as handle:
            handle.truncate(size)
        self._fd = os.open(path, os.O_RDWR)

    def write(self, offset: int, data: bytes) -> None:
        assert os.pwrite(self._fd, data, offset) == len(data)

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class Op:
    """One write (``data`` set) or zero of the workload."""

    offset: int
    length: int
    data: bytes | None


def random_ops(
    rng: random.Random, size: int, hot_spots: list[int], count: int, max_length: int = 200 * KIB
) -> list[Op]:
    """Writes and zeros at unaligned offsets, most of them near ``hot_spots``.

    Hot spots are where bugs live: the start and end of the disk, extent
    boundaries, grain-table boundaries. About one operation in seven is a
    zero; lengths cross grain boundaries (64 KiB) often.
    """
    ops: list[Op] = []
    for _ in range(count):
        length = rng.choice([1, 511, 512, 4096, 65536, rng.randrange(1, max_length)])
        length = min(length, size)
        if rng.random() < 0.8:
            spot = rng.choice(hot_spots)
            offset = spot + rng.randrange(-300 * KIB, 300 * KIB)
        else:
            offset = rng.randrange(0, size)
        offset = max(0, min(offset, size - length))
        if rng.random() < 0.15:
            ops.append(Op(offset, length, None))
        else:
            ops.append(Op(offset, length, rng.randbytes(length)))
    # The very last bytes of the disk, always.
    ops.append(Op(size - 4097, 4097, rng.randbytes(4097)))
    ops.append(Op(size - 1, 1, b"\xee"))
    return ops


def run_workload(
    disk: TargetDisk, model: Model, ops: list[Op], rng: random.Random, *, flush_every: int = 40
) -> None:
    """Apply ``ops`` to the disk and the model, reading back at random points."""
    for number, op in enumerate(ops, start=1):
        if op.data is None:
            disk.zero(op.offset, op.length)
            model.zero(op.offset, op.length)
        else:
            disk.write(op.offset, op.data)
            model.write(op.offset, op.data)
        if rng.random() < 0.2:
            # Read back around the change, including not yet flushed data.
            start = max(0, op.offset - rng.randrange(0, 70 * KIB))
            length = min(model.size - start, op.length + rng.randrange(0, 140 * KIB))
            assert disk.read(start, length) == model.read(start, length), (number, op.offset)
        if number % flush_every == 0:
            disk.flush()
    disk.flush()
