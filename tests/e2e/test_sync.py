"""``blockrepl agent sync`` against a real process server and master target:
initial replication of a sparse image, a resync that sends only what changed,
and the flags that keep recovery points honest."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from protocol.limits import KiB, MiB
from tests.agent.test_cli import assert_clean_error
from tests.conftest import Deployment, require_binary
from tests.e2e.conftest import build_site, make_source, start

CHUNK = 64 * KiB


def _qemu_io(image: Path, *commands: str) -> None:
    qemu_io = require_binary("qemu-io")
    args = [qemu_io, "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run(
        [*args, str(image)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stdout.lower(), result.stdout


async def test_initial_sync_of_a_sparse_image_ends_identical(
    deployment: Deployment, tmp_path: Path
) -> None:
    size = 256 * MiB
    site = build_site(deployment, tmp_path, size=size)
    source = tmp_path / "source.raw"
    rng = random.Random(7)
    make_source(source, size, [(3 * MiB + 4096, rng.randbytes(5 * MiB)),
                               (130 * MiB, rng.randbytes(300 * KiB)),
                               (size - 70 * KiB, rng.randbytes(70 * KiB))])  # fmt: skip
    # Patterns, a zeroed range over data, and the last sector.
    _qemu_io(source, "write -P 0xa5 64M 8M", "write -z 66M 1M", "write -P 0x5a 200M 512")
    start(site)
    report = site.sync(source)
    assert report["new_generation"] is True
    assert report["compared_bytes"] == size
    site.wait_applied(int(report["generation"]), int(report["last_seq"]))
    site.assert_identical(source)
    state = site.mt_state()
    assert state["resync_open"] is False  # the last batch carried RESYNC_END
    # Holes equal to the empty target are never sent: what is sent is about
    # the data written above, rounded to chunks.
    written = 5 * MiB + 300 * KiB + 70 * KiB + 7 * MiB + 512
    assert written <= report["data_bytes"] <= written + 6 * CHUNK
    # Nothing is left in the journal: the master target holds it all.
    assert not list((site.state_dir / "journal" / "vm01-d0").iterdir())


async def test_resync_sends_only_the_changed_chunks(deployment: Deployment, tmp_path: Path) -> None:
    size = 64 * MiB
    site = build_site(deployment, tmp_path, size=size, sync={"region_bytes": 8 * MiB})
    source = tmp_path / "source.raw"
    rng = random.Random(11)
    make_source(source, size, [(0, rng.randbytes(size))])
    start(site)
    first = site.sync(source)
    site.wait_applied(int(first["generation"]), int(first["last_seq"]))
    # Scattered changes: whole chunks rewritten, some zeroed.
    chunks = rng.sample(range(size // CHUNK), 40)
    with source.open("r+b") as image:
        for n, chunk in enumerate(chunks):
            image.seek(chunk * CHUNK)
            image.write(bytes(CHUNK) if n % 8 == 0 else os.urandom(CHUNK))
    changed = len(chunks) * CHUNK
    second = site.sync(source)
    assert second["new_generation"] is False
    assert second["generation"] == first["generation"]
    assert second["differing_chunks"] == len(chunks)
    assert second["data_bytes"] + second["zero_bytes"] == changed
    assert second["sent_bytes"] <= 1.1 * changed + second["hash_bytes"]
    site.wait_applied(int(second["generation"]), int(second["last_seq"]))
    site.assert_identical(source)
    # A sync with nothing to do sends nothing.
    third = site.sync(source)
    assert (third["differing_chunks"], third["sent_bytes"], third["last_seq"]) == (
        0, 0, second["last_seq"],
    )  # fmt: skip


async def test_a_target_of_another_size_is_refused(deployment: Deployment, tmp_path: Path) -> None:
    site = build_site(deployment, tmp_path, size=8 * MiB)
    start(site)
    for size, word in ((4 * MiB, "larger"), (8 * MiB + 512, "smaller")):
        source = tmp_path / f"{size}.raw"
        make_source(source, size, [(0, b"data")])
        result = subprocess.run(
            site.sync_command(source), capture_output=True, text=True, timeout=60, check=False
        )
        assert_clean_error(result, 65, f"disk vm01-d0 is {word} than the source")
    assert site.mt_state()["received_seq"] == 0  # nothing was sent
