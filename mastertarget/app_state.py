"""What the master target's two web applications are given, as typed app keys.

The data API (mastertarget/server.py) and the admin socket
(mastertarget/admin.py) read only these, never the daemon: neither imports
mastertarget/daemon.py, and a handler can be served with the pieces it uses
and no daemon around them.

The config is given as a function returning the running one: a reload
(SIGHUP) replaces it while the applications run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Final

from aiohttp import web

from mastertarget.config import MasterTargetConfig
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.replica import DiskReplica
from mastertarget.state import StateStore
from protocol.api import ErrorBody
from protocol.keyring import KeyRing

#: The replicated disks by id.
REPLICAS: Final = web.AppKey[Mapping[str, DiskReplica]]("replicas")
#: The running config.
CONFIG: Final = web.AppKey[Callable[[], MasterTargetConfig]]("config")
METRICS: Final = web.AppKey[MasterTargetMetrics]("metrics")
#: Decides whether a received file's key is known before it is stored.
KEYRING: Final = web.AppKey[KeyRing]("keyring")
#: Runs what blocks: hashing the target, reading the catalog.
EXECUTOR: Final = web.AppKey[Executor]("executor")
#: The catalog, for what spans disks (a group's points).
CATALOG: Final = web.AppKey[StateStore]("catalog")


def replica_or_404(request: web.Request) -> DiskReplica:
    """The replica the URL's ``{disk}`` names, or a 404 ``unknown-disk`` answer."""
    disk_id = request.match_info["disk"]
    replica = request.app[REPLICAS].get(disk_id)
    if replica is None:
        refusal = ErrorBody(
            "unknown-disk", f"disk {disk_id!r} is not replicated to this master target"
        )
        raise web.HTTPNotFound(text=json.dumps(refusal.to_json()), content_type="application/json")
    return replica
