"""The process server's configuration: the shipped example loads, mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from processserver.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, load
from runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = """
key_file = "k.toml"
{extra}
[tls]
ca_file = "ca.pem"
cert_file = "ps.pem"
key_file = "ps.key"
[master_target]
url = "https://mt:9444"
[master_target.tls]
ca_file = "ca.pem"
cert_file = "m.pem"
key_file = "m.key"
"""


def test_shipped_example_loads() -> None:
    config = load(ROOT / "systemd" / "processserver.toml")
    assert (config.port, config.metrics.port) == (DEFAULT_PORT, DEFAULT_METRICS_PORT)
    assert config.owner("db01-disk0") == "db01"
    assert config.owner("nobody") is None


@pytest.mark.parametrize(
    ("extra", "tables", "message"),
    [
        ("", '[[machines]]\nid = "a b"\ndisks = []\n', "machine id"),
        ("", '[[machines]]\nid = "a"\ndisks = ["d"]\n[[machines]]\nid = "b"\ndisks = ["d"]\n',
         "under 'a' and 'b'"),
        ("cache_low_bytes = 10\n", '[[machines]]\nid = "a"\ndisks = []\n', "cache_low_bytes"),
        ("zstd_level = 40\n", '[[machines]]\nid = "a"\ndisks = []\n', "zstd_level"),
        ("", '[[machines]]\nid = "a"\ndisks = []\n[connections]\nbody_timeout_s = 0\n',
         "body_timeout_s: expected 0 < seconds <= 86400, found 0"),
    ],
)  # fmt: skip
def test_mistakes_are_named(tmp_path: Path, extra: str, tables: str, message: str) -> None:
    path = tmp_path / "ps.toml"
    path.write_text(BASE.format(extra=extra) + tables)
    with pytest.raises(ConfigError, match=message):
        load(path)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://mt:9444", r"master_target\.url: expected https://HOST\[:PORT\] with nothing "
         r"after it, found 'http://mt:9444'"),
        ("https://mt:9444/v1", r"master_target\.url: expected https://HOST\[:PORT\] with "
         r"nothing after it, found 'https://mt:9444/v1'"),
        ("https://mt:0", r"master_target\.url: expected a port 1\.\.65535 in 'https://mt:0'"),
    ],
)  # fmt: skip
def test_master_target_must_be_an_https_host(tmp_path: Path, url: str, message: str) -> None:
    path = tmp_path / "ps.toml"
    path.write_text(BASE.format(extra="machines = []").replace("https://mt:9444", url))
    with pytest.raises(ConfigError, match=message):
        load(path)


@pytest.mark.parametrize(
    ("timeout", "message"),
    [
        ("connect_timeout_s = 0", "connect_timeout_s: expected 0 < seconds <= 86400, found 0"),
        ("read_timeout_s = -1", "read_timeout_s: expected 0 < seconds <= 86400, found -1"),
        ("transfer_timeout_s = 86401", "transfer_timeout_s: expected 0 < seconds <= 86400, "
         "found 86401"),
    ],
)  # fmt: skip
def test_master_target_timeouts_are_bounded(tmp_path: Path, timeout: str, message: str) -> None:
    path = tmp_path / "ps.toml"
    text = BASE.format(extra="machines = []")
    path.write_text(text.replace('url = "https://mt:9444"', f'url = "https://mt:9444"\n{timeout}'))
    with pytest.raises(ConfigError, match=f"master_target\\.{message}"):
        load(path)
