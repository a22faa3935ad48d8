"""``blockrepl certs init|issue|revoke``: the deployment's private CA."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.commands import Subparsers
from agent.pki import (
    LEAF_VALIDITY_DAYS,
    CertificateFiles,
    init_ca,
    issue_machine,
    machine_file_names,
    revoke,
)
from runtime.command import CommandResult


def add_parser(
    subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``certs init`` and ``certs issue``."""
    group = subparsers.add_parser(
        "certs",
        help="make the deployment's CA and its certificates",
        description="Make the private CA of a deployment and the certificates it signs.",
    )
    commands = group.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        parents=[common],
        help="make a new CA and the server certificates",
        description=(
            "Write ca.pem, ca.key, processserver.pem/.key and mastertarget.pem/.key into DIR."
            " Refuses to overwrite any existing file."
        ),
    )
    init.add_argument("--dir", required=True, type=Path, help="directory for the files")
    init.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "a DNS name or IP address the servers are reached by (repeatable); localhost,"
            " 127.0.0.1 and ::1 are always included"
        ),
    )
    _add_days(init)
    init.set_defaults(handler=run_init)

    issue = commands.add_parser(
        "issue",
        parents=[common],
        help="make the client certificate of one machine",
        description=(
            "Write machine-M.pem/.key into DIR, signed by the CA there; with --group, "
            "group-M.pem/.key instead, for the consistency group port (docs/groups.md)."
        ),
    )
    issue.add_argument("--dir", required=True, type=Path, help="the directory of 'certs init'")
    issue.add_argument(
        "--machine", required=True, help="the machine id ([A-Za-z0-9._-], at most 64)"
    )
    issue.add_argument(
        "--group",
        action="store_true",
        help="the machine's certificate for the consistency group port (serverAuth and "
        "clientAuth, known by its CN)",
    )
    _add_days(issue)
    issue.set_defaults(handler=run_issue)

    revoke_cmd = commands.add_parser(
        "revoke",
        parents=[common],
        help="revoke a machine's (or any) certificate in the CA's CRL",
        description=(
            "Add a certificate to DIR/crl.pem, signed by the CA there. Servers and clients"
            " whose [tls] crl_file names it refuse the certificate from their next start."
        ),
    )
    revoke_cmd.add_argument("--dir", required=True, type=Path, help="the directory of 'certs init'")
    which = revoke_cmd.add_mutually_exclusive_group(required=True)
    which.add_argument("--machine", help="revoke DIR/machine-M.pem")
    which.add_argument("--cert", type=Path, help="revoke this certificate file")
    revoke_cmd.set_defaults(handler=run_revoke)


def run_init(args: argparse.Namespace) -> CommandResult:
    """Make the CA and the server certificates."""
    pki = init_ca(args.dir, args.name, days=args.days)
    servers = ", ".join(f"{s.name}.pem/.key" for s in pki.servers)
    until = min(s.not_after for s in pki.servers)
    return CommandResult(
        summary=(
            f"wrote a new CA to {args.dir}: ca.pem, ca.key, {servers}"
            f" (servers valid for {', '.join(pki.server_sans)} until {until:%Y-%m-%d});"
            " keep ca.key offline"
        ),
        data={
            "dir": os.path.abspath(args.dir),
            "ca": _files_json(pki.ca),
            **{server.name: _files_json(server) for server in pki.servers},
            "server_names": list(pki.server_sans),
        },
    )


def run_issue(args: argparse.Namespace) -> CommandResult:
    """Make one machine's client certificate."""
    files = issue_machine(args.dir, args.machine, days=args.days, group=args.group)
    what = "group certificate" if args.group else "certificate"
    return CommandResult(
        summary=(
            f"wrote the {what} of machine {files.name}: {files.cert_file}, {files.key_file}"
            f" (valid until {files.not_after:%Y-%m-%d})"
        ),
        data={
            "machine": files.name,
            "cert": os.path.abspath(files.cert_file),
            "key": os.path.abspath(files.key_file),
            "not_after": files.not_after.isoformat(),
        },
    )


def run_revoke(args: argparse.Namespace) -> CommandResult:
    """Revoke one certificate."""
    cert = args.cert if args.cert is not None else args.dir / machine_file_names(args.machine)[0]
    done = revoke(args.dir, cert)
    return CommandResult(
        summary=(
            f"revoked {cert} (serial {done.serial:x}); {done.crl_file} now lists "
            f"{done.revoked} certificate(s); copy it to every server and client with "
            "[tls] crl_file and restart them"
        ),
        data={
            "cert": os.path.abspath(cert),
            "serial": f"{done.serial:x}",
            "crl": os.path.abspath(done.crl_file),
            "revoked": done.revoked,
            "next_update": done.next_update.isoformat(),
        },
    )


def _add_days(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--days",
        type=int,
        default=LEAF_VALIDITY_DAYS,
        help=f"validity of the certificates made (default {LEAF_VALIDITY_DAYS})",
    )


def _files_json(files: CertificateFiles) -> dict[str, object]:
    return {
        "name": files.name,
        "cert": os.path.abspath(files.cert_file),
        "key": os.path.abspath(files.key_file),
        "not_after": files.not_after.isoformat(),
    }
