"""A stand-in peer: a few routes of a daemon's API, served over the deployment's mutual TLS.

For tests of how a client (the agent, the shipper) reacts to answers a real
daemon would never give: each test writes the handlers that misbehave, this
serves them on 127.0.0.1 with the certificate of the daemon it stands in for.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

from aiohttp import web

from runtime.config import TlsFiles
from runtime.tls import server_context
from tests.conftest import Deployment

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (method, path pattern, handler)
Route = tuple[str, str, Handler]


@contextlib.asynccontextmanager
async def stand_in(
    deployment: Deployment,
    port: int,
    role: Literal["processserver", "mastertarget"],
    routes: list[Route],
) -> AsyncIterator[None]:
    """Serve ``routes`` on ``port`` as ``role`` (its server certificate) until the block ends."""
    app = web.Application(client_max_size=64 * 2**20)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    pki = deployment.pki
    files = TlsFiles(
        ca_file=pki / "ca.pem", cert_file=pki / f"{role}.pem", key_file=pki / f"{role}.key"
    )
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(files)).start()
    try:
        yield
    finally:
        await runner.cleanup()
