"""An ASGI app for tests/producer/test_supervisor.py, served by ``Supervisor`` in worker processes of their own.

Its lifespan marks each start and each stop in ``$STUCK_APP_DIR``; the first worker to be told to stop then never
finishes stopping (as a worker stuck in a call that does not return), the others stop at once.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Lifespan only (HTTP requests get a plain 200)."""
    if scope["type"] != "lifespan":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    marks = Path(os.environ["STUCK_APP_DIR"])
    pid = os.getpid()
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            (marks / f"started-{pid}").touch()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                # Only one worker claims the stuck part (O_EXCL: the first to get here).
                os.close(os.open(marks / "stuck", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                (marks / f"stopped-{pid}").touch()
                await send({"type": "lifespan.shutdown.complete"})
                return
            (marks / f"stuck-{pid}").touch()
            await asyncio.Event().wait()  # never set
