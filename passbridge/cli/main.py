"""Assembles the ``passbridge`` command from one module per command group."""

from __future__ import annotations

import typer

from passbridge.cli import accounts_cmd, apple_cmd, ingest_cmd, producer_cmd, redis_cmd

app = typer.Typer(
    name="passbridge",
    help="Wallet-pass lifecycle events into Klaviyo.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(redis_cmd.app, name="redis")
app.add_typer(accounts_cmd.app, name="accounts")
app.add_typer(apple_cmd.app, name="apple")
app.command("producer")(producer_cmd.producer)
app.command("ingest")(ingest_cmd.ingest)


def main() -> None:
    """Console-script entry point."""
    app()
