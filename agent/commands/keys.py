"""``blockrepl keys init``: the data key file of a deployment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.commands import Subparsers
from runtime.command import CommandResult
from runtime.keyfile import KEY_FILE_MODE, write_new_keyring


def add_parser(
    subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``keys init``."""
    group = subparsers.add_parser(
        "keys",
        help="make the data key file",
        description="Make the key file that encrypts replicated data at rest.",
    )
    commands = group.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    init = commands.add_parser(
        "init",
        parents=[common],
        help="write a new key file with one random key",
        description=f"Write a new key file (mode {KEY_FILE_MODE:04o}). Refuses to overwrite one.",
    )
    init.add_argument("--file", required=True, type=Path, help="the key file to create")
    init.set_defaults(handler=run_init)


def run_init(args: argparse.Namespace) -> CommandResult:
    """Write a new key file."""
    ring = write_new_keyring(args.file)
    return CommandResult(
        summary=(
            f"wrote data key 0x{ring.active_id:08x} to {args.file} (mode {KEY_FILE_MODE:04o});"
            " back it up offline: without it no replicated data can be read"
        ),
        data={
            "file": os.path.abspath(args.file),
            "key_id": f"0x{ring.active_id:08x}",
            "mode": f"{KEY_FILE_MODE:04o}",
        },
    )
