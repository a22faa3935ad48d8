"""The agent's [group] table: a consistency group's members, its coordinator,
its bounds; mistakes are named with the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_BARRIER_MAX_S, load
from runtime.errors import ConfigError

BASE = """
process_servers = ["https://ps:9443"]
[tls]
ca_file = "ca.pem"
cert_file = "m.pem"
key_file = "m.key"
[group]
id = "erp"
machine = "{machine}"
coordinator = "{coordinator}"
{extra}
[group.tls]
ca_file = "ca.pem"
cert_file = "group.pem"
key_file = "group.key"
[[group.members]]
machine = "vm01"
address = "10.0.0.11:20004"
[[group.members]]
machine = "db01"
address = "[fd00::12]:20004"
{more}
[[disks]]
id = "d0"
"""


def _write(tmp_path: Path, *, machine: str = "db01", coordinator: str = "vm01",
           extra: str = "", more: str = "") -> Path:  # fmt: skip
    path = tmp_path / "agent.toml"
    path.write_text(BASE.format(machine=machine, coordinator=coordinator, extra=extra, more=more))
    return path


def test_a_member_and_its_coordinator(tmp_path: Path) -> None:
    group = load(_write(tmp_path)).group
    assert group is not None
    assert not group.is_coordinator
    assert group.listen_address == ("fd00::12", 20004)  # its own address, port as written
    assert [m.machine for m in group.remote_members] == ["vm01"]
    assert group.barrier_max_s == DEFAULT_BARRIER_MAX_S == 0.5
    assert (group.crash_interval_s, group.app_interval_s) == (300, 3600)
    assert group.tls.cert_file == tmp_path / "group.pem"
    coordinator = load(_write(tmp_path, machine="vm01", extra='listen = "0.0.0.0:20005"')).group
    assert coordinator is not None
    assert coordinator.is_coordinator
    assert coordinator.listen_address == ("0.0.0.0", 20005)


def test_no_group_by_default(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE.split("[group]", maxsplit=1)[0] + '[[disks]]\nid = "d0"\n')
    assert load(path).group is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"machine": "app01"}, r"group\.machine: expected one of the members \(vm01, db01\)"),
        ({"coordinator": "app01"}, r"group\.coordinator: expected one of the members"),
        ({"extra": "barrier_max_s = 0"}, r"group\.barrier_max_s: expected 0 < seconds <= 5"),
        ({"extra": "barrier_max_s = 6"}, r"group\.barrier_max_s"),
        ({"extra": "crash_interval_s = 0.5"}, r"group\.crash_interval_s: expected 0 \(no tags\)"),
        ({"extra": 'listen = "nowhere"'}, r"group\.listen: expected HOST:PORT"),
        ({"extra": 'id = "a/b"'}, r"group\.id"),
        ({"more": '[[group.members]]\nmachine = "vm01"\naddress = "h:1"'},
         r"group\.members: expected each machine once, found 'vm01' twice"),
        ({"more": '[[group.members]]\nmachine = "app01"\naddress = "h:70000"'},
         r"group\.members\[2\]\.address: expected HOST:PORT with a port 1\.\.65535"),
    ],
)  # fmt: skip
def test_mistakes_are_named(tmp_path: Path, fields: dict[str, str], message: str) -> None:
    extra = fields.pop("extra", "")
    if extra.startswith("id ="):
        path = _write(tmp_path, **fields)
        path.write_text(path.read_text().replace('id = "erp"', extra))
    else:
        path = _write(tmp_path, extra=extra, **fields)
    with pytest.raises(ConfigError, match=message) as refused:
        load(path)
    assert str(path) in refused.value.message
