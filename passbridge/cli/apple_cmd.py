"""``passbridge apple token``: the ``authenticationToken`` a pass's ``pass.json`` must carry."""

from __future__ import annotations

import typer

from passbridge.cli.common import fail, redis_url, run, settings

app = typer.Typer(help="The Apple PassKit web service.", no_args_is_help=True)


@app.command()
def token(
    serial: str = typer.Argument(..., help="The pass's serialNumber."),
    account: str = typer.Option(..., "--account", "-a", help="Account id."),
    pass_type_id: str = typer.Option(..., "--pass-type-id", help="The pass's passTypeIdentifier."),
) -> None:
    """Print the pass's authenticationToken: HMAC-SHA256(account's Apple token secret, passTypeId/serial)."""
    from redis.asyncio import Redis

    from passbridge.accounts import AccountNotFound, AccountStore
    from passbridge.crypto import load_cipher
    from producer.sources.apple import pass_token

    s = settings()
    url = redis_url(s, start=False)

    async def go() -> str:
        redis = Redis.from_url(url)
        try:
            store = AccountStore(
                redis, load_cipher(s.secret_key.get_secret_value() if s.secret_key else None, s.state_dir)
            )
            try:
                acct = await store.get(account)
            except AccountNotFound:
                fail(f"no account {account!r}")
        finally:
            await redis.aclose()
        if pass_type_id not in acct.apple_pass_types:
            fail(
                f"{pass_type_id!r} is not one of the account's Apple pass types ({', '.join(acct.apple_pass_types)})"
            )
        if acct.secrets.apple_token_secret is None:
            fail(f"account {account!r} has no Apple token secret")
        return pass_token(acct.secrets.apple_token_secret.get_secret_value(), pass_type_id, serial)

    typer.echo(run(go()))
