"""Random requests against every HTTP endpoint of both daemons.

Seeded random methods, paths, query strings and bodies (random bytes, valid
bodies with bytes flipped or cut, JSON of the wrong shape) go to the process
server (9443), the master target (9444, as the process server) and the master
target's admin socket. Every answer must be a declared one: a JSON error with
a code, or aiohttp's 404/405 for a route that does not exist; never a 500,
never a hang; and the daemons keep serving a valid request afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import aiohttp

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.hrl import HrlSealer
from protocol.limits import MiB
from protocol.records import Write
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.mastertarget.conftest import write_config
from tests.processserver.test_api import _body, write_ps_config

REQUESTS_PER_ENDPOINT = 80
#: Seconds any one answer may take: a hang is a failure.
ANSWER_TIMEOUT_S = 10.0
#: Statuses a fuzzed request may get.
DECLARED = {200, 400, 403, 404, 405, 408, 409, 413, 415, 422, 503}
DISKS = ("vm01-d0", "db01-d0", "", "..", "%2e%2e", "vm01-d0%2F..", "x" * 300, "%00", "ü")


def _junk(rng: random.Random, valid: bytes) -> bytes:
    """Random bytes, or ``valid`` with a few bytes flipped, cut or extended."""
    choice = rng.randrange(5)
    if choice == 0:
        return rng.randbytes(rng.randrange(2000))
    if choice == 1:
        return json.dumps(
            rng.choice([[], {}, {"generation": "7"}, {"point": 5}, None, 1e308])
        ).encode()
    body = bytearray(valid)
    for _ in range(rng.randint(1, 6)):
        if body:
            body[rng.randrange(len(body))] ^= rng.randint(1, 255)
    if choice == 3:
        del body[rng.randrange(len(body) + 1) :]
    if choice == 4:
        body += rng.randbytes(rng.randrange(300))
    return bytes(body)


def _query(rng: random.Random) -> str:
    keys = ["offset", "length", "chunk", "limit", "x"]
    values = ["0", "-1", "4096", "1e9", "abc", "", "99999999999999999999999", "%00", "1048576"]
    pairs = [f"{rng.choice(keys)}={rng.choice(values)}" for _ in range(rng.randrange(4))]
    return "?" + "&".join(pairs) if pairs else ""


async def _check(
    session: aiohttp.ClientSession, method: str, url: str, body: bytes, tally: dict[int, int]
) -> None:
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        try:
            async with session.request(method, url, data=body) as response:
                text = await response.text(errors="replace")
                status = response.status
                content_type = response.content_type
        except aiohttp.ClientConnectionError:
            tally[0] = tally.get(0, 0) + 1  # closed on purpose (403, a refused body)
            return
    tally[status] = tally.get(status, 0) + 1
    assert status in DECLARED, (method, url, status, text[:300])
    if status >= 400 and content_type == "application/json":
        assert json.loads(text)["error"], text
    elif status >= 400:
        assert status in (404, 405), (method, url, status, text[:300])


async def test_random_requests_get_declared_answers_and_the_daemons_keep_serving(
    deployment: Deployment, tmp_path: Path
) -> None:
    rng = random.Random(11)
    mt_port = free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    mt_conf = write_config(
        deployment, mt_root,
        [{"id": "vm01-d0", "target": mt_root / "t.raw", "create": True, "size_bytes": 4 * MiB}],
    )  # fmt: skip
    with mt_conf.open("a") as extra:
        extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n')
        # A group with no common point yet: a recover picks none, so no fuzzed
        # output folder is ever made.
        extra.write('[[groups]]\nid = "erp"\ndisks = ["vm01-d0"]\n')
    mt = await MasterTarget.start(mt_config.load(mt_conf), metrics_port=0)
    ps_root.mkdir()
    ps_conf = write_ps_config(deployment, ps_root)
    ps_conf.write_text(
        ps_conf.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
    )
    ps = await ProcessServer.start(ps_config.load(ps_conf), data_port=0, metrics_port=0)
    batch = _body("vm01-d0", 1, [Write(0, b"fuzz" * 500)])
    sealed = HrlSealer(deployment.keyring).seal_records(
        [Write(0, b"fuzz" * 500)], disk_id="vm01-d0", generation=1, first_seq=1,
        first_capture_ns=1, last_capture_ns=2, receive_ns=3, salt=bytes(32),
    )  # fmt: skip
    hrl = sealed.header_bytes + sealed.body
    group_recover = json.dumps({"point": "latest", "output_dir": str(tmp_path / "out")}).encode()
    tally: dict[int, int] = {}
    try:
        ps_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        )
        mt_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=deployment.client_tls("ps01"))
        )
        admin = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(mt_root / "admin.sock"))
        )
        async with ps_session, mt_session, admin:
            ps_base, mt_base = f"https://127.0.0.1:{ps.port}", f"https://127.0.0.1:{mt_port}"
            endpoints = [
                (ps_session, ps_base, "POST", "/v1/disks/{d}/batches", batch),
                (ps_session, ps_base, "GET", "/v1/disks/{d}/state", b""),
                (ps_session, ps_base, "POST", "/v1/disks/{d}/generation", b'{"generation": 2}'),
                (ps_session, ps_base, "GET", "/v1/disks/{d}/checksums", b""),
                (mt_session, mt_base, "PUT", "/v1/disks/{d}/hrl/{g}/{s}", hrl),
                (mt_session, mt_base, "GET", "/v1/disks/{d}/state", b""),
                (mt_session, mt_base, "GET", "/v1/disks/{d}/checksums", b""),
                (mt_session, mt_base, "GET", "/v1/disks", b""),
                (admin, "http://mt", "GET", "/v1/disks/{d}/points", b""),
                (admin, "http://mt", "POST", "/v1/disks/{d}/recover", b'{"point": "latest"}'),
                (admin, "http://mt", "POST", "/v1/disks/{d}/failover", b'{"point": "x"}'),
                (admin, "http://mt", "GET", "/v1/groups/{group}/points", b""),
                (admin, "http://mt", "POST", "/v1/groups/{group}/recover", group_recover),
            ]
            for session, base, method, template, valid in endpoints:
                for _ in range(REQUESTS_PER_ENDPOINT):
                    path = template.format(
                        d="vm01-d0" if rng.random() < 0.6 else rng.choice(DISKS),
                        group="erp" if rng.random() < 0.6 else rng.choice(DISKS),
                        g=rng.choice(["1", "0", "-1", "x", "99999999999999999999"]),
                        s=rng.choice(["1", "0", "2", "abc", "1e3"]),
                    )
                    verb = method if rng.random() < 0.9 else rng.choice(["GET", "PUT", "DELETE"])
                    body = _junk(rng, valid) if verb in ("POST", "PUT") else b""
                    await _check(session, verb, base + path + _query(rng), body, tally)
            # The kept inputs that once broke the admin API (tests/faults/corpus/admin).
            for kept in sorted((Path(__file__).parent / "corpus" / "admin").glob("*.bin")):
                for action in ("recover", "failover"):
                    async with admin.post(
                        f"http://mt/v1/disks/vm01-d0/{action}", data=kept.read_bytes()
                    ) as answer:
                        assert answer.status == 400, (kept.name, await answer.text())
                        assert (await answer.json())["error"] == "malformed"
            # Still serving: a valid batch goes all the way.
            async with ps_session.post(f"{ps_base}/v1/disks/vm01-d0/batches", data=batch) as answer:
                assert answer.status == 200, await answer.text()
    finally:
        await ps.close()
        await mt.close()
    assert 500 not in tally
    print(
        f"\n{sum(tally.values())} fuzzed requests, answers by status: {dict(sorted(tally.items()))}"
    )
