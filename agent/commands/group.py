"""``blockrepl agent group`` (this machine's part of its consistency group) and
``blockrepl agent group-tag`` (one group round now, on the coordinator)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from agent.commands import Subparsers
from runtime.command import CommandResult

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.group.coordinator import GroupRoundReport


def add_commands(
    commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``agent group`` and ``agent group-tag``."""
    group = commands.add_parser(
        "group",
        parents=[common],
        help="take part in this machine's consistency group until stopped",
        description=(
            "On a member of the [group], listen on the group port (20004) for the "
            "coordinator's rounds; on the coordinator, run crash-consistent group rounds every "
            "group.crash_interval_s and app-consistent ones every group.app_interval_s. Runs "
            "until SIGTERM or Ctrl-C (systemd: blockrepl-agent-group)."
        ),
    )
    group.add_argument("--config", required=True, type=Path, help="the agent's config file")
    group.set_defaults(handler=run_group)

    tag = commands.add_parser(
        "group-tag",
        parents=[common],
        help="one consistency group round now (on the coordinator)",
        description=(
            "Hold the writes of every disk of every member of the group at once (at most "
            "group.barrier_max_s), put one GROUP tag with one id on each, and resume them: a "
            "recovery point common to the group, listed by 'mastertarget points --group'. "
            "With --app, every member quiesces its applications first. The members must run "
            "'blockrepl agent group'."
        ),
    )
    tag.add_argument("--config", required=True, type=Path, help="the agent's config file")
    tag.add_argument("--name", required=True, help="the round's name (up to 128 bytes of UTF-8)")
    tag.add_argument(
        "--app", action="store_true", help="every member quiesces its applications first"
    )
    tag.set_defaults(handler=run_group_tag)


def _load(path: Path) -> AgentConfig:
    """The config, which must have a ``[group]``; logging set up by it.

    Imported here, as in every command: ``agent sync`` pays for no group code.
    """
    from agent import config as agent_config
    from runtime.errors import ConfigError
    from runtime.logs import setup_logging

    config = agent_config.load(path)
    if config.group is None:
        raise ConfigError(f"{path} has no [group] table: this machine is in no consistency group")
    setup_logging(config.logging)
    return config


def run_group(args: argparse.Namespace) -> CommandResult:
    """This machine's group role, until stopped."""
    from agent.group.service import GroupService
    from runtime.service import run_daemon

    service = GroupService(_load(args.config))
    run_daemon(service.start, GroupService.close)
    role = "coordinated" if service.group.is_coordinator else "took part in"
    return CommandResult(
        summary=f"group {service.group.id}: {role} {service.committed} committed and "
        f"{service.aborted} aborted rounds",
        data={
            "group": service.group.id,
            "coordinator": service.group.is_coordinator,
            "committed": service.committed,
            "aborted": service.aborted,
        },
    )


def run_group_tag(args: argparse.Namespace) -> CommandResult:
    """One round now."""
    import asyncio

    import uvloop

    from agent.group.coordinator import GroupCoordinator

    coordinator = GroupCoordinator(_load(args.config))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report = runner.run(coordinator.round(args.name, app=args.app))
    return CommandResult(summary=_summary(report), data=report.to_json())


def _summary(report: GroupRoundReport) -> str:
    members = "; ".join(
        f"{machine}: "
        + ", ".join(
            f"{d.disk} (generation {d.generation} seq {d.seq}"
            + ("" if d.consistent else ", inside a resync")
            + ")"
            for d in disks
        )
        for machine, disks in report.members.items()
    )
    return (
        f"group {report.group}: tagged {members} as {report.name!r} ({report.kind}-consistent, "
        f"tag id {report.tag_id}); barrier {report.barrier_s * 1000:.0f} ms"
    )
