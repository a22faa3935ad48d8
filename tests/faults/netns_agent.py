"""An agent stand-in for the partition test, run inside a network namespace.

``python -m tests.faults.netns_agent URL BATCH_DIR CA CERT KEY`` POSTs the
batch files of BATCH_DIR (named by their first seq) in order, resending from
the process server's acknowledged seq after any failure, as the agent does,
and prints the last acknowledged seq when every batch is acknowledged.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp

from runtime.config import TlsFiles
from runtime.tls import client_context

#: Seconds any one request may take before it counts as failed.
REQUEST_TIMEOUT_S = 5.0


async def main(url: str, batch_dir: Path, tls: TlsFiles) -> int:
    batches = sorted((int(p.stem), p.read_bytes()) for p in batch_dir.glob("*.brb"))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(ssl=client_context(tls))
    acked = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        index = 0
        while index < len(batches):
            try:
                async with session.post(f"{url}/batches", data=batches[index][1]) as answer:
                    body = await answer.json()
                    if answer.status == 200:
                        acked = int(body["acked_seq"])
                        index += 1
                        continue
                    if answer.status == 409 and "expected_seq" in body:
                        acked = int(body["expected_seq"]) - 1
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.2)
            index = next((i for i, (seq, _) in enumerate(batches) if seq > acked), len(batches))
    print(acked)
    return 0


if __name__ == "__main__":
    url, folder, ca, cert, key = sys.argv[1:6]
    files = TlsFiles(ca_file=Path(ca), cert_file=Path(cert), key_file=Path(key))
    raise SystemExit(asyncio.run(main(url, Path(folder), files)))
