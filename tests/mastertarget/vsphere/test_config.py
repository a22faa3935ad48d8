"""The vSphere config file and the password it leads to."""

from __future__ import annotations

from pathlib import Path

import pytest

from mastertarget.errors import VsphereConfigError
from mastertarget.vsphere.config import (
    DEFAULT_DEVICE_DIR,
    PASSWORD_ENV,
    Secret,
    VsphereConfig,
    load,
    load_password,
)
from runtime.errors import ConfigError


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "vsphere.toml"
    path.write_text(
        'host = "vc.example.com"\nuser = "svc@vsphere.local"\nca_file = "ca.pem"\n'
        f'master_target_vm = "mt01"\n{extra}'
    )
    return path


def test_a_minimal_config_takes_the_documented_defaults(tmp_path: Path) -> None:
    config = load(_config(tmp_path))
    assert (config.port, config.password_file, config.datacenter) == (443, None, None)
    assert config.ca_file == tmp_path / "ca.pem"  # relative to the config file
    assert config.guest.device_dir == DEFAULT_DEVICE_DIR
    assert (config.request_timeout_s, config.task_timeout_s, config.guest.device_wait_s) == (
        60.0,
        600.0,
        60.0,
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('password = "x"\n', "unknown key password"),
        ("port = 0\n", "port: expected 1..65535, found 0"),
        ("task_timeout_s = 0\n", "task_timeout_s: expected seconds > 0"),
        ("[guest]\ndevice_wait_s = -1\n", "guest.device_wait_s: expected seconds >= 0"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load(_config(tmp_path, extra))


def test_an_empty_master_target_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text('host = "h"\nuser = "u"\nca_file = "c"\nmaster_target_vm = " "\n')
    with pytest.raises(ConfigError, match="master_target_vm: expected a non-empty string"):
        load(path)


def _with_file(tmp_path: Path, text: str, mode: int = 0o600) -> VsphereConfig:
    secret = tmp_path / "pw"
    secret.write_text(text)
    secret.chmod(mode)
    return load(_config(tmp_path, f'password_file = "{secret}"\n'))


def test_the_password_file_holds_one_line(tmp_path: Path) -> None:
    assert load_password(_with_file(tmp_path, "s3cret\n"), {}).reveal() == "s3cret"
    assert load_password(_with_file(tmp_path, "s3cret\r\n"), {}).reveal() == "s3cret"
    assert load_password(_with_file(tmp_path, " spaced pass "), {}).reveal() == " spaced pass "
    with pytest.raises(VsphereConfigError, match="has several lines"):
        load_password(_with_file(tmp_path, "a\nb\n"), {})
    with pytest.raises(VsphereConfigError, match="is empty"):
        load_password(_with_file(tmp_path, ""), {})
    with pytest.raises(VsphereConfigError, match="has mode 0640: expected no access"):
        load_password(_with_file(tmp_path, "s3cret", 0o640), {})


def test_a_password_file_that_is_not_utf8_is_refused_without_showing_it(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_bytes(b"s3cret\xff")
    secret.chmod(0o600)
    config = load(_config(tmp_path, f'password_file = "{secret}"\n'))
    with pytest.raises(VsphereConfigError) as refused:
        load_password(config, {})
    assert "expected UTF-8 text, found an invalid byte at offset 6" in refused.value.message
    assert "s3cret" not in refused.value.message


def test_the_password_comes_from_exactly_one_place(tmp_path: Path) -> None:
    with_file = _with_file(tmp_path, "from-file\n")
    without = load(_config(tmp_path))
    assert load_password(without, {PASSWORD_ENV: "from-env"}).reveal() == "from-env"
    with pytest.raises(VsphereConfigError, match="given twice"):
        load_password(with_file, {PASSWORD_ENV: "from-env"})
    with pytest.raises(VsphereConfigError, match="no vCenter password"):
        load_password(without, {})


def test_a_secret_does_not_show_itself() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret} {secret!r} {[secret]}"
    assert secret.reveal() == "hunter2"


def test_the_example_config_loads() -> None:
    config = load(Path(__file__).resolve().parents[3] / "systemd" / "vsphere.toml")
    assert (config.host, config.port, config.master_target_vm) == (
        "vcenter.example.com",
        443,
        "mt01",
    )
    assert config.password_file == Path("/etc/blockrepl/vsphere.password")
    assert config.guest.device_dir == DEFAULT_DEVICE_DIR
