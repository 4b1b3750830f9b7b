"""``passbridge klaviyo setup|status|ingestion-failures|scopes``: an account's Klaviyo side (Custom Objects
provisioning, and the WalletPass records Klaviyo could not ingest)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from passbridge.cli.common import emit_json, fail, plain, redis_url, run, settings

# Redis, the account store and the Klaviyo client are imported when a command runs: `--help` stays quick.
if TYPE_CHECKING:
    from redis.asyncio import Redis

    from passbridge.accounts import Account
    from worker.klaviyo.client import KlaviyoClient

T = TypeVar("T")


def _with_klaviyo(account: str, work: Callable[[KlaviyoClient, Redis, Account], Awaitable[T]]) -> T:
    """Run ``work`` with a Klaviyo client, Redis and the registered ``account`` (exit 1 if it is unknown)."""
    from redis.asyncio import Redis

    from passbridge.accounts import AccountNotFound, AccountStore
    from passbridge.crypto import load_cipher
    from worker.klaviyo.client import KlaviyoClient

    s = settings()

    async def go() -> T:
        redis = Redis.from_url(redis_url(s))
        try:
            store = AccountStore(
                redis, load_cipher(s.secret_key.get_secret_value() if s.secret_key else None, s.state_dir)
            )
            try:
                acct = await store.get(account)
            except AccountNotFound:
                fail(f"no account {account!r} (create it with `passbridge accounts add {account}`)")
            async with KlaviyoClient.from_settings(s, redis, store) as client:
                return await work(client, redis, acct)
        finally:
            await redis.aclose()

    return run(go())


app = typer.Typer(
    help="The Klaviyo side of an account: set-up and what passbridge needs.", no_args_is_help=True
)


@app.command()
def setup(
    account: str = typer.Option(..., "--account", "-a", help="The passbridge account id."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Provision the WalletPass custom object in the account's Klaviyo (safe to run again; repairs)."""
    from worker.setup import SetupError, provision

    async def work(client: KlaviyoClient, redis: Redis, acct: Account) -> dict[str, Any]:
        try:
            report = await provision(client, redis, acct)
        except SetupError as exc:
            fail(str(exc))
        return report.as_dict()

    doc = _with_klaviyo(account, work)
    if as_json:
        emit_json(doc)
        return
    for step in doc["steps"]:
        typer.echo(f"{step['step']:<24} {plain(step['outcome'])}")
    ids = doc["provisioned"]
    typer.echo(
        f"{'WalletPass ready' if not doc['changed'] else 'WalletPass provisioned'} for {account}: "
        f"data source {ids['data_source_id']}, object type {ids['object_type_id']}"
    )


@app.command()
def status(
    account: str = typer.Option(..., "--account", "-a", help="The passbridge account id."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The Klaviyo ids recorded by the last successful setup (exit 1 when the account is not set up)."""
    from dataclasses import asdict

    from redis.asyncio import Redis

    from worker.setup import load_provisioned

    s = settings()

    async def go() -> dict[str, Any] | None:
        redis = Redis.from_url(redis_url(s))
        try:
            found = await load_provisioned(redis, account)
            return asdict(found) if found else None
        finally:
            await redis.aclose()

    doc = run(go())
    if doc is None:
        if as_json:
            emit_json({"account_id": account, "provisioned": None})
        fail(
            f"account {account!r} is not set up in Klaviyo: run `passbridge klaviyo setup --account {account}`"
        )
    if as_json:
        emit_json({"account_id": account, "provisioned": doc})
    else:
        for key, value in doc.items():
            typer.echo(f"{key:<20} {plain(value)}")


@app.command("ingestion-failures")
def ingestion_failures(
    account: str = typer.Option(..., "--account", "-a", help="The passbridge account id."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """WalletPass records Klaviyo accepted (204) but could not ingest, newest first (its ingestion log).

    Record writes, single and bulk, are answered before Klaviyo validates them against the object schema: a
    bad record shows up only here. Exit 1 when there is any (so a cron can alert on it).
    """
    from dataclasses import asdict

    from worker.ingestion import ingestion_failures as read_failures
    from worker.klaviyo.errors import KlaviyoError

    async def work(client: KlaviyoClient, redis: Redis, acct: Account) -> list[dict[str, Any]]:
        try:
            found = await read_failures(client, redis, acct)
        except KlaviyoError as exc:
            fail(f"cannot read the ingestion log of {account!r}: {exc}")
        return [asdict(f) for f in found]

    docs = _with_klaviyo(account, work)
    if as_json:
        emit_json({"account_id": account, "failures": docs})
    elif not docs:
        typer.echo(f"no WalletPass ingestion failures for {account}")
    else:
        for doc in docs:
            why = "; ".join(
                f"{e.get('property')}: {e.get('message') or e.get('detail') or e}" for e in doc["errors"]
            )
            typer.echo(plain(f"{doc['timestamp']}  {doc['summary']}  {why}"))
    if docs:
        raise typer.Exit(1)


@app.command()
def scopes() -> None:
    """The OAuth scopes passbridge asks for: exactly those of the Klaviyo endpoints it calls."""
    from worker.klaviyo.endpoints import OAUTH_SCOPES

    typer.echo(" ".join(OAUTH_SCOPES))
