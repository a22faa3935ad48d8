"""The ``blockrepl`` console script, run as an operator runs it: a real process on real files."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from runtime.keyfile import load_keyring
from tests.conftest import require_binary

#: The installed console script, beside the interpreter running the tests.
BLOCKREPL = Path(sys.executable).parent / "blockrepl"


def blockrepl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BLOCKREPL), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file's bytes, mode and mtime: what "changes nothing" must keep."""
    return {
        path.name: (path.read_bytes(), path.stat().st_mode, path.stat().st_mtime_ns)
        for path in sorted(directory.iterdir())
    }


def assert_clean_error(result: subprocess.CompletedProcess[str], exit_code: int, text: str) -> None:
    """A deliberate error: the exit code, one message line, no traceback, no stdout."""
    assert result.returncode == exit_code, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("blockrepl: error: ")
    assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_console_script_is_installed() -> None:
    assert BLOCKREPL.is_file(), f"expected the console script at {BLOCKREPL}"


def test_certs_init_and_issue(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    result = blockrepl("certs", "init", "--dir", pki, "--name", "ps.example.net")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith(f"wrote a new CA to {pki}: ca.pem, ca.key,")
    assert "localhost, 127.0.0.1, ::1, ps.example.net" in result.stdout

    result = blockrepl("certs", "issue", "--dir", pki, "--machine", "vm01", "--days", "90")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"wrote the certificate of machine vm01: {pki}/machine-vm01.pem"
    )
    assert stat.S_IMODE((pki / "machine-vm01.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((pki / "machine-vm01.pem").stat().st_mode) == 0o644
    openssl = require_binary("openssl")
    verify = subprocess.run(
        [openssl, "verify", "-CAfile", pki / "ca.pem", pki / "machine-vm01.pem"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr


def test_certs_json_output(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    result = blockrepl("certs", "init", "--dir", pki, "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["dir"] == str(pki)
    assert answer["ca"]["cert"] == str(pki / "ca.pem")
    assert answer["ca"]["key"] == str(pki / "ca.key")
    assert answer["processserver"]["cert"] == str(pki / "processserver.pem")
    assert answer["mastertarget"]["key"] == str(pki / "mastertarget.key")
    assert answer["server_names"] == ["localhost", "127.0.0.1", "::1"]

    result = blockrepl("certs", "issue", "--dir", pki, "--machine", "db-01", "--json")
    answer = json.loads(result.stdout)
    assert answer["machine"] == "db-01"
    assert answer["cert"] == str(pki / "machine-db-01.pem")
    assert answer["key"] == str(pki / "machine-db-01.key")
    assert answer["not_after"].endswith("+00:00")


def test_certs_refusals_exit_non_zero_and_change_nothing(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert blockrepl("certs", "init", "--dir", pki).returncode == 0
    assert blockrepl("certs", "issue", "--dir", pki, "--machine", "vm01").returncode == 0
    before = snapshot(pki)
    assert_clean_error(blockrepl("certs", "init", "--dir", pki), 73, "refusing to overwrite")
    assert_clean_error(
        blockrepl("certs", "issue", "--dir", pki, "--machine", "vm01"),
        73,
        "already holds a certificate for machine vm01",
    )
    assert_clean_error(
        blockrepl("certs", "issue", "--dir", pki, "--machine", "vm/01"),
        64,
        "machine id must match [A-Za-z0-9._-]{1,64}",
    )
    assert snapshot(pki) == before


def test_certs_issue_without_a_ca(tmp_path: Path) -> None:
    assert_clean_error(
        blockrepl("certs", "issue", "--dir", tmp_path, "--machine", "vm01"),
        73,
        f"expected the files of 'blockrepl certs init --dir {tmp_path}'",
    )


def test_keys_init_and_refusal(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    result = blockrepl("keys", "init", "--file", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote data key 0x")
    assert f"to {path} (mode 0600)" in result.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = load_keyring(path)
    assert f"0x{ring.active_id:08x}" in result.stdout

    before = path.read_bytes()
    result = blockrepl("keys", "init", "--file", path)
    assert_clean_error(result, 73, f"key file {path} exists already; refusing to replace it")
    assert path.read_bytes() == before
    assert load_keyring(path) == ring


def test_keys_init_json(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    result = blockrepl("keys", "init", "--file", path, "--json")
    answer = json.loads(result.stdout)
    assert answer == {
        "file": str(path),
        "key_id": f"0x{load_keyring(path).active_id:08x}",
        "mode": "0600",
    }


def test_keys_init_into_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "keys.toml"
    result = blockrepl("keys", "init", "--file", path)
    assert_clean_error(result, 74, f"could not create a temp file for {path}: No such file")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["certs"],
        ["certs", "init"],
        ["keys", "init"],
        ["nonsense"],
        ["certs", "issue", "--dir", "d"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = blockrepl(*args)
    assert result.returncode == 2
    assert "usage: blockrepl" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_and_version() -> None:
    result = blockrepl("--help")
    assert result.returncode == 0
    assert "certs" in result.stdout
    assert "keys" in result.stdout
    assert blockrepl("--version").stdout.startswith("blockrepl ")


def test_main_returns_the_exit_code_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    assert main(["keys", "init", "--file", str(path)]) == 0
    assert main(["keys", "init", "--file", str(path)]) == 73
    assert capsys.readouterr().err.startswith("blockrepl: error: key file ")
    assert main(["keys"]) == 2


def test_help_lists_every_group() -> None:
    result = blockrepl("--help")
    for group in ("certs", "keys", "agent"):
        assert group in result.stdout


#: What ``agent sync`` must not import: the certificate tools' cryptography,
#: the capture daemon, the tag scheduler (docs/performance.md, resync).
NOT_FOR_A_SYNC = ("cryptography", "agent.capture.daemon", "agent.tags", "agent.pki")


def test_a_sync_imports_only_what_it_runs(tmp_path: Path) -> None:
    """Run up to the sync's handler (a missing config stops it there) and
    list the modules loaded: a resync pays for each one at every start."""
    probe = (
        "import json, sys\n"
        "from agent.cli import main\n"
        f"status = main(['agent', 'sync', '--config', {str(tmp_path / 'none.toml')!r},"
        " '--disk', 'd0'])\n"
        "print(status, json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    status, _, modules = result.stdout.partition(" ")
    assert status == "78", result.stderr  # the missing config, reported cleanly
    loaded = set(json.loads(modules))
    assert "agent.sync_disk" in loaded
    assert not {m for m in loaded if m.split(".")[0] in NOT_FOR_A_SYNC or m in NOT_FOR_A_SYNC}
