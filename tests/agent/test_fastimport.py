"""aiohttp imported without the system's CA store, the environment left as it was."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, os, ssl
os.environ["SSL_CERT_FILE"] = "/etc/an-admins-choice.pem"
os.environ.pop("SSL_CERT_DIR", None)
from agent.fastimport import aiohttp
from aiohttp import connector
print(json.dumps({
    "file": os.environ.get("SSL_CERT_FILE"),
    "dir": os.environ.get("SSL_CERT_DIR"),
    "default_store_certs": connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
}))
"""


def test_the_environment_is_restored_and_the_store_is_not_loaded() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(result.stdout)
    # Child processes (quiesce commands, nbdkit) see the environment unchanged.
    assert (seen["file"], seen["dir"]) == ("/etc/an-admins-choice.pem", None)
    # aiohttp's default context, which the agent never uses, holds no CA.
    assert seen["default_store_certs"] == 0
