"""Shared test helpers.

Tests that drive a real peer (openssl, qemu-img, prometheus, ...) call
:func:`require_binary`: outside CI a missing peer skips the test with the
reason, under ``CI=true`` it fails it, because CI must prove everything.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(name: str) -> str:
    """The path of an installed program, or skip (fail under CI) when missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (./scripts/test installs it when run as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
