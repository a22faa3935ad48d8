"""``blockrepl agent sync`` refuses bad input with one clear line and the right exit status."""

from __future__ import annotations

from pathlib import Path

from tests.agent.test_cli import assert_clean_error, blockrepl
from tests.conftest import Deployment

CONFIG = """
process_servers = ["https://127.0.0.1:1"]
state_dir = "{state}"
give_up_after_s = 1
[tls]
ca_file = "{pki}/ca.pem"
cert_file = "{pki}/machine-vm01.pem"
key_file = "{pki}/machine-vm01.key"
[[disks]]
id = "vm01-d0"
"""


def _config(deployment: Deployment, tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state", pki=deployment.pki))
    return path


def test_mistakes_are_named(deployment: Deployment, tmp_path: Path) -> None:
    config = _config(deployment, tmp_path)
    source = tmp_path / "s.raw"
    source.write_bytes(bytes(65536))
    result = blockrepl("agent", "sync", "--config", config, "--disk", "other", "--source", source)
    assert_clean_error(result, 64, "disk 'other' is not in the agent's config (its disks: vm01-d0)")
    result = blockrepl("agent", "sync", "--config", config, "--disk", "vm01-d0")
    assert_clean_error(result, 64, "give --source")
    missing = tmp_path / "missing.raw"
    result = blockrepl(
        "agent", "sync", "--config", config, "--disk", "vm01-d0", "--source", missing
    )
    assert_clean_error(result, 66, f"cannot open source {missing}")
    result = blockrepl(
        "agent", "sync", "--config", config, "--disk", "vm01-d0", "--source", tmp_path
    )
    assert_clean_error(result, 66, "must be a block device or a regular file")
    result = blockrepl("agent", "sync", "--config", tmp_path / "nope.toml", "--disk", "vm01-d0")
    assert_clean_error(result, 78, "cannot read config file")


def test_no_process_server_is_an_error_after_the_limit(
    deployment: Deployment, tmp_path: Path
) -> None:
    config = _config(deployment, tmp_path)
    source = tmp_path / "s.raw"
    source.write_bytes(bytes(65536))
    result = blockrepl("agent", "sync", "--config", config, "--disk", "vm01-d0", "--source", source)
    assert_clean_error(result, 69, "no process server made progress for")
    assert "https://127.0.0.1:1" in result.stderr
