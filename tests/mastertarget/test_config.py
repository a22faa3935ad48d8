"""The master target's configuration: the shipped example loads, mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from mastertarget.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, load
from runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = """
process_servers = ["ps01"]
key_file = "k.toml"
cache_dir = "cache"
[tls]
ca_file = "ca.pem"
cert_file = "mt.pem"
key_file = "mt.key"
"""


def test_shipped_example_loads() -> None:
    config = load(ROOT / "systemd" / "mastertarget.toml")
    assert config.listen.port == DEFAULT_PORT
    assert config.metrics.port == DEFAULT_METRICS_PORT
    assert config.retention.dir == Path("/mnt/retention")
    assert [d.id for d in config.disks] == ["vm01-disk0", "vm01-disk1"]
    assert config.disks[1].create
    assert config.disks[1].size_bytes == 100 * 2**30


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[disks]]\nid = "a/b"\ntarget = "t"\n', "disks"),
        ('[[disks]]\nid = "d"\ntarget = "t"\ncreate = true\n', "size_bytes"),
        ('[[disks]]\nid = "d"\ntarget = "t"\nsize_bytes = 1000\n', "multiple of 512"),
        ('[[disks]]\nid = "d"\ntarget = "t"\nformat = "qcow2"\n', "format"),
        ('[[disks]]\nid = "d"\ntarget = "t"\n[[disks]]\nid = "d"\ntarget = "u"\n', "unique"),
        ('[[disks]]\nid = "d"\ntarget = "t"\n[[disks]]\nid = "e"\ntarget = "t"\n', "target"),
        ('[[disks]]\nid = "d"\ntarget = "t"\nsize = 5\n', r"unknown key disks\[0\]\.size "),
    ],
)
def test_mistakes_are_named(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "mt.toml"
    path.write_text(BASE + extra)
    with pytest.raises(ConfigError, match=message) as caught:
        load(path)
    assert str(path) in caught.value.message


def test_process_servers_must_be_listed(tmp_path: Path) -> None:
    path = tmp_path / "mt.toml"
    path.write_text("disks = []\n" + BASE.replace('["ps01"]', "[]"))
    with pytest.raises(ConfigError, match="process_servers"):
        load(path)
