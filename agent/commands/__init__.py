"""Subcommands of the ``blockrepl`` command, one module per group.

Each module has ``add_parser(subparsers, common)``, which adds its group and
sets ``handler`` on the parsed arguments of every leaf command. A handler does
the work through runtime/ or agent/ objects and returns a
:class:`~runtime.command.CommandResult`; ``runtime.command.run_command``
prints it and maps errors to exit codes (the convention of every command).

A handler imports the machinery it runs when it runs: a resync pays for
starting Python and importing what the sync uses, not for the capture
daemon, the tag scheduler or the certificate tools (about 0.3 s of imports,
which a resync of a disk with few differences would otherwise spend twice
over; docs/performance.md).
"""

from __future__ import annotations

import argparse

#: The type of ``ArgumentParser.add_subparsers()``'s result, for the modules' signatures.
Subparsers = argparse._SubParsersAction
