"""Reading an HTTP/1.1 answer off an asyncio stream, for benchmark clients that write raw requests (no client
library's cost in the figures)."""

from __future__ import annotations

import asyncio


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one answer (head, then a ``Content-Length`` body) and return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return int(head[9:12])
