"""``blockrepl agent capture``, ``agent status``: live write capture of a disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.commands import Subparsers
from runtime.command import CommandResult
from runtime.progress import human_bytes


def add_commands(
    commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``agent capture`` and ``agent status``."""
    capture = commands.add_parser(
        "capture",
        parents=[common],
        help="export a disk over NBD and replicate every write made through it",
        description=(
            "Run nbdkit with the capture plugin: every write, zero and trim of an NBD client "
            "lands on the source and enters the disk's replication stream, in order. Writes "
            "are journaled before they are answered; when the journal is full or the stream "
            "is down they are marked in the dirty map and resynced later. Runs until SIGTERM "
            "or Ctrl-C (systemd: blockrepl-agent@DISK)."
        ),
    )
    capture.add_argument("--config", required=True, type=Path, help="the agent's config file")
    capture.add_argument("--disk", required=True, help="the disk id, as in the config")
    capture.add_argument(
        "--source",
        type=Path,
        help="the block device or raw image (default: the disk's source in the config)",
    )
    capture.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="the NBD export's address, on loopback (for example 127.0.0.1:10809)",
    )
    capture.set_defaults(handler=run_capture)

    status = commands.add_parser(
        "status",
        parents=[common],
        help="what the capture of each disk is doing",
        description="Ask each running capture process (its control socket) where its disk stands.",
    )
    status.add_argument("--config", required=True, type=Path, help="the agent's config file")
    status.add_argument("--disk", action="append", help="only this disk (repeatable)")
    status.set_defaults(handler=run_status)


def run_capture(args: argparse.Namespace) -> CommandResult:
    """Capture one disk until stopped; say what was done."""
    from agent import config as agent_config
    from agent.capture.daemon import CaptureDaemon
    from runtime.logs import setup_logging
    from runtime.service import run_daemon

    config = agent_config.load(args.config)
    setup_logging(config.logging)
    daemon = CaptureDaemon(config, args.disk, args.source, args.listen)
    run_daemon(daemon.start, CaptureDaemon.close)
    if daemon.failure is not None:
        raise daemon.failure
    report = daemon.report()
    stats = report.get("stats")
    assert isinstance(stats, dict)
    how = "cleanly" if daemon.clean_stop else "with work left (it resumes at the next start)"
    summary = (
        f"capture of disk {args.disk} stopped {how}: {stats['journaled_requests']} requests "
        f"journaled ({human_bytes(stats['data_bytes'])} of data, "
        f"{human_bytes(stats['zero_bytes'])} zeroed), {stats['dirty_requests']} left to "
        f"resync, {stats['resync_passes']} resync passes"
    )
    return CommandResult(summary=summary, data=report)


def run_status(args: argparse.Namespace) -> CommandResult:
    """The status of each disk's capture."""
    import asyncio

    import uvloop

    from agent import config as agent_config
    from agent.capture.control import control_path
    from agent.control_client import status_of

    config = agent_config.load(args.config)
    disks = args.disk or [disk.id for disk in config.disks]
    paths = {disk: control_path(config.state_dir, disk) for disk in disks}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        answers = runner.run(status_of(paths))
    lines = [_status_line(disk, answer) for disk, answer in answers.items()]
    return CommandResult(summary="\n".join(lines), data={"disks": answers})


def _status_line(disk: str, status: dict[str, object]) -> str:
    if "error" in status:
        return f"{disk}: {status['error']}"
    journal = status["journal_bytes"]
    text = (
        f"{disk}: {status['mode']}, generation {status['generation']} seq {status['end_seq']} "
        f"(shipped {status['shipped_seq']}), journal "
        f"{human_bytes(journal if isinstance(journal, int) else 0)}, "
        f"{status['pending_regions']} regions to resync"
    )
    if status["window_open"]:
        text += ", resync window open"
    failing = status.get("process_server_failing_s")
    if isinstance(failing, int | float) and failing > 0:
        text += f", exchanges with the process servers failing for {failing:.0f} s"
    return text
