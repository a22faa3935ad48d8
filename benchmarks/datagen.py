"""Deterministic disk-like data for benchmarks.

Real disks hold a mix of incompressible blocks (media, encrypted or already
compressed files), zeroed blocks (free space, fresh allocations) and text-like
blocks (logs, configs, code, database pages of text). The default mix below
compresses about 2.5:1 at zstd level 1, in line with what block-level
replication products report for general-purpose servers.
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

#: Share of each kind of block in the default mix, tuned so zstd level 1
#: compresses the whole to about 2.5:1 (the ratio is printed by the benchmark).
MIX = (("random", 0.27), ("zero", 0.15), ("text", 0.58))

_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARNING", "ERROR")
_SOURCES = ("sshd", "kernel", "nginx", "postgres", "systemd", "cron", "app-server", "backup")
_MESSAGES = (
    "Accepted publickey for {user} from 10.0.{a}.{b} port {port} ssh2",
    "GET /api/v1/orders/{n} HTTP/1.1 200 {size} {ms}ms",
    "POST /api/v1/cart/{n}/items HTTP/1.1 201 {size} {ms}ms",
    "checkpoint complete: wrote {n} buffers ({ms}.{a}%); {b} WAL file(s) added",
    "Started Session {n} of user {user}.",
    "connection reset by peer while reading response header from upstream, client: 10.0.{a}.{b}",
    "({user}) CMD (run-parts /etc/cron.hourly) pid={port}",
    "EXT4-fs (sda{a}): mounted filesystem with ordered data mode. Quota mode: none.",
    "slow query: SELECT * FROM orders WHERE customer_id = {n} ORDER BY created_at DESC ({ms} ms)",
    "backup job {n} finished: {size} bytes in {ms} s, {b} files skipped",
)
_USERS = ("root", "alice", "bob", "deploy", "postgres", "www-data")


def _log_line(rng: random.Random) -> str:
    message = rng.choice(_MESSAGES).format(
        user=rng.choice(_USERS), a=rng.randint(0, 255), b=rng.randint(0, 255),
        port=rng.randint(1024, 65535), n=rng.randint(1, 10**6), size=rng.randint(100, 10**5),
        ms=rng.randint(1, 5000),
    )  # fmt: skip
    return (
        f"2026-11-{rng.randint(1, 30):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
        f"{rng.randint(0, 59):02d}.{rng.randint(0, 999999):06d}Z {rng.choice(_LEVELS)} "
        f"{rng.choice(_SOURCES)}[{rng.randint(1, 40000)}]: {message}\n"
    )


def _text_block(rng: random.Random, size: int) -> bytes:
    out = io.StringIO()
    length = 0
    while length < size:
        line = _log_line(rng)
        out.write(line)
        length += len(line)
    return out.getvalue().encode("ascii")[:size]


def synthetic_blocks(count: int, size: int, *, seed: int = 1) -> list[bytes]:
    """``count`` blocks of ``size`` bytes in the default mix, the same for a seed."""
    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    blocks = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        if kind == "random":
            blocks.append(rng.randbytes(size))
        elif kind == "zero":
            blocks.append(bytes(size))
        else:
            blocks.append(_text_block(rng, size))
    return blocks


def tar_blocks(root: Path, count: int, size: int) -> list[bytes]:
    """``count`` blocks of ``size`` bytes cut from a tar of the files under ``root``.

    The tar is built in memory, stopping once it holds enough bytes; files
    that cannot be read are skipped. Fewer blocks come back if ``root`` holds
    too little.
    """
    want = count * size
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in _files(root):
            if buf.tell() >= want:
                break
            try:
                tar.add(path, recursive=False)
            except OSError:
                continue
    data = buf.getvalue()
    return [data[i : i + size] for i in range(0, min(len(data), want) - size + 1, size)]


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path
