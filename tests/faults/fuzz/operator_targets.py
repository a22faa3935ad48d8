"""Fuzz targets for what operators write: point SPECs and the config and key files."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from agent import config as agent_config
from mastertarget import config as mt_config
from mastertarget.errors import PointSpecError
from mastertarget.pointspec import parse_spec
from mastertarget.vsphere import config as vsphere_config
from processserver import config as ps_config
from runtime.config import ConfigError
from runtime.keyfile import MAX_KEY_FILE_BYTES, load_keyring, new_keyring_file_text
from tests.faults.fuzz.harness import ROOT, Target, check_declared, kept_and_made, scratch_file

# --- point SPECs: how an operator names a recovery point (CLI and admin API) ------------


def run_point_spec(data: bytes) -> None:
    """A SPEC, as UTF-8 (bytes that are not are lone surrogates, as JSON can carry)."""
    spec = parse_spec(data.decode("utf-8", "surrogateescape"))
    assert parse_spec(str(spec)) == spec, f"{spec} does not parse back as itself"


def _point_spec_seeds() -> Iterator[bytes]:
    for text in ("latest", "LATEST-app", " latest-processed", "tag:before-upgrade",
                 "2026-11-22T03:15:00Z", "2026-11-22T04:15:00+01:00",
                 "2026-11-22t03:15:00,250000001-0130", "2026-11-22T03:15"):  # fmt: skip
        yield text.encode()


# --- config and key files --------------------------------------------------------------

CONFIG_LOADERS: Final = (
    agent_config.load, ps_config.load, mt_config.load, vsphere_config.load, load_keyring,
)  # fmt: skip


def run_config(data: bytes) -> None:
    """The bytes as every daemon's config file and as the key file."""
    path = scratch_file("config.toml", data)
    for load in CONFIG_LOADERS:
        try:
            load(path)
        except ConfigError as exc:
            check_declared(exc)


def _config_seeds() -> Iterator[bytes]:
    for name in ("agent", "processserver", "mastertarget", "vsphere"):
        yield (ROOT / "systemd" / f"{name}.toml").read_bytes()
    yield new_keyring_file_text(rng=lambda n: bytes(range(1, n + 1))).encode()


POINT_SPEC: Final = Target(
    "point-spec", run_point_spec, kept_and_made("point-spec", _point_spec_seeds),
    (PointSpecError,), corpus="point-spec",
)  # fmt: skip
CONFIG: Final = Target(
    "config", run_config, kept_and_made("config", _config_seeds), (ConfigError,),
    held_bytes=MAX_KEY_FILE_BYTES, corpus="config",
)  # fmt: skip
