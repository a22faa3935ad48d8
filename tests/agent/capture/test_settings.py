"""What capture and tags accept from the config and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.capture.export import Listen, parse_listen
from agent.config import load
from agent.tags import auto_name
from runtime.errors import ConfigError, InvalidArgumentError

BASE = """
process_servers = ["https://ps1:9443"]
[tls]
ca_file = "ca.pem"
cert_file = "m.pem"
key_file = "m.key"
[[disks]]
id = "vm01-d0"
[[disks]]
id = "vm01-d1"
"""


def test_defaults_follow_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE)
    config = load(path)
    assert config.tags.crash_interval_s == 300
    assert config.tags.app_interval_s == 3600
    assert config.tagged_disks == ("vm01-d0", "vm01-d1")
    assert config.capture.journal_max_bytes == 2 * 2**30


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[capture]\njournal_max_bytes = 1048576\n", "journal_max_bytes: expected at least"),
        ("[capture]\nhold_max_s = 0\n", "hold_max_s: expected 0 < seconds"),
        ("[tags]\ncrash_interval_s = 0.5\n", "crash_interval_s: expected 0 (no tags) or 1.."),
        ("[tags]\nround_timeout_s = 10\nfreeze_max_s = 10\n", "expected less than freeze_max_s"),
        ('[tags]\nquiesce = [" "]\n', "quiesce: expected command lines, found an empty one"),
        ('[tags]\ndisks = ["vm02-d0"]\n', "found 'vm02-d0'"),
    ],
    ids=["journal", "hold", "interval", "round", "quiesce", "disks"],
)
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    # Top-level tables must come after the top-level keys: put them last.
    path = tmp_path / "agent.toml"
    path.write_text(BASE.replace("[tls]", text + "[tls]", 1))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10809", Listen("127.0.0.1", 10809)),
        ("[::1]:9000", Listen("::1", 9000)),
        ("127.0.0.2:1", Listen("127.0.0.2", 1)),
    ],
)
def test_the_export_listens_on_loopback(text: str, expected: Listen) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("0.0.0.0:10809", "not a loopback address"), ("10.1.2.3:10809", "not a loopback"),
     ("localhost:10809", "expected HOST:PORT"), ("127.0.0.1", "expected HOST:PORT"),
     ("127.0.0.1:0", "expected HOST:PORT"), ("127.0.0.1:70000", "expected HOST:PORT")],
)  # fmt: skip
def test_other_addresses_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        parse_listen(text)


def test_scheduled_tags_are_named_by_their_time() -> None:
    assert auto_name("crash", 1_795_318_500_000_000_000) == "crash-20261122T033500Z"
