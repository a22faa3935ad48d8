"""The ``blockrepl`` command: administration (certificates, keys) and the agent.

The command is a thin shell: each subcommand group lives in agent/commands/
and does its work through runtime/ and agent/ objects. It runs as every
command of the product does (runtime/command.py): a one-line summary (or
JSON with ``--json``), and a :class:`~protocol.errors.BlockreplError` as
``blockrepl: error: ...`` on standard error and the error's exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Final

from runtime.command import run_command

PROG: Final = "blockrepl"
#: The subcommand groups and their modules, in the order ``--help`` lists
#: them. Only the group named on the command line is imported: ``certs``
#: needs the cryptography package, which ``agent sync`` would pay ~0.1 s for.
GROUPS: Final = {
    "certs": "agent.commands.certs",
    "keys": "agent.commands.keys",
    "agent": "agent.commands.agent",
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``blockrepl``: of the one group ``argv`` names
    first, else of every group (``blockrepl --help``, a usage error)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Disk replication for disaster recovery: administration and agent."
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    # Options every leaf command takes, after its own name (``certs init --json``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as one JSON object")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = [argv[0]] if argv and argv[0] in GROUPS else list(GROUPS)
    for name in named:
        importlib.import_module(GROUPS[name]).add_parser(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``blockrepl`` with ``argv`` (the process arguments by default); the exit status."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return run_command(PROG, build_parser(arguments), arguments)


class _VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked for.

    Reading the package metadata costs tens of milliseconds at every start,
    which every ``agent sync`` would pay for nothing.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help=str(kwargs.get("help", "")))

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def _version() -> str:
    from importlib import metadata  # noqa: PLC0415 - see _VersionAction

    try:
        return metadata.version("blockrepl")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
