"""A worker process's first Klaviyo request pays no lazy imports: httpcore would import anyio's asyncio backend
(about 30 modules, 30-70 ms) on it, and that first request is usually a fresh event's."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import asyncio, sys
import worker.klaviyo.client  # what every worker (and, forked from it, its express lane) imports at start
import httpx

async def main():
    async def answer(reader, writer):
        await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(b"HTTP/1.1 204 No Content\\r\\n\\r\\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    before = set(sys.modules)
    async with httpx.AsyncClient() as client:
        status = (await client.get(f"http://127.0.0.1:{port}/")).status_code
    print(status, sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("anyio", "sniffio")))

asyncio.run(main())
"""


def test_first_request_imports_nothing_more() -> None:
    # A fresh interpreter: the test process has long imported everything.
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "204 []"
