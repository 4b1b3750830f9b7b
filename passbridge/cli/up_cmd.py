"""``passbridge up``: the local stack, kept running for manual use (what ``make run`` starts)."""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from passbridge.cli.common import console, settings

if TYPE_CHECKING:
    from passbridge.settings import Settings


def cli_exports(
    state_dir: Path, redis_url: str, sandbox_url: str | None = None, rate_scale: float = 1.0
) -> str:
    """The shell line that points CLI commands at a running ``up`` stack: its Redis and its state dir (whose
    ``secret.key`` encrypts its accounts unless PASSBRIDGE_SECRET_KEY is set), and the stack's sandbox when it
    runs one: without it `klaviyo setup`, `accounts check` and `engine resume --check` would call the real
    Klaviyo with the sandbox's key."""
    line = f"export PASSBRIDGE_STATE_DIR={shlex.quote(str(state_dir.resolve()))} REDIS_URL={shlex.quote(redis_url)}"
    if sandbox_url is not None:
        line += f" PASSBRIDGE_KLAVIYO_BASE_URL={shlex.quote(sandbox_url)}"
        if rate_scale != 1.0:
            line += f" PASSBRIDGE_KLAVIYO_RATE_SCALE={rate_scale:g}"
    return line


def external_klaviyo(s: Settings) -> str | None:
    """The Klaviyo the operator configured (environment or ``.env``), or ``None``: the stack runs the sandbox."""
    return s.klaviyo_base_url if "klaviyo_base_url" in s.model_fields_set else None


def up(
    workers: int = typer.Option(2, help="Worker processes."),
    rate_scale: float = typer.Option(1.0, help="Klaviyo's rate-limit clock in the sandbox and workers."),
    producer_port: int = typer.Option(8000, help="Producer port."),
    sandbox_port: int = typer.Option(8089, help="Sandbox port (ignored with PASSBRIDGE_KLAVIYO_BASE_URL)."),
    account: str = typer.Option("local", help="An account to create (with the sandbox's key) if missing."),
    state_dir: Path = typer.Option(Path(".passbridge/up"), help="Logs and Redis data."),
) -> None:
    """Start embedded Redis, the Klaviyo sandbox, the producer and workers; print the URLs; Ctrl-C stops."""
    import asyncio

    from passbridge.demo.local import ensure_local_account
    from passbridge.demo.stack import StackConfig, run_stack

    s = settings()  # warnings only unless PASSBRIDGE_LOG_LEVEL is set; the stack's processes log to files
    external = external_klaviyo(s)
    key = "pk_local_" + "0" * 24
    admin = s.admin_token.get_secret_value() if s.admin_token else "local-admin"
    cfg = StackConfig(
        state_dir=state_dir,
        workers=workers,
        rate_scale=rate_scale,
        sandbox=not external,
        sandbox_api_keys=[key],
        klaviyo_base_url=external,
        producer_port=producer_port,
        sandbox_port=sandbox_port,
        admin_token=admin,
        redis_appendfsync=s.redis_appendfsync,
        secret_key=s.secret_key.get_secret_value() if s.secret_key else None,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with run_stack(cfg) as stack:
        creds = asyncio.run(ensure_local_account(stack, account, None if external else key))
        console.print(f"[bold]passbridge is up[/] (logs in {stack.logs})")
        console.print(f"  producer   {stack.producer_url}   (API docs {stack.producer_url}/docs)")
        # Only the local default is printed: a token the operator chose is theirs already, and output ends up
        # in terminals' scrollback and CI logs.
        shown = "as set in PASSBRIDGE_ADMIN_TOKEN" if s.admin_token else admin
        console.print(f"  dashboard  {stack.producer_url}/dashboard   admin token: {shown}")
        console.print(f"  metrics    {stack.producer_url}/metrics")
        console.print(f"  Klaviyo    {stack.klaviyo_url}")
        console.print(f"  Redis      {stack.redis_url}")
        # The stack keeps its own state dir (and so its own generated key): CLI commands need both to read
        # its accounts. soft_wrap: a wrapped line could not be pasted.
        console.print("  CLI        run this first in a shell for `passbridge` commands against this stack:")
        exports = cli_exports(state_dir, stack.redis_url, None if external else stack.klaviyo_url, rate_scale)
        console.print(f"             {exports}", soft_wrap=True, markup=False)
        if creds:
            console.print(f"  account {account!r}: ingest token {creds[0]}  webhook secret {creds[1]}")
        console.print("Ctrl-C stops everything.")
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
