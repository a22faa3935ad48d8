"""Subcommands of the ``blockrepl`` command, one module per group.

Each module has ``add_parser(subparsers, common)``, which adds its group and
sets ``handler`` on the parsed arguments of every leaf command. A handler does
the work through runtime/ or agent/ objects and returns a
:class:`CommandResult`; agent/cli.py prints it and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CommandResult:
    """What a command did.

    Args:
        summary: the one line printed on success.
        data: the same facts for ``--json`` (JSON-serialisable values).
    """

    summary: str
    data: Mapping[str, object]


#: A leaf command: parsed arguments in, result out; raises BlockreplError on failure.
Handler = Callable[[argparse.Namespace], CommandResult]

#: The type of ``ArgumentParser.add_subparsers()``'s result, for the modules' signatures.
Subparsers = argparse._SubParsersAction
