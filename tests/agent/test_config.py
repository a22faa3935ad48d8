"""The agent's configuration: the shipped example loads, mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_METRICS_PORT, load
from runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = """
process_servers = {servers}
{extra}
[tls]
ca_file = "ca.pem"
cert_file = "m.pem"
key_file = "m.key"
[[disks]]
id = "d0"
"""


def _load(tmp_path: Path, *, servers: str = '["https://ps:9443"]', extra: str = "") -> object:
    path = tmp_path / "agent.toml"
    path.write_text(BASE.format(servers=servers, extra=extra))
    return load(path)


def test_shipped_example_loads() -> None:
    config = load(ROOT / "systemd" / "agent.toml")
    assert config.process_servers == (
        "https://ps1.dr.example.com:9443",
        "https://ps2.dr.example.com:9443",
    )
    assert config.metrics.port == DEFAULT_METRICS_PORT
    disk = config.disk("vm01-disk1")
    assert disk is not None
    assert disk.source == Path("/dev/sdb")
    assert config.disk("nobody") is None
    assert (config.sync.chunk_bytes, config.sync.region_bytes) == (65536, 64 * 2**20)


def test_relative_paths_follow_the_file(tmp_path: Path) -> None:
    config = _load(tmp_path, extra='state_dir = "state"')
    assert config.state_dir == tmp_path / "state"  # type: ignore[attr-defined]
    assert config.tls.ca_file == tmp_path / "ca.pem"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("servers", "extra", "message"),
    [
        ("[]", "", "at least one URL"),
        ('["http://ps:9443"]', "", "https://HOST"),
        ('["https://ps:9443/v1"]', "", "nothing after it"),
        ('["https://ps1.dr.examp]e.com:9443"]', "", "https://HOST"),
        ('["https://[::1:9443"]', "", "https://HOST"),
        ('["https://ps:99999"]', "", "port 1..65535"),
        ('["https://ps:9443", "https://ps:9443"]', "", "each URL once"),
        ('"https://ps:9443"', "", "process_servers: expected an array"),
        ('["https://ps:9443"]', "give_up_after_s = 0", "give_up_after_s"),
        ('["https://ps:9443"]', "[sync]\nchunk_bytes = 65535", "power of two"),
        ('["https://ps:9443"]', "[sync]\nchunk_bytes = 1024", "sync.chunk_bytes"),
        ('["https://ps:9443"]', "[sync]\nregion_bytes = 100000", "multiple of chunk_bytes"),
        ('["https://ps:9443"]', "[sync]\nbatch_bytes = 33554432", "sync.batch_bytes"),
        ('["https://ps:9443"]', "[sync]\nchunk = 4096", "unknown key sync.chunk"),
        ('["https://ps:9443"]', '[[disks]]\nid = "d0"', "'d0' twice"),
        ('["https://ps:9443"]', '[[disks]]\nid = "a b"', "disk id"),
    ],
)  # fmt: skip
def test_mistakes_are_named(tmp_path: Path, servers: str, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _load(tmp_path, servers=servers, extra=extra)
    assert str(tmp_path / "agent.toml") in caught.value.message
