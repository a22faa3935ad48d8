"""mastertarget points / recover / failover, through the running daemon's
admin socket and, with the daemon stopped, on the retention volume directly."""

from __future__ import annotations

import asyncio
import json
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
