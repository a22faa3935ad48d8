"""The ``mastertarget`` command.

``mastertarget serve --config FILE`` runs the daemon until SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from protocol.errors import BlockreplError
from runtime.logs import setup_logging
from runtime.service import run_daemon

PROG: Final = "mastertarget"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The recovery-site daemon: receives and applies replicated writes."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the daemon until SIGTERM")
    serve.add_argument("--config", required=True, type=Path, help="the TOML configuration")
    serve.set_defaults(handler=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    config = mt_config.load(args.config)
    setup_logging(config.logging)
    logging.getLogger("blockrepl.mastertarget").info("starting with %s", args.config)
    run_daemon(lambda: MasterTarget.start(config), lambda mt: mt.close())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mastertarget`` with ``argv``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except BlockreplError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return status


if __name__ == "__main__":
    raise SystemExit(main())
