"""mastertarget points / recover / failover, through the running daemon's
admin socket and, with the daemon stopped, on the retention volume directly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from protocol.records import Tag, TagKind, Write
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment

from .conftest import write_config

SIZE = 2 * 2**20


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mastertarget.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_points_recover_failover_online_and_offline(
    deployment: Deployment,
    start_mt,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    target = tmp_path / "t.raw"
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": target, "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    mt, pusher = await start_mt(config)
    tag = Tag(TagKind.APP, bytes(16), "before-upgrade", 0)
    first = pusher.seal("d0", 1, 1, [Write(0, b"A" * 4096), tag])
    assert (await pusher.send(first))[0] == 200
    assert (await pusher.send(pusher.seal("d0", 1, 3, [Write(0, b"B" * 4096)])))[0] == 200
    await mt.replicas["d0"].wait_applied(StreamPosition(1, 3))

    code, out, err = await _cli("points", "--config", str(config), "--disk", "d0", "--json")
    assert code == 0, err
    listing = json.loads(out)
    assert [(p["seq"], p["kind"], p["name"]) for p in listing["points"]] == [
        (3, "crash", ""), (2, "crash", ""), (2, "app", "before-upgrade"),
    ]  # fmt: skip
    assert listing["window"]["points"] == 3
    assert listing["more"] is False
    code, out, err = await _cli(
        "points", "--config", str(config), "--disk", "d0", "--json", "--limit", "1"
    )  # fmt: skip
    assert code == 0, err
    newest_only = json.loads(out)
    assert [p["seq"] for p in newest_only["points"]] == [3]
    assert (newest_only["more"], newest_only["window"]["points"]) == (True, 3)

    output = tmp_path / "at-tag.raw"
    code, out, err = await _cli(
        "recover", "--config", str(config), "--disk", "d0", "--point", "tag:before-upgrade",
        "--output", str(output), "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["point"]["name"] == "before-upgrade"
    assert output.read_bytes()[:4096] == b"A" * 4096

    latest = tmp_path / "latest.raw"
    code, _, err = await _cli("recover", "--config", str(config), "--disk", "d0",
                              "--point", "latest", "--output", str(latest))  # fmt: skip
    assert code == 0, err
    assert latest.read_bytes()[:4096] == b"B" * 4096

    missing = tmp_path / "x.raw"
    code, _, err = await _cli(
        "recover", "--config", str(config), "--disk", "d0", "--point", "tag:nope",
        "--output", str(missing),
    )  # fmt: skip
    assert code != 0
    assert "before-upgrade" in err  # the miss names what is there

    await mt.close()  # offline from here on
    code, out, err = await _cli("points", "--config", str(config), "--disk", "d0")
    assert code == 0, err
    assert "before-upgrade" in out
    code, out, err = await _cli(
        "failover", "--config", str(config), "--disk", "d0", "--point", "latest-app", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert target.read_bytes()[:4096] == b"A" * 4096
    _, pusher2 = await start_mt(config)
    state = await pusher2.state("d0")
    assert (state["state"], state["applied_seq"]) == ("failed-over", 2)
    status, body = await pusher2.send(pusher2.seal("d0", 1, 3, [Write(0, b"C")]))
    assert (status, body["error"]) == (409, "failed-over")


def _on_a_terminal(*args: str) -> tuple[int, str, bytes]:
    """Run the command with standard error on a pseudo-terminal; its status,
    standard output and what the terminal received."""
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mastertarget.cli", *args],
            stdout=subprocess.PIPE, stderr=secondary, timeout=60, check=False,
        )  # fmt: skip
        os.close(secondary)
        seen = b""
        with contextlib.suppress(OSError):  # EIO once the terminal has no writer
            while chunk := os.read(primary, 65536):
                seen += chunk
    finally:
        os.close(primary)
    return proc.returncode, proc.stdout.decode(), seen


async def test_an_offline_recover_draws_the_copy_and_erases_it_for_the_summary(
    deployment: Deployment,
    start_mt,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """On a terminal, the copy of each disk is a progress line (runtime/progress.py)
    that the summary replaces; a pipe gets the summary alone."""
    config = write_config(
        deployment, tmp_path,
        [{"id": d, "target": tmp_path / f"{d}.raw", "create": True, "size_bytes": SIZE}
         for d in ("d0", "d1")],
    )  # fmt: skip
    with config.open("a") as extra:
        extra.write('[[groups]]\nid = "g"\ndisks = ["d0", "d1"]\n')
    mt, pusher = await start_mt(config)
    tag = Tag(TagKind.GROUP, bytes(range(16)), "round", 0, "g")
    for disk in ("d0", "d1"):
        sealed = pusher.seal(disk, 1, 1, [Write(0, disk.encode() * 2048), tag])
        assert (await pusher.send(sealed))[0] == 200
        await mt.replicas[disk].wait_applied(StreamPosition(1, 2))
    await mt.close()

    output = tmp_path / "one.raw"
    code, out, seen = await asyncio.to_thread(
        _on_a_terminal, "recover", "--config", str(config), "--disk", "d0", "--point", "latest",
        "--output", str(output),
    )  # fmt: skip
    assert code == 0, seen
    assert out.startswith(f"recovered disk d0 into {output} at crash point seq 2")
    drawn = seen.split(b"\r")
    assert b"100.0%  copied 2.0 MiB of 2.0 MiB" in drawn, seen
    assert seen.endswith(b"\r" + b" " * len(b"100.0%  copied 2.0 MiB of 2.0 MiB") + b"\r")

    code, out, seen = await asyncio.to_thread(
        _on_a_terminal, "recover", "--config", str(config), "--group", "g", "--point", "latest",
        "--output-dir", str(tmp_path / "group"),
    )  # fmt: skip
    assert code == 0, seen
    assert out.startswith("recovered group g at crash group point round")
    assert seen.split(b"\r").count(b"100.0%  copied 2.0 MiB of 2.0 MiB") == 2, seen
    assert (tmp_path / "group" / "d1.raw").read_bytes()[:4] == b"d1d1"

    code, out, err = await _cli(
        "recover", "--config", str(config), "--disk", "d1", "--point", "latest",
        "--output", str(tmp_path / "piped.raw"),
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.startswith("recovered disk d1")
