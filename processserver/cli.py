"""The ``processserver`` command.

``processserver serve --config FILE`` runs the daemon until SIGTERM; SIGHUP
rereads FILE (docs/operations.md, "Reloading").
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from processserver import config as ps_config
from processserver.daemon import ProcessServer
from runtime.command import CommandResult, run_command
from runtime.logs import setup_logging
from runtime.service import run_daemon

PROG: Final = "processserver"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The replication gateway: caches, seals and ships disk writes."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the daemon until SIGTERM (SIGHUP reloads)")
    serve.add_argument("--config", required=True, type=Path, help="the TOML configuration")
    serve.set_defaults(handler=_serve)
    return parser


def _serve(args: argparse.Namespace) -> CommandResult:
    config = ps_config.load(args.config)
    setup_logging(config.logging)
    logging.getLogger("blockrepl.processserver").info("starting with %s", args.config)
    run_daemon(
        lambda: ProcessServer.start(config),
        lambda ps: ps.close(),
        lambda ps: ps.reload(args.config),
    )
    return CommandResult("")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``processserver`` with ``argv`` (runtime/command.py); returns the exit status."""
    return run_command(PROG, build_parser(), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
