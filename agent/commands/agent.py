"""``blockrepl agent sync``: initial replication and resync by comparison."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from agent.commands import Subparsers, capture, tag
from agent.commands import group as group_commands
from runtime.command import CommandResult
from runtime.progress import human_bytes, human_duration

if TYPE_CHECKING:
    from agent.sync_disk import SyncReport
    from runtime.progress import ProgressLine


def add_parser(
    subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``agent sync``, ``capture``, ``status``, ``tag``, ``tags``, ``group`` and
    ``group-tag``."""
    group = subparsers.add_parser(
        "agent",
        help="replicate this machine's disks",
        description="Replicate this machine's disks to the master target, through the "
        "process servers of the agent's config.",
    )
    commands = group.add_subparsers(dest="agent_command", required=True, metavar="COMMAND")
    sync = commands.add_parser(
        "sync",
        parents=[common],
        help="bring the target up to date with the source by comparing checksums",
        description=(
            "Compare the source with the master target's copy of the disk, region by region "
            "and then chunk by chunk, and send only the chunks that differ (all-zero chunks as "
            "ZERO records). Used for the initial replication and for a resync. An interrupted "
            "sync goes on where it stopped when run again. Returns once the master target "
            "holds every batch."
        ),
    )
    sync.add_argument("--config", required=True, type=Path, help="the agent's config file")
    sync.add_argument("--disk", required=True, help="the disk id, as in the config")
    sync.add_argument(
        "--source",
        type=Path,
        help="the block device or raw image to read (default: the disk's source in the config)",
    )
    sync.set_defaults(handler=run_sync)
    capture.add_commands(commands, common)
    tag.add_commands(commands, common)
    group_commands.add_commands(commands, common)


def run_sync(args: argparse.Namespace) -> CommandResult:
    """Sync one disk and say what it took."""
    import asyncio

    import uvloop

    from agent import config as agent_config
    from agent.sync_disk import sync_disk
    from runtime.logs import setup_logging
    from runtime.progress import ProgressLine

    config = agent_config.load(args.config)
    setup_logging(config.logging)
    line: ProgressLine | None = None

    def report(done: int, total: int, sent: int, phase: str) -> None:
        nonlocal line
        if line is None:
            line = ProgressLine(total)
        line.update(done, sent, phase=phase, force=bool(phase))

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(sync_disk(config, args.disk, args.source, report=report))
    finally:
        if line is not None:
            line.finish()
    return CommandResult(summary=_summary(result), data=result.to_json())


def _summary(r: SyncReport) -> str:
    chunks = -(-r.size_bytes // r.chunk_bytes)
    text = (
        f"synced disk {r.disk} from {r.source}: {r.differing_chunks} of {chunks} chunks differed; "
        f"sent {human_bytes(r.sent_bytes)} ({human_bytes(r.data_bytes)} of data, "
        f"{human_bytes(r.zero_bytes)} zeroed) and received {human_bytes(r.hash_bytes)} of "
        f"digests in {human_duration(r.elapsed_s)}"
    )
    if r.last_seq:
        text += f"; generation {r.generation} up to seq {r.last_seq} is at the master target"
    if r.resumed:
        text += f"; resumed at {human_bytes(r.resumed_from)}"
    if r.new_generation:
        text += "; a new generation was started"
    if r.failovers:
        text += f"; moved between process servers {r.failovers} time(s), now {r.process_server}"
    return text
