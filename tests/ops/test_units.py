"""The systemd units as shipped: systemd-analyze verifies them and scores them,
their stop timeouts leave room for the daemons' own, and the users and
directories they run with are made by the sysusers and tmpfiles files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from agent.capture.daemon import DRAIN_TIMEOUT_S
from agent.capture.export import NBDKIT_STOP_TIMEOUT_S
from agent.config import MAX_BARRIER_S
from agent.tags import UNQUIESCE_TIMEOUT_S
from mastertarget.daemon import SHUTDOWN_GRACE_S as MT_GRACE_S
from processserver.daemon import SHUTDOWN_GRACE_S as PS_GRACE_S
from runtime.inflight import CANCEL_TIMEOUT_S
from runtime.metrics import SHUTDOWN_TIMEOUT_S as METRICS_CLOSE_S
from tests.conftest import require_binary, require_root

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNITS = sorted(SYSTEMD.glob("*.service"))
#: `systemd-analyze security` exposure, 0..100 (it prints it divided by ten):
#: 20 is "OK" and the bar every unit must stay under.
EXPOSURE_THRESHOLD = 20


class Section(dict[str, list[str]]):
    """A unit section: each key with every value it is given, in order."""

    def __getitem__(self, key: str) -> str:
        """The key's one value (a test of a key given twice uses :func:`values`)."""
        found = values(self, key)
        assert len(found) == 1, (key, found)
        return found[0]


def unit(path: Path) -> dict[str, Section]:
    """A unit file's sections (systemd.syntax(7): no continuation lines are used here)."""
    sections: dict[str, Section] = {}
    current = Section()
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith(("#", ";")):
            continue
        if text.startswith("["):
            current = sections.setdefault(text.strip("[]"), Section())
            continue
        key, _, value = text.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def values(section: Section, key: str) -> list[str]:
    return dict.get(section, key, [])


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", text)
    assert match, text
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_the_units_are_the_three_daemons_the_tags_and_the_group() -> None:
    assert [u.name for u in UNITS] == [
        "blockrepl-agent-group.service", "blockrepl-agent-tags.service",
        "blockrepl-agent@.service", "mastertarget.service", "processserver.service",
    ]  # fmt: skip


#: The one capability a unit has: the quiesce commands of tags and group
#: rounds run `fsfreeze`.
CAPABILITIES = {
    "blockrepl-agent-tags.service": "CAP_SYS_ADMIN",
    "blockrepl-agent-group.service": "CAP_SYS_ADMIN",
}


def test_systemd_analyze_verify_passes() -> None:
    analyze = require_binary("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", *map(str, UNITS)], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # not even a warning


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_security_rates_each_unit_ok(path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", f"--threshold={EXPOSURE_THRESHOLD}", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_each_unit_is_a_hardened_notify_service(path: Path) -> None:
    service = unit(path)["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "78"  # EX_CONFIG: a restart cannot fix it
    assert service["User"].startswith("blockrepl-")
    assert service["Group"] == "blockrepl"
    for key, expected in {
        "ProtectSystem": "strict", "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": CAPABILITIES.get(path.name, ""),
        "PrivateTmp": "yes", "ProtectHome": "yes", "MemoryDenyWriteExecute": "yes",
        "UMask": "0077", "RestrictNamespaces": "yes", "SystemCallArchitectures": "native",
    }.items():  # fmt: skip
        assert service[key] == expected, key
    assert values(service, "AmbientCapabilities") in ([], [""], [CAPABILITIES.get(path.name)])
    assert values(service, "SystemCallFilter")[0] == "@system-service"
    assert service["ExecStart"].startswith("/usr/bin/env ")
    assert "/opt/blockrepl/bin" in service["Environment"]


def test_only_disk_daemons_see_block_devices() -> None:
    ps = unit(SYSTEMD / "processserver.service")["Service"]
    assert ps["PrivateDevices"] == "yes"
    assert ps["PrivateUsers"] == "yes"
    for name in ("blockrepl-agent-tags.service", "blockrepl-agent-group.service"):
        assert unit(SYSTEMD / name)["Service"]["PrivateDevices"] == "yes"
    for name in ("mastertarget.service", "blockrepl-agent@.service"):
        service = unit(SYSTEMD / name)["Service"]
        assert service["PrivateDevices"] == "no"
        assert service["DevicePolicy"] == "closed"
        allowed = values(service, "DeviceAllow")
        assert allowed
        assert all(a.startswith("block-") and a.endswith(" rw") for a in allowed)
        assert service["SupplementaryGroups"] == "disk"


@pytest.mark.parametrize(
    ("name", "grace_s"),
    [("processserver.service", PS_GRACE_S), ("mastertarget.service", MT_GRACE_S)],
)
def test_stop_timeout_leaves_room_for_the_drain(name: str, grace_s: float) -> None:
    """systemd's SIGKILL must not cut the drain of requests in flight short."""
    service = unit(SYSTEMD / name)["Service"]
    drain = grace_s + 2 * CANCEL_TIMEOUT_S + METRICS_CLOSE_S
    assert seconds(service["TimeoutStopSec"]) >= drain + 10
    assert seconds(service["WatchdogSec"]) >= 30  # pinged every half of it from the loop


def test_the_capture_stop_timeout_leaves_room_for_nbdkit_and_the_drain() -> None:
    """nbdkit finishes the writes in flight, then the agent answers what it received."""
    service = unit(SYSTEMD / "blockrepl-agent@.service")["Service"]
    assert seconds(service["TimeoutStopSec"]) >= NBDKIT_STOP_TIMEOUT_S + DRAIN_TIMEOUT_S + 10
    tags = unit(SYSTEMD / "blockrepl-agent-tags.service")["Service"]
    assert seconds(tags["TimeoutStopSec"]) > UNQUIESCE_TIMEOUT_S
    group = unit(SYSTEMD / "blockrepl-agent-group.service")["Service"]
    assert seconds(group["TimeoutStopSec"]) > MAX_BARRIER_S + UNQUIESCE_TIMEOUT_S


def test_reload_sends_sighup() -> None:
    for name in ("processserver.service", "mastertarget.service"):
        assert unit(SYSTEMD / name)["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_sysusers_makes_every_unit_user_and_tmpfiles_parses(tmp_path: Path) -> None:
    sysusers = require_binary("systemd-sysusers")
    tmpfiles = require_binary("systemd-tmpfiles")
    require_root("systemd-tmpfiles gives the directories to the service users")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSTEMD / "blockrepl.sysusers")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").open()}
    for path in UNITS:
        user = unit(path)["Service"]["User"]
        assert user in users
        assert users[user][6].strip() == "/usr/sbin/nologin"
    group = next(g for g in (tmp_path / "etc/group").open() if g.startswith("blockrepl:"))
    assert set(group.strip().split(":")[3].split(",")) == {
        "blockrepl-ps", "blockrepl-mt", "blockrepl-agent",
    }  # fmt: skip
    result = subprocess.run(
        [tmpfiles, f"--root={tmp_path}", "--create", str(SYSTEMD / "blockrepl.tmpfiles")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    retention = (tmp_path / "mnt/retention").stat()
    assert (retention.st_uid, retention.st_mode & 0o777) == (int(users["blockrepl-mt"][2]), 0o700)
