"""How every command of the product runs: parse, do, print, exit.

The three commands (``blockrepl``, ``mastertarget``, ``processserver``) share
one convention. A leaf command's handler takes the parsed arguments, does its
work and returns a :class:`CommandResult`; :func:`run_command` prints its
summary (or, with ``--json``, its data as one JSON object) and exits 0. A
:class:`~protocol.errors.BlockreplError` becomes one line on standard error,
``PROG: error: MESSAGE``, and the error's own exit status (sysexits(3), from
the error tree; a refusal of a running daemon, the status of the error it
answered with); Ctrl-C exits 130. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from protocol.errors import BlockreplError, exit_code_of

#: Exit status after Ctrl-C, as shells report a death by SIGINT (128 + 2).
EXIT_INTERRUPTED: Final = 130


@dataclass(frozen=True)
class CommandResult:
    """What a command did.

    Args:
        summary: printed on success (may be several lines; empty prints nothing).
        data: the same facts for ``--json`` (JSON-serialisable values).
        status: the exit status once it is printed: 0, or a status its
            command documents for a result that is an answer, not an error
            (``mastertarget vsphere preflight``: a check failed).
    """

    summary: str
    data: Mapping[str, object] = field(default_factory=dict)
    status: int = 0


#: A leaf command: parsed arguments in, result out; raises BlockreplError on failure.
Handler = Callable[[argparse.Namespace], CommandResult]


def run_command(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Run the leaf command ``argv`` names (its ``handler``); the exit status.

    Returns:
        The result's status (0 unless it says otherwise), argparse's 2 for a
        usage error, the exit status of the BlockreplError that stopped the
        command, or 130 after Ctrl-C.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error: argparse printed it
        return exc.code if isinstance(exc.code, int) else 0
    handler: Handler = args.handler
    try:
        result = handler(args)
    except BlockreplError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return exit_code_of(exc)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if getattr(args, "json", False):
        print(json.dumps(result.data, sort_keys=True))
    elif result.summary:
        print(result.summary)
    return result.status
