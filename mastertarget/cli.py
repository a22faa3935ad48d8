"""The ``mastertarget`` command.

- ``serve --config FILE`` runs the daemon until SIGTERM; SIGHUP rereads FILE.
- ``points --config FILE --disk ID [--json]`` lists recovery points, newest first;
  ``--group G`` instead lists the points common to every disk of a
  consistency group (docs/groups.md).
- ``recover --config FILE --disk ID --point SPEC --output PATH [--format raw|vmdk]``
  writes the disk as it was at SPEC, while replication goes on;
  ``--group G --output-dir DIR`` writes every disk of the group at one
  common point, as ``DIR/DISK.raw`` (or ``.vmdk``).
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
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import aiohttp

from mastertarget import config as mt_config
from mastertarget.admin_answers import (
    DEFAULT_POINTS_LIMIT,
    group_of,
    group_points_listing,
    parse_limit,
    points_listing,
    recover_answer,
)
from mastertarget.config import GroupConfig, MasterTargetConfig
from mastertarget.daemon import JOURNAL_DIR, STATE_DB, MasterTarget
from mastertarget.disks import open_disk
from mastertarget.errors import DiskError
from mastertarget.group_recovery import recover_group
from mastertarget.guarded_target import GuardedTarget
from mastertarget.journal import UndoJournal
from mastertarget.points import RecoveryPoint
from mastertarget.pointspec import parse_spec, select_point
from mastertarget.recovery import (
    OutputFormat,
    RecoverResult,
    failover_in_place,
    recover_copy,
)
from mastertarget.retention_volume import (
    RetentionVolume,
    check_retention_volume,
    installed_package_dir,
)
from mastertarget.state import StateStore
from mastertarget.vsphere.cli import add_commands as add_vsphere_commands
from protocol.admin_api import (
    MAX_ADMIN_ANSWER_BYTES,
    FailoverRequest,
    GroupPointsListing,
    GroupRecoverAnswer,
    GroupRecoverRequest,
    PointsListing,
    RecoverAnswer,
    RecoverRequest,
)
from protocol.api import ErrorBody
from protocol.errors import RemoteError
from protocol.jsonbody import loads
from runtime.answers import read_answer
from runtime.command import CommandResult, run_command
from runtime.errors import InvalidArgumentError
from runtime.keyfile import load_keyring
from runtime.logs import setup_logging
from runtime.progress import copy_progress
from runtime.service import run_daemon

T = TypeVar("T")

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
        ("points", "list the recovery points of a disk or a group, newest first", _points),
        ("recover", "write a disk or a group as it was at a point (test failover)", _recover),
        ("failover", "roll a disk back to a point in place and stop replicating it", _failover),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--config", required=True, type=Path, help="the TOML configuration")
        if name == "failover":
            sub.add_argument("--disk", required=True, help="the disk id")
        else:
            which = sub.add_mutually_exclusive_group(required=True)
            which.add_argument("--disk", help="the disk id")
            which.add_argument(
                "--group", help="a consistency group of the config: its common points"
            )
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "points":
            sub.add_argument(
                "--limit",
                type=int,
                default=DEFAULT_POINTS_LIMIT,
                help=f"list the newest N points ({DEFAULT_POINTS_LIMIT})",
            )
        else:
            sub.add_argument(
                "--point",
                required=True,
                help="latest, latest-app, latest-processed, an ISO-8601 time with a zone, "
                "or tag:NAME",
            )
        if name == "recover":
            sub.add_argument("--output", type=Path, help="the file to write (with --disk)")
            sub.add_argument(
                "--output-dir",
                type=Path,
                help="with --group: the folder to write each disk into, as DISK.raw or DISK.vmdk",
            )
            sub.add_argument("--format", choices=("raw", "vmdk"), default="raw")
        sub.set_defaults(handler=handler)
    add_vsphere_commands(commands)
    return parser


def _serve(args: argparse.Namespace) -> CommandResult:
    config = mt_config.load(args.config)
    setup_logging(config.logging)
    logging.getLogger("blockrepl.mastertarget").info("starting with %s", args.config)
    run_daemon(
        lambda: MasterTarget.start(config), lambda mt: mt.close(), lambda mt: mt.reload(args.config)
    )
    return CommandResult("")


async def _admin(
    config: MasterTargetConfig,
    method: str,
    path: str,
    body: dict[str, object] | None,
    parse: Callable[[object], T],
) -> T | None:
    """Ask the running daemon; None when no daemon listens on the admin socket.

    Args:
        parse: reads the answer (protocol/admin_api.py).

    Raises:
        RemoteError: the daemon refused; its message says why, its code the exit status.
        MalformedError, LimitExceededError: the answer breaks docs/api.md.
    """
    if not config.admin_socket.exists():
        return None
    connector = aiohttp.UnixConnector(path=str(config.admin_socket))
    timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)
    what = f"the daemon's answer to {method} {path}"
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, f"http://mastertarget{path}", json=body) as answer,
        ):
            raw = await read_answer(answer.content, max_bytes=MAX_ADMIN_ANSWER_BYTES, what=what)
            status = answer.status
    except aiohttp.ClientConnectionError:
        return None  # a socket file left by a daemon that died
    if status != 200:
        refusal = ErrorBody.explain(raw)
        raise RemoteError(refusal.message, remote_code=refusal.error)
    return parse(loads(raw, what))


def _points(args: argparse.Namespace) -> CommandResult:
    config = mt_config.load(args.config)
    if args.group is not None:
        return _group_points(args, config)
    limit = parse_limit(str(args.limit))
    path = f"/v1/disks/{args.disk}/points?limit={limit}"
    listing = asyncio.run(_admin(config, "GET", path, None, PointsListing.parse))
    if listing is None:
        if config.disk(args.disk) is None:
            raise DiskError(f"disk {args.disk!r} is not in the config")
        store = StateStore(config.retention.dir / STATE_DB)
        try:
            listing = points_listing(store, args.disk, limit)
        finally:
            store.close()
    window = listing.window
    lines = [
        f"disk {args.disk}: {window.points} points from {window.oldest} to {window.newest} "
        f"({window.window_s / 3600:.1f} h)",
        f"{'time (UTC)':<32} {'kind':<6} {'seq':>12}  name",
        *(f"{p.time:<32} {p.kind:<6} {p.seq:>12}  {p.name}" for p in listing.points),
    ]
    if listing.more:
        lines.append(f"(the newest {len(listing.points)} shown; --limit N for more)")
    return CommandResult("\n".join(lines), listing.to_json())


def _group_points(args: argparse.Namespace, config: MasterTargetConfig) -> CommandResult:
    group = group_of(config.groups, args.group)
    limit = parse_limit(str(args.limit))
    path = f"/v1/groups/{group.id}/points?limit={limit}"
    listing = asyncio.run(_admin(config, "GET", path, None, GroupPointsListing.parse))
    if listing is None:
        store = StateStore(config.retention.dir / STATE_DB)
        try:
            listing = group_points_listing(store, group, limit)
        finally:
            store.close()
    window = listing.window
    lines = [
        f"group {group.id} ({', '.join(group.disks)}): {window.points} common points "
        f"from {window.oldest} to {window.newest} ({window.window_s / 3600:.1f} h)",
        f"{'time (UTC)':<32} {'kind':<6} name",
        *(f"{p.time:<32} {p.kind:<6} {p.name}" for p in listing.points),
    ]
    if listing.more:
        lines.append(f"(the newest {len(listing.points)} shown; --limit N for more)")
    return CommandResult("\n".join(lines), listing.to_json())


@dataclass(frozen=True)
class _Offline:
    """What a command needs to work on a disk while the daemon is stopped."""

    store: StateStore
    target: GuardedTarget
    journal: UndoJournal
    point: RecoveryPoint


def _lock_volume(config: MasterTargetConfig) -> RetentionVolume:
    """Check the retention volume and take its lock (a daemon cannot start meanwhile)."""
    return check_retention_volume(
        config.retention.dir,
        cache_dir=config.cache_dir,
        install_dir=installed_package_dir(),
        targets=[d.target for d in config.disks],
        allow_shared_volume=config.retention.allow_shared_volume,
    )


@contextlib.contextmanager
def _offline(config: MasterTargetConfig, disk_id: str, spec: str) -> Iterator[_Offline]:
    """Lock the retention volume, open the disk's target, state and journal, pick the point."""
    disk = config.disk(disk_id)
    if disk is None:
        raise DiskError(
            f"disk {disk_id!r} is not in the config; configured: "
            f"{', '.join(d.id for d in config.disks) or 'none'}"
        )
    volume = _lock_volume(config)
    try:
        store = StateStore(volume.path / STATE_DB)
        try:
            target = GuardedTarget(
                open_disk(disk.target, disk.format),
                opener=lambda: open_disk(disk.target, disk.format),
            )
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


def _recover(args: argparse.Namespace) -> CommandResult:
    config = mt_config.load(args.config)
    if args.group is not None:
        return _recover_group(args, config)
    if args.output is None or args.output_dir is not None:
        raise InvalidArgumentError(
            "recover --disk takes --output FILE (--output-dir is for --group)"
        )
    output = args.output.resolve()
    body = RecoverRequest(args.point, str(output), args.format).to_json()
    if sys.stderr.isatty():
        print(f"recovering disk {args.disk} at {args.point} into {output} ...", file=sys.stderr)
    path = f"/v1/disks/{args.disk}/recover"
    answer = asyncio.run(_admin(config, "POST", path, body, RecoverAnswer.parse))
    if answer is None:
        with _offline(config, args.disk, args.point) as disk:
            result = recover_copy(
                target=disk.target,
                journal=disk.journal,
                store=disk.store,
                point=disk.point,
                output=output,
                output_format=args.format,
                progress=copy_progress("copied"),
            )
        answer = recover_answer(result)
    return _report(answer, f"recovered disk {args.disk} into {output}")


def _recover_group(args: argparse.Namespace, config: MasterTargetConfig) -> CommandResult:
    group = group_of(config.groups, args.group)
    if args.output_dir is None or args.output is not None:
        raise InvalidArgumentError(
            "recover --group takes --output-dir DIR (--output is for --disk)"
        )
    directory = args.output_dir.resolve()
    body = GroupRecoverRequest(args.point, str(directory), args.format).to_json()
    if sys.stderr.isatty():
        print(f"recovering group {group.id} at {args.point} into {directory} ...", file=sys.stderr)
    path = f"/v1/groups/{group.id}/recover"
    answer = asyncio.run(_admin(config, "POST", path, body, GroupRecoverAnswer.parse))
    if answer is None:
        answer = _recover_group_offline(config, group, args.point, directory, args.format)
    point = answer.point
    summary = (
        f"recovered group {group.id} at {point.kind} group point {point.name} of {point.time} "
        f"into {directory}: {', '.join(sorted(answer.disks))} in {answer.total_s} s"
    )
    return CommandResult(summary, answer.to_json())


def _recover_group_offline(
    config: MasterTargetConfig,
    group: GroupConfig,
    spec: str,
    directory: Path,
    output_format: OutputFormat,
) -> GroupRecoverAnswer:
    """Every disk of the group at one group point, on the retention volume directly."""
    with contextlib.ExitStack() as stack:
        volume = _lock_volume(config)
        stack.callback(volume.lock.release)
        store = StateStore(volume.path / STATE_DB)
        stack.callback(store.close)
        journal = UndoJournal(volume.path / JOURNAL_DIR, load_keyring(config.key_file))

        def recover_member(point: RecoveryPoint, output: Path) -> RecoverResult:
            disk = config.disk(point.disk_id)
            assert disk is not None  # the config checks every group disk is one
            target = GuardedTarget(
                open_disk(disk.target, disk.format),
                opener=lambda: open_disk(disk.target, disk.format),
            )
            try:
                return recover_copy(
                    target=target,
                    journal=journal,
                    store=store,
                    point=point,
                    output=output,
                    output_format=output_format,
                    progress=copy_progress("copied"),
                )
            finally:
                target.close()

        return recover_group(
            store,
            group,
            parse_spec(spec),
            directory=directory,
            output_format=output_format,
            recover_member=recover_member,
        )


def _failover(args: argparse.Namespace) -> CommandResult:
    config = mt_config.load(args.config)
    path = f"/v1/disks/{args.disk}/failover"
    body = FailoverRequest(args.point).to_json()
    answer = asyncio.run(_admin(config, "POST", path, body, RecoverAnswer.parse))
    if answer is None:
        with _offline(config, args.disk, args.point) as disk, disk.target.hold() as target:
            result = failover_in_place(
                target=target, journal=disk.journal, store=disk.store, point=disk.point
            )
        answer = recover_answer(result)
    return _report(answer, f"failed disk {args.disk} over in place")


def _report(answer: RecoverAnswer, what: str) -> CommandResult:
    point = answer.point
    summary = (
        f"{what} at {point.kind} point seq {point.seq} {point.name or '(file end)'} of "
        f"{point.time} in {answer.total_s} s ({answer.undo_parts} undo parts)"
    )
    return CommandResult(summary, answer.to_json())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mastertarget`` with ``argv`` (runtime/command.py); returns the exit status."""
    return run_command(PROG, build_parser(), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
