"""``passbridge demo``: the whole product on this machine, verified."""

from __future__ import annotations

from pathlib import Path

import typer

from passbridge.cli.common import console, emit_json, settings
from passbridge.demo.defaults import (
    DEMO_KLAVIYO_PASSES,
    DEMO_PASSES,
    DEMO_RATE_SCALE,
    DEMO_SAMPLE,
    DEMO_SETTLE_S,
)


def demo(
    passes: int = typer.Option(
        None,
        help=f"Passes to play, about four accepted events each (default {DEMO_PASSES} against the sandbox, "
        f"{DEMO_KLAVIYO_PASSES} against a real Klaviyo).",
    ),
    accounts: int = typer.Option(3, help="Merchant accounts."),
    rate_scale: float = typer.Option(
        None,
        help=f"Klaviyo's rate-limit clock runs this many times faster (default {DEMO_RATE_SCALE:g} against the "
        "sandbox, 1 against a real Klaviyo).",
    ),
    workers: int = typer.Option(2, help="Worker processes."),
    error_rate: float = typer.Option(0.02, help="Share of Klaviyo requests answered 500/502/503."),
    throttle_rate: float = typer.Option(0.01, help="Share of Klaviyo requests answered 429."),
    seed: int = typer.Option(7, help="Scenario seed."),
    sample: int = typer.Option(
        DEMO_SAMPLE, help="Passes read back through Klaviyo's API (real Klaviyo only)."
    ),
    settle: float = typer.Option(
        DEMO_SETTLE_S, help="Seconds a sampled pass may take to show up in Klaviyo (real Klaviyo only)."
    ),
    keep: bool = typer.Option(False, help="Keep the demo's state dir (logs, Redis data)."),
    state_dir: Path = typer.Option(
        None, help="Where the demo keeps its processes' state: a new or empty directory (removed at the end)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Start Redis, the Klaviyo sandbox, the producer and workers; play a day of events; verify Klaviyo.

    With PASSBRIDGE_KLAVIYO_BASE_URL set, no sandbox is started: the demo writes to that Klaviyo with the
    private key(s) in PASSBRIDGE_DEMO_KLAVIYO_API_KEYS and reads a sample of passes back through its API.
    """
    from passbridge.demo.run import DemoError, DemoOptions, run_demo, summary_table

    # The demo's own process talks through its progress bars and summary: like every operator command it logs
    # warnings only unless PASSBRIDGE_LOG_LEVEL is set (common.command_log_level). The stack's processes keep
    # logging to their files in the state dir.
    s = settings()
    real = "klaviyo_base_url" in s.model_fields_set  # set in the environment or .env, not the default
    keys = s.demo_klaviyo_api_keys.get_secret_value() if s.demo_klaviyo_api_keys else ""
    try:
        report = run_demo(
            DemoOptions(
                passes=passes or (DEMO_KLAVIYO_PASSES if real else DEMO_PASSES),
                accounts=accounts,
                rate_scale=rate_scale,
                workers=workers,
                error_rate=error_rate,
                throttle_rate=throttle_rate,
                seed=seed,
                keep=keep,
                state_dir=state_dir,
                quiet=as_json,
                klaviyo_base_url=s.klaviyo_base_url if real else None,
                klaviyo_api_keys=[k.strip() for k in keys.split(",") if k.strip()],
                sample=sample,
                settle_s=settle,
            )
        )
    except DemoError as exc:
        console.print(f"[red]passbridge demo: {exc}[/]")
        raise typer.Exit(2) from None
    if as_json:
        emit_json(report.as_dict())
    else:
        console.print(summary_table(report))
        v = report.verification
        for check in v.checks if v else []:
            if not check.ok:
                console.print(f"[red]✗[/] {check.name}: expected {check.expected}, got {check.got}")
        for line in (v.problems if v else [])[:10]:
            console.print(f"  {line}")
        for line in report.mismatched_answers[:10]:
            console.print(f"  answer: {line}")
    if not report.ok:
        raise typer.Exit(1)
