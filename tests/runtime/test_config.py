"""The TOML config loader: types, defaults, nesting, paths, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from runtime.config import (
    ConnectionTimeouts,
    FieldValueError,
    LoggingConfig,
    MetricsListen,
    TlsFiles,
    check_https_url,
    check_seconds,
    from_table,
    load_config,
)
from runtime.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    directory: Path
    quota_bytes: int = 10 * 2**30
    high_watermark_ratio: float = 0.9

    def __post_init__(self) -> None:
        if not 0 < self.high_watermark_ratio <= 1:
            raise FieldValueError(
                "high_watermark_ratio", f"expected 0 < x <= 1, found {self.high_watermark_ratio}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    """A config shaped like a daemon's, using every supported field type."""

    name: str
    rpo_threshold_s: float = 900.0
    workers: int = 4
    compress: bool = True
    mode: Literal["fast", "safe"] = "safe"
    disks: tuple[str, ...] = ()
    ports: tuple[int, ...] = (9443,)
    spool_dir: Path | None = None
    retention_s: int | None = None
    tls: TlsFiles
    cache: CacheConfig
    metrics: MetricsListen = dataclasses.field(default_factory=lambda: MetricsListen(port=9101))
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


MINIMAL = """
name = "ps1"
[tls]
ca_file = "pki/ca.pem"
cert_file = "/etc/blockrepl/processserver.pem"
key_file = "pki/processserver.key"
[cache]
directory = "/var/cache/blockrepl"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    return path


def test_minimal_document_gets_defaults_and_resolves_relative_paths(tmp_path: Path) -> None:
    config = load_config(DaemonConfig, write(tmp_path, MINIMAL))
    assert config.name == "ps1"
    assert config.rpo_threshold_s == 900.0
    assert config.workers == 4
    assert config.compress is True
    assert config.mode == "safe"
    assert config.disks == ()
    assert config.spool_dir is None
    assert config.retention_s is None
    # Relative to the config file's directory, not the working directory.
    assert config.tls.ca_file == tmp_path / "pki" / "ca.pem"
    assert config.tls.key_file == tmp_path / "pki" / "processserver.key"
    assert config.tls.cert_file == Path("/etc/blockrepl/processserver.pem")
    assert config.cache == CacheConfig(directory=Path("/var/cache/blockrepl"))
    assert config.metrics == MetricsListen(port=9101, host="127.0.0.1")
    assert config.logging == LoggingConfig(level="info", format="text")


def test_every_field_set(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """
[metrics]
host = "0.0.0.0"
port = 9200
[logging]
level = "debug"
format = "json"
"""
    ).replace(
        'name = "ps1"',
        'name = "ps1"\nrpo_threshold_s = 60\nworkers = 8\ncompress = false\nmode = "fast"\n'
        'disks = ["d1", "d2"]\nports = [1, 2]\nspool_dir = "spool"\nretention_s = 86400',
    )
    config = load_config(DaemonConfig, write(tmp_path, text))
    assert config.rpo_threshold_s == 60.0
    assert isinstance(config.rpo_threshold_s, float)
    assert (config.workers, config.compress, config.mode) == (8, False, "fast")
    assert (config.disks, config.ports) == (("d1", "d2"), (1, 2))
    assert config.spool_dir == tmp_path / "spool"
    assert config.retention_s == 86400
    assert config.metrics == MetricsListen(host="0.0.0.0", port=9200)
    assert config.logging == LoggingConfig(level="debug", format="json")


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(DaemonConfig, write(tmp_path, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 1  # type: ignore[misc]


# (what to change in MINIMAL, the key the error must name, words it must contain)
BAD_DOCUMENTS = [
    ('name = "ps1"', 'name = "ps1"\nworkers = "4"', "workers: expected an integer, found a string"),
    (
        'name = "ps1"',
        'name = "ps1"\nworkers = true',
        "workers: expected an integer, found a boolean",
    ),
    ('name = "ps1"', 'name = "ps1"\nworkers = 4.5', "workers: expected an integer, found a float"),
    ('name = "ps1"', "name = 5", "name: expected a string, found an integer 5"),
    (
        'name = "ps1"',
        'name = "ps1"\ncompress = 1',
        "compress: expected a boolean, found an integer",
    ),
    (
        'name = "ps1"',
        'name = "ps1"\nrpo_threshold_s = "15m"',
        'rpo_threshold_s: expected a number, found a string "15m"',
    ),
    ('name = "ps1"', 'name = "ps1"\nmode = "quick"', 'mode: expected "fast" or "safe"'),
    (
        'name = "ps1"',
        'name = "ps1"\ndisks = "d1"',
        "disks: expected an array (of strings), found a string",
    ),
    ('name = "ps1"', 'name = "ps1"\ndisks = ["d1", 2]', "disks[1]: expected a string"),
    ('name = "ps1"', 'name = "ps1"\nports = [1, true]', "ports[1]: expected an integer"),
    ('name = "ps1"', 'name = "ps1"\nspool_dir = 3', "spool_dir: expected a path"),
    ('name = "ps1"', 'name = "ps1"\nspool_dir = ""', "spool_dir: expected a path, found an empty"),
    ('name = "ps1"', 'name = "ps1"\nretention_s = "1d"', "retention_s: expected an integer"),
    ('name = "ps1"', 'name = "ps1"\nworkerz = 4', "unknown key workerz"),
    ('name = "ps1"', 'name = "ps1"\nlogging = "debug"', "logging: expected a table [logging]"),
    ('ca_file = "pki/ca.pem"', "ca_file = 7", "tls.ca_file: expected a path (string), found an"),
    ('ca_file = "pki/ca.pem"', 'ca_file = "a"\nca_dir = "b"', "unknown key tls.ca_dir"),
    ('ca_file = "pki/ca.pem"', "", "missing required key tls.ca_file"),
    ('name = "ps1"', "", "missing required key name"),
    ('directory = "/var/cache/blockrepl"', 'directory = "/c"\nquota_bytes = -1.0', "cache.quota"),
    (
        'directory = "/var/cache/blockrepl"',
        'directory = "/c"\nhigh_watermark_ratio = 1.5',
        "cache.high_watermark_ratio: expected 0 < x <= 1, found 1.5",
    ),
    ("[cache]", "[metrics]\nport = 0\n[cache]", "metrics.port: expected 1..65535, found 0"),
    ("[cache]", "[metrics]\nport = 70000\n[cache]", "metrics.port: expected 1..65535"),
    ("[cache]", "[metrics]\nhost = 'x'\n[cache]", "missing required key metrics.port"),
    ("[cache]", "[logging]\nlevel = 'verbose'\n[cache]", "logging.level: expected one of debug,"),
    ("[cache]", "[logging]\nformat = 'xml'\n[cache]", 'logging.format: expected "text" or "json"'),
    ("[cache]", "[logging]\nformat = true\n[cache]", "logging.format: expected"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD_DOCUMENTS)
def test_bad_documents_name_the_key_and_the_file(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_config(DaemonConfig, path)
    assert caught.value.message.startswith(f"{path}: ")
    assert message in caught.value.message
    assert caught.value.exit_code == 78


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("[cache]", "[cache]\nquota_byte = 5"))
    with pytest.raises(
        ConfigError,
        match=r"unknown key cache\.quota_byte \(expected one of: "
        r"cache\.directory, cache\.high_watermark_ratio, cache\.quota_bytes\)",
    ):
        load_config(DaemonConfig, path)


def test_not_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "ps1"\nworkers = = 4\n')
    with pytest.raises(ConfigError, match=r"daemon\.toml: not valid TOML: .*line 2"):
        load_config(DaemonConfig, path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ConfigError, match=r"daemon\.toml"):
        load_config(DaemonConfig, path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*absent\.toml"):
        load_config(DaemonConfig, tmp_path / "absent.toml")


def test_from_table_with_prefix_and_without_base_dir() -> None:
    files = from_table(
        TlsFiles,
        {"ca_file": "ca.pem", "cert_file": "/abs/c.pem", "key_file": "k.key"},
        source="<test>",
    )
    assert files.ca_file == Path("ca.pem")  # left relative without a base directory
    with pytest.raises(ConfigError, match=r"^<test>: agent\.tls\.ca_file: expected a path"):
        from_table(
            TlsFiles,
            {"ca_file": 1, "cert_file": "c", "key_file": "k"},
            source="<test>",
            prefix="agent.tls.",
        )


def test_building_blocks_check_their_values_when_built_in_code() -> None:
    with pytest.raises(FieldValueError, match="port"):
        MetricsListen(port=0)
    with pytest.raises(FieldValueError, match="level"):
        LoggingConfig(level="INFO")
    assert LoggingConfig(level="warning").level_number == 30


def test_seconds_are_above_zero_and_bounded() -> None:
    check_seconds("t", 86400)
    check_seconds("t", 0.001, most=0.5)
    with pytest.raises(FieldValueError, match=r"t: expected 0 < seconds <= 86400, found 0"):
        check_seconds("t", 0)
    with pytest.raises(FieldValueError, match=r"expected 0 < seconds <= 0\.5, found 0\.6"):
        check_seconds("t", 0.6, most=0.5)
    with pytest.raises(FieldValueError, match="body_timeout_s: expected 0 < seconds"):
        ConnectionTimeouts(body_timeout_s=-1)
    check_seconds("window_s", 10 * 86400, most=None)  # a span without a bound
    with pytest.raises(FieldValueError, match=r"window_s: expected seconds > 0, found -1"):
        check_seconds("window_s", -1, most=None)


@pytest.mark.parametrize(
    "url", ["https://ps:9443", "https://ps1.dr.example.com:9443/", "https://[fd00::1]:9444",
            "https://10.0.0.5"],
)  # fmt: skip
def test_https_urls_of_peers(url: str) -> None:
    check_https_url("url", url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://mt:9444", "https://HOST"),
        ("https://mt:9444/v1", "nothing after it"),
        ("https://mt:9444?x=1", "nothing after it"),
        ("https://user@mt:9444", "nothing after it"),
        ("https://:9444", "https://HOST"),
        ("https://[::1:9444", "https://HOST"),
        ("https://mt:99999", "a port 1..65535"),
        ("https://mt:0", "a port 1..65535"),
        ("mt:9444", "https://HOST"),
    ],
)  # fmt: skip
def test_other_urls_are_refused_with_the_expected_shape(url: str, message: str) -> None:
    with pytest.raises(FieldValueError, match=message) as refused:
        check_https_url("master_target.url", url)
    assert refused.value.field == "master_target.url"


def test_unsupported_field_type_is_a_programming_error() -> None:
    @dataclasses.dataclass(frozen=True)
    class Odd:
        values: dict[str, int]

    with pytest.raises(TypeError, match="unsupported config field type"):
        from_table(Odd, {"values": {}}, source="<test>")
