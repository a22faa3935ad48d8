"""The vCenter password: where it may come from, and that it never shows."""

from __future__ import annotations

import socket
from pathlib import Path

from mastertarget.vsphere.config import PASSWORD_ENV
from tests.conftest import Deployment

from .conftest import ADMIN, FAILBACK_VM, run_vsphere


def test_the_password_never_appears_in_output_or_logs(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    vcsim.ready_master_target()
    vcsim.power_off(FAILBACK_VM)
    config = vcsim.write_config(tmp_path, level="debug")
    from_env = vcsim.write_config(tmp_path / "env", password_in_file=False, level="debug")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    bad_config = vcsim.write_config(wrong, level="debug")
    (wrong / "vsphere.password").write_text(ADMIN[1] + "-but-wrong\n")
    runs = [
        run_vsphere("discover", "--config", config),
        run_vsphere("discover", "--config", config, "--json"),
        run_vsphere("preflight", "--config", config, "--vm", FAILBACK_VM),
        run_vsphere("attach", "--config", config, "--vm", FAILBACK_VM, "--no-guest", "--json"),
        run_vsphere("detach", "--config", config, "--vm", FAILBACK_VM, "--no-guest"),
        run_vsphere("create-vm", "--config", config, "--name", "new", "--disk-size", "1M"),
        run_vsphere("discover", "--config", from_env, env={PASSWORD_ENV: ADMIN[1]}),
        run_vsphere("discover", "--config", bad_config),
        run_vsphere("discover", "--config", config, env={PASSWORD_ENV: ADMIN[1]}),
    ]

    assert [r.code for r in runs] == [0, 0, 0, 0, 0, 0, 0, 77, 78]
    assert all("connecting to" in r.err for r in runs[:8])  # the logs were on, at debug
    for result in runs:
        assert ADMIN[1] not in result.out
        assert ADMIN[1] not in result.err
    assert "refused the user name or password of svc-admin" in runs[7].err
    assert "given twice" in runs[8].err


def test_the_password_comes_from_a_private_file_or_the_environment(
    start_vcsim,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    vcsim = start_vcsim()
    config = vcsim.write_config(tmp_path)
    secret = tmp_path / "vsphere.password"
    no_file = vcsim.write_config(tmp_path / "nofile", password_in_file=False)

    none = run_vsphere("discover", "--config", no_file)
    empty_env = run_vsphere("discover", "--config", no_file, env={PASSWORD_ENV: ""})
    secret.chmod(0o644)
    readable = run_vsphere("discover", "--config", config)
    secret.write_text("\n")
    secret.chmod(0o600)
    empty = run_vsphere("discover", "--config", config)

    assert [r.code for r in (none, empty_env, readable, empty)] == [78, 78, 78, 78]
    assert (
        f"expected password_file in the config, or the environment variable {PASSWORD_ENV}"
        in none.err
    )
    assert "never on the command line" in none.err
    assert f"{PASSWORD_ENV} is set but empty" in empty_env.err
    assert "has mode 0644: expected no access for group or others" in readable.err
    assert f"chmod 600 {secret}" in readable.err
    assert "is empty: expected the password" in empty.err


def test_a_certificate_from_another_ca_is_refused(
    start_vcsim, tmp_path: Path, deployment: Deployment
) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    config = vcsim.write_config(tmp_path, ca_file=deployment.pki / "ca.pem")

    result = run_vsphere("discover", "--config", config)

    assert result.code == 69
    assert f"does not verify against ca_file {deployment.pki / 'ca.pem'}" in result.err
    assert ADMIN[1] not in result.err


def test_an_unreachable_vcenter_is_a_connection_error(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = vcsim.write_config(tmp_path)
    config.write_text(config.read_text().replace(f"port = {vcsim.port}", f"port = {port}"))

    result = run_vsphere("discover", "--config", config)

    assert result.code == 69
    assert f"cannot talk to 127.0.0.1:{port}" in result.err


def test_an_unknown_master_target_vm_is_named(start_vcsim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vcsim = start_vcsim()
    config = vcsim.write_config(tmp_path, master_target_vm="mt-typo")
    # Names are unique per folder only: the same name in another folder.
    datacenter = vcsim.admin().content.rootFolder.childEntity[0]
    folder = datacenter.vmFolder.CreateFolder("site-b")
    vcsim.create_vm("DC0_H0_VM0", "DC0_H0", "LocalDS_0", folder=folder)

    missing = run_vsphere("preflight", "--config", config)
    twice = run_vsphere(
        "attach", "--config", vcsim.write_config(tmp_path / "b"), "--vm", "DC0_H0_VM0"
    )

    assert missing.code == 66
    assert "no VM named 'mt-typo' in the inventory" in missing.err
    assert twice.code == 64
    assert "2 VMs are named 'DC0_H0_VM0'" in twice.err
