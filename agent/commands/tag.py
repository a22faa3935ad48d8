"""``blockrepl agent tag`` (one round) and ``blockrepl agent tags`` (rounds at intervals)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from agent.commands import Subparsers
from runtime.command import CommandResult

if TYPE_CHECKING:
    from agent.tags import RoundReport


def add_commands(
    commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``agent tag`` and ``agent tags``."""
    tag = commands.add_parser(
        "tag",
        parents=[common],
        help="put a consistency tag on every disk of this machine now",
        description=(
            "Hold the writes of every disk of the machine for an instant, put one tag (one "
            "name, one id) into each disk's stream, and release them: a crash-consistent "
            "recovery point across the disks. With --app, the quiesce commands of [tags] run "
            "first and the unquiesce commands after: an app-consistent point. The master "
            "target offers it as --point tag:NAME."
        ),
    )
    tag.add_argument("--config", required=True, type=Path, help="the agent's config file")
    tag.add_argument("--name", required=True, help="the tag's name (up to 128 bytes of UTF-8)")
    tag.add_argument(
        "--app", action="store_true", help="quiesce the applications first: app-consistent"
    )
    tag.set_defaults(handler=run_tag)

    tags = commands.add_parser(
        "tags",
        parents=[common],
        help="tag every disk of this machine at the intervals of [tags]",
        description=(
            "Run crash-consistent rounds every tags.crash_interval_s and app-consistent ones "
            "every tags.app_interval_s, until SIGTERM or Ctrl-C (systemd: blockrepl-agent-tags)."
        ),
    )
    tags.add_argument("--config", required=True, type=Path, help="the agent's config file")
    tags.set_defaults(handler=run_tags)


def run_tag(args: argparse.Namespace) -> CommandResult:
    """One round now."""
    import asyncio

    import uvloop

    from agent import config as agent_config
    from agent.tags import tag_round
    from runtime.logs import setup_logging

    config = agent_config.load(args.config)
    setup_logging(config.logging)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report = runner.run(tag_round(config, args.name, app=args.app))
    return CommandResult(summary=_summary(report), data=report.to_json())


def _summary(report: RoundReport) -> str:
    disks = ", ".join(
        f"{d.disk} (generation {d.generation} seq {d.seq}"
        + ("" if d.consistent else ", inside a resync: not offered until it ends")
        + ")"
        for d in report.disks
    )
    text = (
        f"tagged {disks} as {report.name!r} ({report.kind}-consistent, tag id {report.tag_id}); "
        f"writes held {report.held_s * 1000:.0f} ms"
    )
    if report.kind == "app":
        text += f", applications quiesced {report.frozen_s * 1000:.0f} ms"
    return text


def run_tags(args: argparse.Namespace) -> CommandResult:
    """Rounds at the intervals, until stopped."""
    from agent import config as agent_config
    from agent.tags import TagScheduler
    from runtime.logs import setup_logging
    from runtime.service import run_daemon

    config = agent_config.load(args.config)
    setup_logging(config.logging)
    scheduler = TagScheduler(config)
    run_daemon(scheduler.start, TagScheduler.close)
    return CommandResult(
        summary=f"tagging stopped after {len(scheduler.rounds)} rounds "
        f"({scheduler.failures} abandoned)",
        data={"rounds": len(scheduler.rounds), "abandoned": scheduler.failures},
    )
