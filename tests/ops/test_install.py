"""scripts/install into a temporary root: the environment, the commands, the
units, the users and directories, the example configs; the installed units
verify; the environment runs from where the units run it; a second run
upgrades without touching the configs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_binary, require_root

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/opt/blockrepl"
#: One install builds a virtualenv and installs the package and its
#: dependencies with pip: a minute on a slow mirror.
INSTALL_TIMEOUT_S = 600


def run_install(root: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(REPO / "scripts" / "install"), "--root", str(root)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def in_place(root: Path, command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a mount namespace where the installed PREFIX is at PREFIX.

    The environment's scripts name PREFIX in their shebang lines, as on the
    installed host; a tmpfs over /opt in a private namespace puts the tree
    there without touching the host's /opt.
    """
    unshare = require_binary("unshare")
    script = (
        f"mount -t tmpfs tmpfs /opt && mkdir -p {PREFIX} && "
        f"mount --bind {root}{PREFIX} {PREFIX} && {command}"
    )
    return subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def unit_value(path: Path, key: str) -> str:
    lines = [line for line in path.read_text().splitlines() if line.startswith(f"{key}=")]
    assert len(lines) == 1, (path, key)
    return lines[0].split("=", 1)[1]


def ids(root: Path, database: str) -> dict[str, int]:
    return {
        fields[0]: int(fields[2])
        for fields in (
            line.split(":") for line in (root / "etc" / database).read_text().splitlines()
        )
    }


def test_install_into_a_root_then_upgrade(tmp_path: Path) -> None:
    require_root("the installer gives /etc/blockrepl and /mnt/retention to the service users")
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        require_binary(tool)
    analyze = require_binary("systemd-analyze")
    root = tmp_path / "root"
    run_install(root)
    prefix = root / PREFIX.lstrip("/")

    # The environment: relocated to PREFIX, with bytecode naming PREFIX.
    for command in ("blockrepl", "processserver", "mastertarget"):
        script = prefix / "bin" / command
        assert script.read_text().splitlines()[0] == f"#!{PREFIX}/bin/python"
        link = root / "usr/local/bin" / command
        assert os.readlink(link) == f"{PREFIX}/bin/{command}"
    staging = f"{prefix}.new".encode()
    for path in prefix.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert staging not in path.read_bytes(), path
    assert not (REPO / "build").exists()  # the build left nothing in the checkout

    # Units, sysusers, tmpfiles, docs, examples.
    units = root / "usr/local/lib/systemd/system"
    for unit in ("processserver.service", "mastertarget.service", "blockrepl-agent@.service"):
        assert (units / unit).read_text() == (REPO / "systemd" / unit).read_text()
    result = subprocess.run(
        [analyze, "verify", *map(str, sorted(units.glob("*.service")))],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (prefix / "share/doc/blockrepl/operations.md").is_file()
    for example in (
        "processserver.toml", "mastertarget.toml", "agent-disk.conf", "alerts.yml",
        "alerts_test.yml", "prometheus.yml", "grafana-dashboard.json",
    ):  # fmt: skip
        assert (prefix / "share/blockrepl/examples" / example).is_file(), example

    users, groups = ids(root, "passwd"), ids(root, "group")
    assert {"blockrepl-ps", "blockrepl-mt", "blockrepl-agent"} <= users.keys()
    etc = (root / "etc/blockrepl").stat()
    assert (etc.st_uid, etc.st_gid, etc.st_mode & 0o777) == (0, groups["blockrepl"], 0o750)
    retention = (root / "mnt/retention").stat()
    assert (retention.st_uid, retention.st_mode & 0o777) == (users["blockrepl-mt"], 0o700)
    config = root / "etc/blockrepl/processserver.toml"
    assert config.read_text() == (REPO / "systemd/processserver.toml").read_text()
    info = config.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, groups["blockrepl"], 0o640)

    # The commands run from PREFIX, found through the PATH the units set.
    path = unit_value(units / "processserver.service", "Environment").removeprefix("PATH=")
    ran = in_place(
        root,
        f"PATH={path} processserver --help && PATH={path} mastertarget serve --help"
        f" && PATH={path} blockrepl --version",
    )
    if "Operation not permitted" in ran.stderr:
        pytest.skip(f"no mount namespace here: {ran.stderr.strip()}")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "blockrepl 0.1.0" in ran.stdout
    assert "SIGHUP" in ran.stdout

    # A second run upgrades: the old environment is kept, the config is not touched.
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    result = run_install(root)
    assert "keeping /etc/blockrepl/processserver.toml" in result.stderr
    assert config.read_text().endswith("# edited by the operator\n")
    assert (root / f"{PREFIX.lstrip('/')}.previous/bin/processserver").is_file()
    assert not (root / f"{PREFIX.lstrip('/')}.new").exists()
    ran = in_place(
        root, f"{PREFIX}/bin/python -c 'import processserver.daemon, mastertarget.daemon'"
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
