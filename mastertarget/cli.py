"""The ``mastertarget`` command.

- ``serve --config FILE`` runs the daemon until SIGTERM; SIGHUP rereads FILE.
- ``points --config FILE --disk ID [--json]`` lists recovery points, newest first.
- ``recover --config FILE --disk ID --point SPEC --output PATH [--format raw|vmdk]``
  writes the disk as it was at SPEC, while replication goes on.
- ``failover --config FILE --disk ID --point SPEC`` rolls the target back in
  place and stops replication of the disk.
- ``vsphere discover|preflight|attach|detach|create-vm --config VSPHERE.toml``
  works with vCenter (:mod:`mastertarget.vsphere.cli`).

While the daemon runs, the last three go through its admin socket; when it
does not, they work on the retention volume directly (and take its lock, so a
daemon cannot start meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

from mastertarget import config as mt_config
from mastertarget.admin import DEFAULT_POINTS_LIMIT, parse_limit, points_json, result_json
from mastertarget.config import MasterTargetConfig
from mastertarget.daemon import JOURNAL_DIR, STATE_DB, MasterTarget
from mastertarget.disks import open_disk
from mastertarget.disks.base import TargetDisk
from mastertarget.errors import DiskError
from mastertarget.journal import UndoJournal
from mastertarget.points import RecoveryPoint
from mastertarget.pointspec import parse_spec, select_point
from mastertarget.recovery import Progress, failover_in_place, recover_copy
from mastertarget.retention_volume import (
    check_retention_volume,
    installed_package_dir,
)
from mastertarget.state import StateStore
from mastertarget.vsphere.cli import add_commands as add_vsphere_commands
from protocol.errors import BlockreplError
from runtime.keyfile import load_keyring
from runtime.logs import setup_logging
from runtime.service import run_daemon

PROG: Final = "mastertarget"
#: A recover or failover of a large disk takes long: wait for the daemon's answer.
ADMIN_TIMEOUT_S: Final = 24 * 3600.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The recovery-site daemon: receives and applies replicated writes."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the daemon until SIGTERM (SIGHUP reloads)")
    serve.add_argument("--config", required=True, type=Path, help="the TOML configuration")
    serve.set_defaults(handler=_serve)
    for name, helptext, handler in (
        ("points", "list a disk's recovery points, newest first", _points),
        ("recover", "write a disk as it was at a point (test failover)", _recover),
        ("failover", "roll a disk back to a point in place and stop replicating it", _failover),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--config", required=True, type=Path, help="the TOML configuration")
        sub.add_argument("--disk", required=True, help="the disk id")
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "points":
            sub.add_argument(
                "--limit", type=int, default=DEFAULT_POINTS_LIMIT,
                help=f"list the newest N points ({DEFAULT_POINTS_LIMIT})",
            )  # fmt: skip
        else:
            sub.add_argument(
                "--point", required=True,
                help="latest, latest-app, latest-processed, an ISO-8601 time with a zone, "
                "or tag:NAME",
            )  # fmt: skip
        if name == "recover":
            sub.add_argument("--output", required=True, type=Path, help="the file to write")
            sub.add_argument("--format", choices=("raw", "vmdk"), default="raw")
        sub.set_defaults(handler=handler)
    add_vsphere_commands(commands)
    return parser


def _serve(args: argparse.Namespace) -> int:
    config = mt_config.load(args.config)
    setup_logging(config.logging)
    logging.getLogger("blockrepl.mastertarget").info("starting with %s", args.config)
    run_daemon(
        lambda: MasterTarget.start(config), lambda mt: mt.close(), lambda mt: mt.reload(args.config)
    )
    return 0


async def _admin(
    config: MasterTargetConfig, method: str, path: str, body: dict[str, object] | None
) -> dict[str, object] | None:
    """Ask the running daemon; None when no daemon listens on the admin socket."""
    if not config.admin_socket.exists():
        return None
    connector = aiohttp.UnixConnector(path=str(config.admin_socket))
    timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, f"http://mastertarget{path}", json=body) as answer,
        ):
            data: dict[str, object] = await answer.json()
            if answer.status != 200:
                raise _AdminError(str(data.get("message", data)), int(answer.status))
            return data
    except aiohttp.ClientConnectionError:
        return None  # a socket file left by a daemon that died


class _AdminError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _points(args: argparse.Namespace) -> int:
    config = mt_config.load(args.config)
    limit = parse_limit(str(args.limit))
    path = f"/v1/disks/{args.disk}/points?limit={limit}"
    data = asyncio.run(_admin(config, "GET", path, None))
    if data is None:
        if config.disk(args.disk) is None:
            raise DiskError(f"disk {args.disk!r} is not in the config")
        store = StateStore(config.retention.dir / STATE_DB)
        try:
            data = points_json(store, args.disk, limit)
        finally:
            store.close()
    if args.json:
        print(json.dumps(data))
        return 0
    window = data["window"]
    assert isinstance(window, dict)
    points = data["points"]
    assert isinstance(points, list)
    print(f"disk {args.disk}: {window['points']} points from {window['oldest']} to "
          f"{window['newest']} ({window['window_s'] / 3600:.1f} h)")  # fmt: skip
    print(f"{'time (UTC)':<32} {'kind':<6} {'seq':>12}  name")
    for point in points:
        print(f"{point['time']:<32} {point['kind']:<6} {point['seq']:>12}  {point['name']}")
    if data.get("more"):
        print(f"(the newest {len(points)} shown; --limit N for more)")
    return 0


def _bar(label: str) -> Progress | None:
    if not sys.stderr.isatty():
        return None
    started = time.monotonic()

    def show(done: int, total: int) -> None:
        share = done / total if total else 1.0
        filled = int(share * 30)
        line = f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {share:6.1%} "
        line += f"{time.monotonic() - started:6.1f} s"
        print(line, end="", file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)

    return show


@dataclass(frozen=True)
class _Offline:
    """What a command needs to work on a disk while the daemon is stopped."""

    store: StateStore
    target: TargetDisk
    journal: UndoJournal
    point: RecoveryPoint


@contextlib.contextmanager
def _offline(config: MasterTargetConfig, disk_id: str, spec: str) -> Iterator[_Offline]:
    """Lock the retention volume, open the disk's target, state and journal, pick the point."""
    disk = config.disk(disk_id)
    if disk is None:
        raise DiskError(f"disk {disk_id!r} is not in the config; configured: "
                        f"{', '.join(d.id for d in config.disks) or 'none'}")  # fmt: skip
    volume = check_retention_volume(
        config.retention.dir, cache_dir=config.cache_dir, install_dir=installed_package_dir(),
        targets=[d.target for d in config.disks],
        allow_shared_volume=config.retention.allow_shared_volume,
    )  # fmt: skip
    try:
        store = StateStore(volume.path / STATE_DB)
        try:
            target = open_disk(disk.target, disk.format)
            try:
                point = select_point(parse_spec(spec), store.points(disk_id))
                journal = UndoJournal(volume.path / JOURNAL_DIR, load_keyring(config.key_file))
                yield _Offline(store, target, journal, point)
            finally:
                target.close()
        finally:
            store.close()
    finally:
        volume.lock.release()


def _recover(args: argparse.Namespace) -> int:
    config = mt_config.load(args.config)
    output = args.output.resolve()
    body: dict[str, object] = {"point": args.point, "output": str(output), "format": args.format}
    if sys.stderr.isatty():
        print(f"recovering disk {args.disk} at {args.point} into {output} ...", file=sys.stderr)
    data = asyncio.run(_admin(config, "POST", f"/v1/disks/{args.disk}/recover", body))
    if data is None:
        with _offline(config, args.disk, args.point) as disk:
            result = recover_copy(
                target=disk.target, lock=threading.Lock(), journal=disk.journal,
                store=disk.store, point=disk.point, output=output, output_format=args.format,
                progress=_bar("copy"),
            )  # fmt: skip
        data = result_json(result)
    return _report(args, data, f"recovered disk {args.disk} into {output}")


def _failover(args: argparse.Namespace) -> int:
    config = mt_config.load(args.config)
    data = asyncio.run(
        _admin(config, "POST", f"/v1/disks/{args.disk}/failover", {"point": args.point})
    )
    if data is None:
        with _offline(config, args.disk, args.point) as disk:
            result = failover_in_place(
                target=disk.target, journal=disk.journal, store=disk.store, point=disk.point
            )
        data = result_json(result)
    return _report(args, data, f"failed disk {args.disk} over in place")


def _report(args: argparse.Namespace, data: dict[str, object], what: str) -> int:
    if args.json:
        print(json.dumps(data))
        return 0
    point = data["point"]
    assert isinstance(point, dict)
    name = point["name"] or "(file end)"
    print(f"{what} at {point['kind']} point seq {point['seq']} {name} of {point['time']} "
          f"in {data['total_s']} s ({data['undo_parts']} undo parts)")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mastertarget`` with ``argv``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except BlockreplError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except _AdminError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1 if exc.status >= 500 else 65
    return status


if __name__ == "__main__":
    raise SystemExit(main())
