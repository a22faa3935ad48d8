"""aiohttp, imported without loading the system's CA store:
``from agent.fastimport import aiohttp``.

At import, aiohttp builds two default TLS contexts, and each loads every
certificate of the system's CA store (``/etc/ssl/certs``): about 0.1 CPU
seconds at every start of ``blockrepl``, more than a resync of a disk with
few differences spends comparing a gigabyte. The agent never uses those
contexts: it trusts only the deployment's CA (runtime/tls.py). So while
aiohttp is imported, OpenSSL's default store is pointed at an empty file
(``SSL_CERT_FILE``, ``SSL_CERT_DIR``); the environment is restored right
after, so child processes (quiesce commands, nbdkit) see it unchanged.
Agent modules import aiohttp from here; if something imported it before,
this changes nothing.
"""

from __future__ import annotations

import os

#: The variables OpenSSL's X509_get_default_cert_file_env and _dir_env name.
_STORE_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")

_saved = {name: os.environ.get(name) for name in _STORE_VARIABLES}
for _name in _STORE_VARIABLES:
    os.environ[_name] = os.devnull
try:
    import aiohttp
finally:
    for _name, _value in _saved.items():
        if _value is None:
            os.environ.pop(_name, None)
        else:
            os.environ[_name] = _value

__all__ = ["aiohttp"]
