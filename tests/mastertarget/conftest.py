"""A deployment for master target tests: a CA, certificates, a key ring, and
a way to start real master targets on loopback and talk to them over mTLS."""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest_asyncio

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from protocol.hrl import HrlSealer, SealedHrl
from protocol.records import NO_FLAGS, Record, StreamFlags, Write, Zero
from tests.conftest import Deployment


def write_config(
    deployment: Deployment, root: Path, disks: list[dict[str, object]], **extra: object
) -> Path:
    """A master target config file in ``root`` with ``disks`` (TOML tables as dicts)."""
    lines = [
        'process_servers = ["ps01"]',
        f'key_file = "{deployment.key_file}"',
        f'cache_dir = "{root / "cache"}"',
        f'admin_socket = "{root / "admin.sock"}"',
        *(f"{k} = {v}" for k, v in extra.items()),
        "[tls]",
        f'ca_file = "{deployment.pki / "ca.pem"}"',
        f'cert_file = "{deployment.pki / "mastertarget.pem"}"',
        f'key_file = "{deployment.pki / "mastertarget.key"}"',
        "[retention]",
        f'dir = "{root / "retention"}"',
        "allow_shared_volume = true",
    ]
    for disk in disks:
        lines.append("[[disks]]")
        for key, value in disk.items():
            text = str(value).lower() if isinstance(value, bool) else value
            lines.append(
                f'{key} = "{text}"' if isinstance(value, str | Path) else f"{key} = {text}"
            )
    (root / "retention").mkdir(parents=True, exist_ok=True)
    path = root / "mastertarget.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Pusher:
    """A process server stand-in: seals records into HRL files and PUTs them."""

    def __init__(self, deployment: Deployment, session: aiohttp.ClientSession, port: int) -> None:
        self.sealer = HrlSealer(deployment.keyring)
        self.session = session
        self.base = f"https://127.0.0.1:{port}"

    def seal(
        self, disk: str, generation: int, first_seq: int, records: list[Record],
        flags: StreamFlags = NO_FLAGS,
    ) -> SealedHrl:  # fmt: skip
        return self.sealer.seal_records(
            records, disk_id=disk, generation=generation, first_seq=first_seq,
            first_capture_ns=(now := time.time_ns()), last_capture_ns=now, receive_ns=now,
            salt=os.urandom(32), flags=flags,
        )  # fmt: skip

    async def put(self, disk: str, body: bytes, generation: int, seq: int) -> tuple[int, dict]:  # type: ignore[type-arg]
        url = f"{self.base}/v1/disks/{disk}/hrl/{generation}/{seq}"
        async with self.session.put(url, data=body) as response:
            return response.status, await response.json()

    async def send(self, sealed: SealedHrl) -> tuple[int, dict]:  # type: ignore[type-arg]
        h = sealed.header
        return await self.put(h.disk_id, sealed.to_bytes(), h.generation, h.first_seq)

    async def state(self, disk: str) -> dict:  # type: ignore[type-arg]
        async with self.session.get(f"{self.base}/v1/disks/{disk}/state") as response:
            assert response.status == 200
            return await response.json()  # type: ignore[no-any-return]


StartMT = Callable[..., "AsyncIterator[tuple[MasterTarget, Pusher]]"]


@pytest_asyncio.fixture
async def start_mt(
    deployment: Deployment,
) -> AsyncIterator[Callable[[Path], object]]:
    """Start master targets from config files; all are closed at the end."""
    running: list[tuple[MasterTarget, aiohttp.ClientSession]] = []

    async def start(config_path: Path) -> tuple[MasterTarget, Pusher]:
        mt = await MasterTarget.start(mt_config.load(config_path), data_port=0, metrics_port=0)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=deployment.client_tls()))
        running.append((mt, session))
        return mt, Pusher(deployment, session, mt.port)

    yield start
    for mt, session in running:
        await session.close()
        await mt.close()


def random_workload(
    rng: random.Random, size: int, count: int, *, max_len: int = 200_000
) -> list[Record]:
    """WRITE and ZERO records at unaligned places, some at the very end of the disk."""
    records: list[Record] = []
    for _ in range(count):
        length = rng.randint(1, max_len)
        offset = rng.choice([rng.randrange(0, size - length), size - length])
        if rng.random() < 0.15:
            records.append(Zero(offset, length))
        else:
            records.append(Write(offset, rng.randbytes(length)))
    return records


def apply_to_model(model: bytearray, records: list[Record]) -> None:
    for record in records:
        if isinstance(record, Write):
            model[record.offset : record.offset + len(record.data)] = record.data
        elif isinstance(record, Zero):
            model[record.offset : record.offset + record.length] = bytes(record.length)
