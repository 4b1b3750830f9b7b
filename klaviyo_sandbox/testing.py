"""Run the sandbox inside the current process, for tests and benchmarks.

    from klaviyo_sandbox.config import SandboxConfig
    from klaviyo_sandbox.testing import run_sandbox
    from klaviyo_sandbox.client import SandboxClient

    with run_sandbox(SandboxConfig.with_api_keys("pk_test", rate_scale=60)) as base_url:
        # point any Klaviyo client at base_url (e.g. klaviyo-api's ``test_host=base_url``) with
        # ``Authorization: Klaviyo-API-Key pk_test`` and ``revision: 2026-07-15``
        sandbox = SandboxClient(base_url)          # read back what arrived
        sandbox.wait_idle()                         # let asynchronous record ingestion finish
        sandbox.profiles(external_id="serial-1")

The server is uvicorn on 127.0.0.1 on a free port, in a daemon thread with its own event loop; leaving the
``with`` block stops it. ``start_sandbox`` returns the running server instead (``.url``, ``.app`` for direct
access to its runtime, ``.stop()``), for fixtures that outlive one block.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from klaviyo_sandbox.app import SandboxApp, create_app
from klaviyo_sandbox.config import SandboxConfig


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class SandboxServer:
    """A sandbox served by uvicorn in a background thread."""

    url: str
    app: SandboxApp
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_sandbox(config: SandboxConfig | None = None, port: int | None = None) -> SandboxServer:
    """Start the sandbox on 127.0.0.1 (a free port unless given) and wait until it accepts connections."""
    app = create_app(config or SandboxConfig())
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name=f"klaviyo-sandbox:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the Klaviyo sandbox did not start")
        time.sleep(0.01)
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    return SandboxServer(f"http://127.0.0.1:{port}", app, server, thread)


@contextmanager
def run_sandbox(config: SandboxConfig | None = None, port: int | None = None) -> Iterator[str]:
    """Serve the sandbox for the ``with`` block; yields its base URL (``http://127.0.0.1:PORT``)."""
    running = start_sandbox(config, port)
    try:
        yield running.url
    finally:
        running.stop()
