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
from protocol.errors import BlockreplError
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``processserver`` with ``argv``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = ps_config.load(args.config)
        setup_logging(config.logging)
        logging.getLogger("blockrepl.processserver").info("starting with %s", args.config)
        run_daemon(
            lambda: ProcessServer.start(config),
            lambda ps: ps.close(),
            lambda ps: ps.reload(args.config),
        )
    except BlockreplError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
