"""The ``blockrepl`` command: administration (certificates, keys) and the agent.

The command is a thin shell: each subcommand group lives in agent/commands/
and does its work through runtime/ and agent/ objects. Here: parsing,
printing a one-line summary (or JSON with ``--json``), and turning a
:class:`~protocol.errors.BlockreplError` into ``blockrepl: error: ...`` on
standard error and the error's exit code. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Final

from agent.commands import CommandResult
from protocol.errors import BlockreplError

PROG: Final = "blockrepl"
#: The subcommand groups and their modules, in the order ``--help`` lists
#: them. Only the group named on the command line is imported: ``certs``
#: needs the cryptography package, which ``agent sync`` would pay ~0.1 s for.
GROUPS: Final = {
    "certs": "agent.commands.certs",
    "keys": "agent.commands.keys",
    "agent": "agent.commands.agent",
}
#: Exit status after Ctrl-C, as shells report a death by SIGINT (128 + 2).
EXIT_INTERRUPTED: Final = 130


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
    """Run ``blockrepl`` with ``argv`` (the process arguments by default).

    Returns:
        The exit status: 0, argparse's 2 for a usage error, or the
        ``exit_code`` of the BlockreplError that stopped the command.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(arguments)
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # --help, --version or a usage error: argparse printed it
        return exc.code if isinstance(exc.code, int) else 0
    try:
        result: CommandResult = args.handler(args)
    except BlockreplError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(result.data, sort_keys=True))
    else:
        print(result.summary)
    return 0


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
