"""A deployment PKI made once with runtime/pki.py, shared read-only by the TLS and PKI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.pki import init_ca, issue_machine

#: Extra server names given to ``init_ca``: one DNS name, one IPv4 address.
EXTRA_SERVER_NAMES = ("ps.example.net", "192.0.2.10")


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with both server certificates and a certificate for machine vm01."""
    directory = tmp_path_factory.mktemp("deployment") / "pki"
    init_ca(directory, EXTRA_SERVER_NAMES)
    issue_machine(directory, "vm01")
    return directory


@pytest.fixture(scope="session")
def other_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA that also has a machine called vm01."""
    directory = tmp_path_factory.mktemp("other-deployment") / "pki"
    init_ca(directory)
    issue_machine(directory, "vm01")
    return directory
