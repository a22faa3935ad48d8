"""The master target for real: mutual TLS on loopback, HRL files PUT over
HTTPS, applied to raw and VMDK targets, checked with qemu-img."""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
import xxhash

from mastertarget.daemon import MasterTarget
from protocol.hrl import HRL_HEADER
from protocol.records import Record, StreamFlags, Write, Zero
from tests.conftest import assert_image_holds, require_binary

from .conftest import Deployment, Pusher, apply_to_model, random_workload, write_config

SIZE = 16 * 2**20


async def wait_applied(
    pusher: Pusher, disk: str, seq: int, generation: int = 1, timeout: float = 20
) -> dict:  # type: ignore[type-arg]
    """Poll the state endpoint until ``seq`` of ``generation`` is applied."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        state = await pusher.state(disk)
        if (state["applied_generation"], state["applied_seq"]) >= (generation, seq):
            return state
        assert loop.time() < deadline, f"seq {seq} not applied in {timeout} s: {state}"
        await asyncio.sleep(0.02)


TARGETS = {
    "raw": ({"format": "raw"}, "raw", "disk.raw"),
    "vmdk_sparse": ({"format": "vmdk", "vmdk_subformat": "monolithicSparse"}, "vmdk", "d.vmdk"),
    "vmdk_flat": ({"format": "vmdk", "vmdk_subformat": "monolithicFlat"}, "vmdk", "f.vmdk"),
}


@pytest.mark.parametrize("kind", list(TARGETS))
async def test_random_workload_through_https_ends_identical(
    kind: str,
    deployment: Deployment,
    start_mt,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    options, fmt, name = TARGETS[kind]
    target = tmp_path / name
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": target, "create": True, "size_bytes": SIZE, **options}],
    )  # fmt: skip
    mt, pusher = await start_mt(config)
    rng = random.Random(kind)
    model = bytearray(SIZE)
    seq = 1
    for _ in range(25):
        records = random_workload(rng, SIZE, rng.randint(1, 12))
        status, body = await pusher.send(pusher.seal("d0", 1, seq, records))
        assert status == 200, body
        assert body["received_seq"] == seq + len(records) - 1
        apply_to_model(model, records)
        seq += len(records)
    state = await wait_applied(pusher, "d0", seq - 1)
    assert state["state"] == "replicating"
    assert state["inbox_files"] == 0
    await mt.close()
    assert_image_holds(target, bytes(model), fmt=fmt)


async def test_adjacent_writes_are_merged(
    deployment: Deployment,
    start_mt,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    target = tmp_path / "disk.raw"
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": target, "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    _, pusher = await start_mt(config)
    records: list[Record] = [Write(i * 4096, bytes([i]) * 4096) for i in range(64)]
    assert (await pusher.send(pusher.seal("d0", 1, 1, records)))[0] == 200
    await wait_applied(pusher, "d0", 64)
    assert target.read_bytes()[: 64 * 4096] == b"".join(bytes([i]) * 4096 for i in range(64))


@pytest.fixture
def one_disk(deployment: Deployment, tmp_path: Path) -> Path:
    return write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": tmp_path / "disk.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip


async def test_sequencing_gap_duplicate_stale_generation(start_mt, one_disk: Path) -> None:  # type: ignore[no-untyped-def]
    mt, pusher = await start_mt(one_disk)
    first = pusher.seal("d0", 2, 1, [Write(0, b"a" * 100)])
    assert (await pusher.send(first))[0] == 200
    status, body = await pusher.send(pusher.seal("d0", 2, 5, [Write(0, b"b")]))
    assert (status, body["error"], body["expected_seq"]) == (409, "gap", 2)
    status, body = await pusher.send(first)  # the same file again: acknowledged, dropped
    assert (status, body["received_seq"]) == (200, 1)
    status, body = await pusher.send(pusher.seal("d0", 1, 2, [Write(0, b"c")]))
    assert (status, body["error"], body["current_generation"]) == (409, "stale-generation", 2)
    status, body = await pusher.send(pusher.seal("d0", 3, 4, [Write(0, b"d")]))
    assert (status, body["error"], body["expected_seq"]) == (409, "gap", 1)
    assert (await pusher.send(pusher.seal("d0", 3, 1, [Write(0, b"e")])))[0] == 200
    state = await wait_applied(pusher, "d0", 1, generation=3)
    assert (state["applied_generation"], state["applied_seq"]) == (3, 1)
    assert mt.metrics.duplicates.labels("d0")._value.get() == 1


async def test_a_run_of_files_in_one_put_is_stored_in_order(start_mt, one_disk: Path) -> None:  # type: ignore[no-untyped-def]
    mt, pusher = await start_mt(one_disk)
    files = [
        pusher.seal("d0", 1, seq, [Write(seq * 4096, bytes([seq]) * 4096)]) for seq in (1, 2, 3)
    ]
    run = b"".join(f.to_bytes() for f in files)
    status, body = await pusher.put("d0", run, 1, 1)
    assert (status, body["received_seq"]) == (200, 3)
    # again, with one more file after it: the three are duplicates, the fourth is stored
    fourth = pusher.seal("d0", 1, 4, [Write(0, b"z" * 512)])
    status, body = await pusher.put("d0", run + fourth.to_bytes(), 1, 1)
    assert (status, body["received_seq"]) == (200, 4)
    assert mt.metrics.duplicates.labels("d0")._value.get() == 3
    state = await wait_applied(pusher, "d0", 4)
    assert state["applied_seq"] == 4


async def test_a_run_must_be_consecutive_files_of_the_disk(start_mt, one_disk: Path) -> None:  # type: ignore[no-untyped-def]
    _, pusher = await start_mt(one_disk)
    first = pusher.seal("d0", 1, 1, [Write(0, b"a")]).to_bytes()
    after_a_gap = pusher.seal("d0", 1, 3, [Write(0, b"c")]).to_bytes()
    status, answer = await pusher.put("d0", first + after_a_gap, 1, 1)
    assert (status, answer["error"]) == (400, "malformed")
    assert "each next file of a run must follow the one before" in answer["message"]
    # a malformed body stores nothing of it, the good file before the bad one included
    assert (await pusher.state("d0"))["received_seq"] == 0
    status, answer = await pusher.put("d0", first, 1, 1)
    assert (status, answer["received_seq"]) == (200, 1)
    other_generation = pusher.seal("d0", 2, 2, [Write(0, b"b")]).to_bytes()
    second = pusher.seal("d0", 1, 2, [Write(0, b"b")]).to_bytes()
    status, answer = await pusher.put("d0", second + other_generation, 1, 2)
    assert (status, answer["error"]) == (400, "malformed")
    status, answer = await pusher.put("d0", second + second[:100], 1, 2)
    assert (status, answer["error"]) == (400, "truncated")
    assert (await pusher.state("d0"))["received_seq"] == 1


async def test_a_stalled_put_does_not_hold_up_the_disk(start_mt, one_disk: Path) -> None:  # type: ignore[no-untyped-def]
    """A process server that dies mid-body (here: a PUT whose body stops coming)
    must not keep another from storing the disk's files meanwhile."""
    _, pusher = await start_mt(one_disk)
    first = pusher.seal("d0", 1, 1, [Write(0, os.urandom(4096))]).to_bytes()
    stalled_body = asyncio.Event()

    async def half_then_wait():  # type: ignore[no-untyped-def]
        yield first[:300]
        await stalled_body.wait()

    url = f"{pusher.base}/v1/disks/d0/hrl/1/1"
    headers = {"Content-Length": str(len(first))}
    stalled = asyncio.create_task(pusher.session.put(url, data=half_then_wait(), headers=headers))
    await asyncio.sleep(0.3)  # the stalled PUT is in the handler, its body half read
    assert not stalled.done()
    # well within the body timeout, which would end the stalled PUT (and free
    # whatever it held) only after DEFAULT_BODY_TIMEOUT_S
    status, answer = await asyncio.wait_for(pusher.put("d0", first, 1, 1), 1.0)
    assert (status, answer["received_seq"]) == (200, 1)
    stalled_body.set()
    stalled.cancel()


async def test_url_must_match_header_and_disk_must_exist(start_mt, one_disk: Path) -> None:  # type: ignore[no-untyped-def]
    _, pusher = await start_mt(one_disk)
    body = pusher.seal("d0", 1, 1, [Write(0, b"x")]).to_bytes()
    status, answer = await pusher.put("d0", body, 1, 2)
    assert (status, answer["error"]) == (400, "malformed")
    status, answer = await pusher.put("nope", body, 1, 1)
    assert (status, answer["error"]) == (404, "unknown-disk")
    status, answer = await pusher.put("d0", body[:-3], 1, 1)
    assert (status, answer["error"]) == (400, "truncated")
    status, answer = await pusher.put("d0", b"GET / HTTP/1.1\r\n\r\n", 1, 1)
    assert (status, answer["error"]) == (400, "bad-magic")


@pytest.mark.parametrize("where", ["header", "ciphertext", "tag"])
async def test_bit_flip_is_never_applied(
    where: str,
    start_mt,
    one_disk: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    _mt, pusher = await start_mt(one_disk)
    good = pusher.seal("d0", 1, 1, [Write(0, b"\x5a" * 65536)])
    data = bytearray(good.to_bytes())
    position = {"header": 120, "ciphertext": HRL_HEADER.size + 10, "tag": len(data) - 1}[where]
    data[position] ^= 0x01
    status, answer = await pusher.put("d0", bytes(data), 1, 1)
    if where == "header":  # caught by the header checksum before anything is stored
        assert (status, answer["error"]) == (400, "checksum-mismatch")
    else:  # stored, then caught by the GCM tag at apply time and quarantined
        assert status == 200
        for _ in range(500):
            state = await pusher.state("d0")
            if state["state"] == "resync-required":
                break
            await asyncio.sleep(0.01)
        assert state["state"] == "resync-required"
        assert "authentication-failed" in state["last_apply_error"]
        assert (state["applied_seq"], state["received_seq"]) == (0, 0)
        assert len(list((tmp_path / "cache" / "quarantine" / "d0").glob("*.hrl.*"))) == 2
    assert (tmp_path / "disk.raw").read_bytes()[:65536] == bytes(65536)
    # The same seqs sent again, intact, are taken and applied.
    assert (await pusher.send(good))[0] == 200
    state = await wait_applied(pusher, "d0", 1)
    assert state["state"] == "replicating"
    assert (tmp_path / "disk.raw").read_bytes()[:65536] == b"\x5a" * 65536


async def test_a_record_past_the_end_is_quarantined_not_retried(
    start_mt,
    one_disk: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """The target would refuse it at every retry, stalling the disk for good:
    it is quarantined with its reason, the disk resync-required, nothing applied."""
    _mt, pusher = await start_mt(one_disk)
    past = pusher.seal("d0", 1, 1, [Write(0, b"\x11" * 512), Zero(SIZE - 4096, 8192)])
    assert (await pusher.send(past))[0] == 200
    for _ in range(500):
        state = await pusher.state("d0")
        if state["state"] == "resync-required":
            break
        await asyncio.sleep(0.01)
    assert state["state"] == "resync-required", state
    assert f"inside the {SIZE}-byte target" in state["last_apply_error"]
    assert state["applied_seq"] == 0
    assert (tmp_path / "disk.raw").read_bytes()[:512] == bytes(512)  # not half applied
    reasons = list((tmp_path / "cache" / "quarantine" / "d0").glob("*.reason"))
    [reason] = reasons
    assert f"end {SIZE + 4096}" in reason.read_text()


async def test_identity_not_listed_gets_403(
    deployment: Deployment,
    start_mt,
    one_disk: Path,  # type: ignore[no-untyped-def]
) -> None:
    mt, _ = await start_mt(one_disk)
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("intruder"))
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"https://127.0.0.1:{mt.port}/v1/disks/d0/hrl/1/1"
        async with session.put(url, data=b"BRH1" + bytes(300)) as response:
            assert response.status == 403
            assert "intruder" in (await response.json())["message"]
        async with session.get(f"https://127.0.0.1:{mt.port}/v1/disks/d0/state") as response:
            assert response.status == 403
    assert mt.replicas["d0"].received.seq == 0


async def test_certificate_from_another_ca_fails_the_handshake(
    deployment: Deployment,
    start_mt,
    one_disk: Path,  # type: ignore[no-untyped-def]
) -> None:
    mt, _ = await start_mt(one_disk)
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("ps01", pki=deployment.other_pki))
    async with aiohttp.ClientSession(connector=connector) as session:
        # TLS 1.3: the server checks the client certificate after the client
        # has finished its side, so the client sees the refusal as a reset.
        with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)):
            async with session.get(f"https://127.0.0.1:{mt.port}/v1/disks/d0/state"):
                pass
    assert mt.metrics.requests.collect()[0].samples == []  # no handler ran


async def test_tls12_client_is_refused(
    deployment: Deployment,
    start_mt,
    one_disk: Path,  # type: ignore[no-untyped-def]
) -> None:
    mt, _ = await start_mt(one_disk)
    context = deployment.client_tls()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)):
            async with session.get(f"https://127.0.0.1:{mt.port}/v1/disks/d0/state"):
                pass


async def test_checksums_match_the_target(start_mt, one_disk: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _mt, pusher = await start_mt(one_disk)
    records: list[Record] = [Write(5000, random.Random(3).randbytes(300_000)), Zero(0, 100)]
    await pusher.send(pusher.seal("d0", 1, 1, records))
    await wait_applied(pusher, "d0", 2)
    chunk = 65536
    url = f"{pusher.base}/v1/disks/d0/checksums?offset=0&length={SIZE}&chunk={chunk}"
    async with pusher.session.get(url) as response:
        assert response.status == 200
        assert response.headers["X-Blockrepl-Applied-Seq"] == "2"
        digests = await response.read()
    image = (tmp_path / "disk.raw").read_bytes()
    expected = b"".join(xxhash.xxh3_128_digest(image[i : i + chunk]) for i in range(0, SIZE, chunk))
    assert digests == expected
    async with pusher.session.get(f"{pusher.base}/v1/disks/d0/checksums?chunk=1") as response:
        assert response.status == 400


async def test_restart_resumes_from_the_durable_marker(
    deployment: Deployment,
    start_mt,
    one_disk: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    mt, pusher = await start_mt(one_disk)
    await pusher.send(pusher.seal("d0", 1, 1, [Write(0, b"one")]))
    await wait_applied(pusher, "d0", 1)
    await mt.close()
    _, pusher2 = await start_mt(one_disk)
    state = await pusher2.state("d0")
    assert (state["received_seq"], state["applied_seq"]) == (1, 1)
    assert (await pusher2.send(pusher2.seal("d0", 1, 2, [Write(3, b"two")])))[0] == 200
    await wait_applied(pusher2, "d0", 2)
    assert (tmp_path / "disk.raw").read_bytes()[:6] == b"onetwo"


async def test_resync_flags_are_tracked(start_mt, one_disk: Path) -> None:  # type: ignore[no-untyped-def]
    _, pusher = await start_mt(one_disk)
    await pusher.send(pusher.seal("d0", 1, 1, [Write(0, b"r")], StreamFlags.RESYNC))
    state = await wait_applied(pusher, "d0", 1)
    assert state["resync_open"] is True
    end = StreamFlags.RESYNC | StreamFlags.RESYNC_END
    await pusher.send(pusher.seal("d0", 1, 2, [Write(1, b"s")], end))
    state = await wait_applied(pusher, "d0", 2)
    assert state["resync_open"] is False


async def test_metrics_listener_reports_the_disk(start_mt, one_disk: Path) -> None:  # type: ignore[no-untyped-def]
    mt, pusher = await start_mt(one_disk)
    await pusher.send(pusher.seal("d0", 1, 1, [Write(0, b"m" * 1000)]))
    await wait_applied(pusher, "d0", 1)
    async with aiohttp.ClientSession() as plain:
        async with plain.get(f"http://127.0.0.1:{mt.metrics_port}/metrics") as response:
            text = await response.text()
        async with plain.get(f"http://127.0.0.1:{mt.metrics_port}/readyz") as response:
            assert response.status == 200
    assert 'blockrepl_mastertarget_hrl_files_applied_total{disk="d0"} 1.0' in text
    assert 'blockrepl_mastertarget_disk_state{disk="d0",state="replicating"} 1.0' in text
    assert 'blockrepl_mastertarget_inbox_oldest_age_seconds{disk="d0"} 0.0' in text
    assert isinstance(mt, MasterTarget)
    promtool = require_binary("promtool")
    check = await asyncio.to_thread(  # off the loop: the daemon runs on it
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("offset", "length", "chunk"),
    [(0, SIZE, 4096), (4096, SIZE - 4096 - 1234, 5000), (12288, 3 * 2**20 + 7, 2**20 + 4096)],
)
async def test_checksums_of_any_chunk_size_and_range(  # type: ignore[no-untyped-def]
    start_mt, one_disk: Path, tmp_path: Path, offset: int, length: int, chunk: int
) -> None:
    _mt, pusher = await start_mt(one_disk)
    data = random.Random(9).randbytes(SIZE)
    await pusher.send(pusher.seal("d0", 1, 1, [Write(0, data[: 4 * 2**20])]))
    await wait_applied(pusher, "d0", 1)
    url = f"{pusher.base}/v1/disks/d0/checksums?offset={offset}&length={length}&chunk={chunk}"
    async with pusher.session.get(url) as response:
        assert response.status == 200
        digests = await response.read()
    image = (tmp_path / "disk.raw").read_bytes()[offset : offset + length]
    expected = b"".join(
        xxhash.xxh3_128_digest(image[i : i + chunk]) for i in range(0, length, chunk)
    )
    assert digests == expected
