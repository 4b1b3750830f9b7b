"""Assembles the ``passbridge`` command from one module per command group."""

from __future__ import annotations

import typer

from passbridge.cli import (
    accounts_cmd,
    apple_cmd,
    demo_cmd,
    dlq_cmd,
    engine_cmd,
    ingest_cmd,
    inspect_cmd,
    klaviyo_cmd,
    producer_cmd,
    redis_cmd,
    sandbox_cmd,
    up_cmd,
    worker_cmd,
)

app = typer.Typer(
    name="passbridge",
    help="Wallet-pass lifecycle events into Klaviyo.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(redis_cmd.app, name="redis")
app.add_typer(accounts_cmd.app, name="accounts")
app.add_typer(apple_cmd.app, name="apple")
app.add_typer(klaviyo_cmd.app, name="klaviyo")
app.command("producer")(producer_cmd.producer)
app.command("ingest")(ingest_cmd.ingest)
app.command("worker")(worker_cmd.worker)
app.command("sandbox")(sandbox_cmd.sandbox)
app.add_typer(dlq_cmd.app, name="dlq")
app.add_typer(engine_cmd.app, name="engine")
app.command("demo")(demo_cmd.demo)
app.command("up")(up_cmd.up)
app.command("status")(inspect_cmd.status)
app.command("serial")(inspect_cmd.serial)
app.command("event")(inspect_cmd.event)
app.command("report")(inspect_cmd.report)


def main() -> None:
    """Console-script entry point."""
    app()
