"""plan_reload: which changes of a config file take effect now, which wait."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mastertarget.config import MasterTargetConfig
from mastertarget.daemon import RELOADABLE as MT_RELOADABLE
from processserver.config import ProcessServerConfig
from processserver.daemon import RELOADABLE as PS_RELOADABLE
from runtime.config import FieldValueError, LoggingConfig, TlsFiles, from_table
from runtime.errors import ConfigError
from runtime.reload import plan_reload, touches


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    low: int = 1
    high: int = 2

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise FieldValueError("low", f"expected low < high, found {self.low} and {self.high}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    port: int = 1
    limits: Limits = dataclasses.field(default_factory=Limits)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    names: tuple[str, ...] = ()


def test_nothing_changed_keeps_the_running_object() -> None:
    running = Config()
    plan = plan_reload(running, Config(), ["limits", "logging"])
    assert plan.config is running
    assert (plan.applied, plan.restart) == ((), ())


def test_reloadable_keys_change_and_the_others_wait() -> None:
    running = Config()
    loaded = Config(port=2, limits=Limits(low=5, high=9), names=("a",))
    plan = plan_reload(running, loaded, ["limits.high", "limits.low"])
    assert plan.config == Config(port=1, limits=Limits(low=5, high=9), names=())
    assert plan.applied == (("limits.low", 1, 5), ("limits.high", 2, 9))
    assert plan.restart == ("port", "names")


def test_a_table_stands_for_every_key_under_it() -> None:
    plan = plan_reload(Config(), Config(logging=LoggingConfig(level="debug")), ["logging"])
    assert plan.applied == (("logging.level", "info", "debug"),)
    assert touches(plan, "logging")
    assert not touches(plan, "limits")


def test_a_mix_that_breaks_a_rule_between_keys_is_refused() -> None:
    """The new low mark applies now, the new high mark would wait: low >= high."""
    loaded = Config(limits=Limits(low=5, high=9))
    with pytest.raises(ConfigError, match="expected low < high, found 5 and 2"):
        plan_reload(Config(), loaded, ["limits.low"])


def test_the_process_server_reloads_what_its_docs_say(tmp_path: Path) -> None:
    """docs/operations.md lists these keys as reloadable and the rest as needing a restart."""
    tls = {"ca_file": "ca.pem", "cert_file": "ps.pem", "key_file": "ps.key"}
    base = {
        "tls": tls, "key_file": "k.toml", "machines": [{"id": "vm01", "disks": ["d0"]}],
        "master_target": {"url": "https://mt:9444", "tls": tls},
    }  # fmt: skip
    running = from_table(ProcessServerConfig, base, source="test")
    changed = {
        **base, "cache_high_bytes": 2**31, "cache_low_bytes": 2**30, "zstd_level": 5,
        "port": 10443, "machines": [{"id": "vm01", "disks": ["d0", "d1"]}],
        "tls": {**tls, "cert_file": "ps2.pem"}, "logging": {"level": "warning"},
    }  # fmt: skip
    plan = plan_reload(running, from_table(ProcessServerConfig, changed, source="t"), PS_RELOADABLE)
    assert {key for key, _, _ in plan.applied} == {
        "cache_high_bytes", "cache_low_bytes", "zstd_level", "tls.cert_file", "logging.level",
    }  # fmt: skip
    assert set(plan.restart) == {"port", "machines"}
    assert plan.config.tls == TlsFiles(
        ca_file=Path("ca.pem"), cert_file=Path("ps2.pem"), key_file=Path("ps.key")
    )
    assert plan.config.port == running.port


@pytest.mark.parametrize(
    ("daemon", "config", "reloadable"),
    [
        ("process server", ProcessServerConfig, PS_RELOADABLE),
        ("master target", MasterTargetConfig, MT_RELOADABLE),
    ],
)
def test_the_guide_lists_what_reloads_and_what_waits(
    daemon: str, config: type[object], reloadable: tuple[str, ...]
) -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    row = next(line for line in guide.splitlines() if line.startswith(f"| {daemon} | `logging.*`"))
    _, now, waits = row.strip(" |").split(" | ")
    keys_now = {key.removesuffix(".*") for key in re.findall(r"`([^`]+)`", now)}
    keys_waiting = {key.removesuffix(".*") for key in re.findall(r"`([^`]+)`", waits)}
    assert keys_now == set(reloadable)
    assert dataclasses.is_dataclass(config)
    tops = {field.name for field in dataclasses.fields(config)}
    assert {key.split(".")[0] for key in keys_now | keys_waiting} == tops
