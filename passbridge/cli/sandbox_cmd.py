"""``passbridge sandbox``: serve the local Klaviyo sandbox (``klaviyo_sandbox``) with uvicorn."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

from passbridge.cli.common import check_can_listen, console, fail, settings

if TYPE_CHECKING:
    from klaviyo_sandbox.config import Outage


def _error_rates(values: list[str]) -> tuple[tuple[int, float], ...]:
    rates: list[tuple[int, float]] = []
    for value in values:
        status, sep, rate = value.partition("=")
        try:
            code, probability = int(status), float(rate)
        except ValueError:
            fail(f"--error-rate takes STATUS=RATE (e.g. 503=0.05), not {value!r}")
        if not sep or code not in (429, 500, 502, 503, 504) or not 0 <= probability <= 1:
            fail(
                f"--error-rate takes STATUS=RATE with STATUS 429/500/502/503/504 and 0 ≤ RATE ≤ 1, not {value!r}"
            )
        rates.append((code, probability))
    return tuple(rates)


def _outages(values: list[str]) -> tuple[Outage, ...]:
    # Imported here: the sandbox is loaded only when this command runs.
    from klaviyo_sandbox.config import Outage

    out = []
    for value in values:
        parts = value.split(":")
        try:
            start, duration = float(parts[0]), float(parts[1])
            status = int(parts[2]) if len(parts) > 2 else 503
        except (ValueError, IndexError):
            fail(f"--outage takes START_S:DURATION_S[:STATUS] (STATUS 0 drops connections), not {value!r}")
        out.append(Outage(start_s=start, duration_s=duration, status=status))
    return tuple(out)


def sandbox(
    host: str = typer.Option("127.0.0.1", help="Bind address (keep it on loopback: /_sandbox needs no key)."),
    port: int = typer.Option(8089, min=0, max=65535, help="Port (0 = any free port, printed at start-up)."),
    api_key: list[str] = typer.Option(
        [], "--api-key", help="Create an account with exactly this private key (repeatable)."
    ),
    oauth_client: list[str] = typer.Option(
        [],
        "--oauth-client",
        help="CLIENT_ID:SECRET[:REDIRECT_URI], an OAuth app on the first --api-key account (repeatable).",
    ),
    no_custom_objects: bool = typer.Option(
        False,
        "--no-custom-objects",
        help="Accounts lack the Custom Objects entitlement (403 on object types).",
    ),
    rate_scale: float = typer.Option(1.0, help="Run Klaviyo's rate-limit clock this many times faster."),
    unlimited: bool = typer.Option(False, "--unlimited", help="Turn rate limits off."),
    error_rate: list[str] = typer.Option(
        [], "--error-rate", "--fault-rate", help="STATUS=RATE, e.g. 503=0.05 (repeatable)."
    ),
    latency_ms: float = typer.Option(0.0, help="Added latency per /api request."),
    jitter_ms: float = typer.Option(0.0, help="Extra random latency, uniform 0..N ms."),
    hang_rate: float = typer.Option(0.0, help="Share of requests that never answer."),
    drop_rate: float = typer.Option(0.0, help="Share of requests whose connection is dropped unanswered."),
    drop_after_processing: bool = typer.Option(
        False, help="Dropped requests are applied first (the answer is lost, not the write)."
    ),
    outage: list[str] = typer.Option(
        [], "--outage", help="START_S:DURATION_S[:STATUS] after start-up (repeatable)."
    ),
    fault_operations: list[str] = typer.Option(
        [], "--fault-operation", help="Limit random faults to this operationId (repeatable)."
    ),
    seed: int | None = typer.Option(None, help="Seed for fault randomness."),
    token_ttl_s: float = typer.Option(3600.0, help="OAuth access-token lifetime."),
    ingest_delay_s: float = typer.Option(0.05, help="Delay before data-source records are ingested."),
    publish_delay_s: float = typer.Option(
        0.0, help="How long a published object schema reads 'publishing' before it is active."
    ),
    job_latency_s: float = typer.Option(
        0.0,
        help="Extra time each profile bulk-import job takes, in Klaviyo seconds (divided by --rate-scale).",
    ),
    job_latency_jitter_s: float = typer.Option(
        0.0, help="Extra random job time, uniform 0..N Klaviyo seconds."
    ),
    base_url: str | None = typer.Option(
        None, help="Base URL used in response links (default: the Host header)."
    ),
) -> None:
    """Run the local Klaviyo sandbox: the Klaviyo REST API subset passbridge uses, with real limits."""
    import uvicorn

    settings(server=True)
    from klaviyo_sandbox.app import create_app
    from klaviyo_sandbox.config import (
        AccountConfig,
        ApiKeyConfig,
        FaultConfig,
        OAuthClientConfig,
        SandboxConfig,
        account_id_for_key,
    )

    if rate_scale <= 0:
        fail("--rate-scale must be > 0")
    if job_latency_s < 0 or job_latency_jitter_s < 0:
        fail("--job-latency-s and --job-latency-jitter-s must be >= 0")
    for rate in (hang_rate, drop_rate):
        if not 0 <= rate <= 1:
            fail("--hang-rate and --drop-rate take a probability between 0 and 1")
    if len(set(api_key)) != len(api_key):
        fail("each --api-key may be given once")
    clients = []
    for value in oauth_client:
        parts = value.split(":", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            fail(f"--oauth-client takes CLIENT_ID:SECRET[:REDIRECT_URI], not {value.split(':', 1)[0]}:***")
        clients.append(
            OAuthClientConfig(parts[0], parts[1], redirect_uris=(parts[2],) if len(parts) > 2 else ())
        )
    if clients and not api_key:
        fail("--oauth-client needs an account: give at least one --api-key")
    accounts = tuple(
        AccountConfig(
            account_id=account_id_for_key(key),
            api_keys=(ApiKeyConfig(key),),
            oauth_clients=tuple(clients) if i == 0 else (),
            custom_objects=not no_custom_objects,
        )
        for i, key in enumerate(api_key)
    )
    config = SandboxConfig(
        accounts=accounts,
        rate_scale=rate_scale,
        unlimited=unlimited,
        faults=FaultConfig(
            error_rates=_error_rates(error_rate),
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            hang_rate=hang_rate,
            drop_rate=drop_rate,
            drop_after_processing=drop_after_processing,
            operations=frozenset(fault_operations),
            outages=_outages(outage),
            seed=seed,
        ),
        access_token_ttl_s=token_ttl_s,
        ingest_delay_s=ingest_delay_s,
        publish_delay_s=publish_delay_s,
        job_latency_s=job_latency_s,
        job_latency_jitter_s=job_latency_jitter_s,
        base_url=base_url.rstrip("/") if base_url else None,
    )
    check_can_listen(host, port)
    from passbridge.cli.uvicorn_workers import serve

    def announce(bound: int) -> None:
        # The bound port, not --port: with --port 0 the system chose it.
        console.print(f"Klaviyo sandbox on http://{host}:{bound} (revision 2026-07-15 … 2026-10-15)")
        for account in accounts:
            console.print(
                f"  account {account.account_id}: 1 private key, {len(account.oauth_clients)} OAuth client(s)"
            )
        if not unlimited:
            console.print(f"  rate limits on, clock ×{rate_scale:g}")

    _freeze_survivors()
    # Bulk bodies are validated in a thread (klaviyo_sandbox.app): with the default 5 ms switch interval
    # every wake-up of the event loop could wait 5 ms for the interpreter lock while one runs.
    sys.setswitchinterval(0.001)
    serve(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            loop="uvloop",
            http="httptools",
        ),
        announce,
    )


#: How often the sandbox process moves what survived into the collector's permanent generation.
FREEZE_EVERY_S = 2.0


def _freeze_survivors() -> None:
    """Keep the garbage collector's pauses short as the sandbox's data grows.

    The sandbox keeps every profile, event and record in memory: after a 100,000-event drain, a full
    collection walked millions of objects and stopped the event loop for over a second, delaying every
    account's requests (Klaviyo's own latency does not depend on what other accounts send). Data that
    survived a couple of seconds is kept for the process's life anyway, so it is frozen (never walked again);
    collections then only see recent objects. Garbage without reference cycles is still freed at once.
    """
    import gc
    import threading
    import time

    def loop() -> None:
        while True:
            time.sleep(FREEZE_EVERY_S)
            gc.freeze()

    threading.Thread(target=loop, name="gc-freeze", daemon=True).start()
