"""``passbridge accounts ...``: the account registry (minimal form; the accounts issue extends it)."""

from __future__ import annotations

from typing import Any

import typer
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountNotFound, AccountSecrets, AccountStore, hash_token, new_token
from passbridge.cli.common import emit_json, fail, redis_url, run, settings
from passbridge.crypto import load_cipher

app = typer.Typer(help="Merchant accounts: credentials, sources, Klaviyo connection.", no_args_is_help=True)


def _store(redis: Redis) -> AccountStore:
    s = settings()
    return AccountStore(
        redis, load_cipher(s.secret_key.get_secret_value() if s.secret_key else None, s.state_dir)
    )


def _pairs(values: list[str], option: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key or not val:
            fail(f"{option} takes KEY=VALUE, got {v!r}")
        out[key] = val
    return out


def masked(account: Account) -> dict[str, Any]:
    """The account as an operator may see it: every secret replaced by a mask."""
    doc = account.model_dump(mode="json", exclude={"secrets"})
    sec = account.secrets
    doc["secrets"] = {
        "webhook_secrets": [f"whsec_…{s.get_secret_value()[-4:]}" for s in sec.webhook_secrets],
        "apple_token_secret": "set" if sec.apple_token_secret else None,
        "klaviyo_api_key": "pk_…" + sec.klaviyo_api_key.get_secret_value()[-4:]
        if sec.klaviyo_api_key
        else None,
        "klaviyo_oauth": {
            "client_id": sec.klaviyo_oauth.client_id,
            "tokens": bool(sec.klaviyo_oauth.access_token),
        }
        if sec.klaviyo_oauth
        else None,
    }
    doc["ingest_token_sha256"] = doc["ingest_token_sha256"][:8] + "…" if doc["ingest_token_sha256"] else ""
    return doc


@app.command()
def add(
    account_id: str = typer.Argument(..., help="Account id (letters, digits, . _ -)."),
    name: str = typer.Option("", help="Display name."),
    ingest_token: str = typer.Option("", help="Ingest token (generated when empty)."),
    webhook_secret: list[str] = typer.Option(
        [], help="Standard Webhooks secret whsec_... (repeatable; one is generated when none is given)."
    ),
    apple_pass_type: list[str] = typer.Option([], help="passTypeIdentifier=PASS_TYPE (repeatable)."),
    google_class: list[str] = typer.Option([], help="classId=PASS_TYPE (repeatable)."),
    google_issuer_id: str = typer.Option("", help="Google Wallet issuer id."),
    google_keys_file: str = typer.Option("", help="Google root signing keys (JSON) for callbacks."),
    klaviyo_api_key: str = typer.Option(
        "", envvar="PASSBRIDGE_NEW_ACCOUNT_KLAVIYO_KEY", help="Klaviyo private API key (pk_...)."
    ),
    pass_url_template: str = typer.Option("", help="Pass URL template with {serial_number}."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create an account; prints the generated credentials once (they are stored encrypted or hashed)."""
    import base64
    import os

    token = ingest_token or new_token("pbi_")
    secrets = webhook_secret or ["whsec_" + base64.b64encode(os.urandom(32)).decode()]
    apple_secret = new_token("")
    try:
        account = Account(
            account_id=account_id,
            name=name,
            ingest_token_sha256=hash_token(token),
            apple_pass_types=_pairs(apple_pass_type, "--apple-pass-type"),
            google_classes=_pairs(google_class, "--google-class"),
            google_issuer_id=google_issuer_id or None,
            google_keys_file=google_keys_file or None,
            **({"pass_url_template": pass_url_template} if pass_url_template else {}),
            secrets=AccountSecrets.model_validate(
                {
                    "webhook_secrets": secrets,
                    "apple_token_secret": apple_secret,
                    "klaviyo_api_key": klaviyo_api_key or None,
                }
            ),
        )
    except ValueError as exc:
        fail(str(exc))

    async def go() -> None:
        redis = Redis.from_url(redis_url(settings()))
        try:
            store = _store(redis)
            try:
                await store.get(account_id)
                fail(f"account {account_id!r} exists")
            except AccountNotFound:
                pass
            await store.put(account)
        finally:
            await redis.aclose()

    run(go())
    created = {"account_id": account_id, "ingest_token": token, "webhook_secrets": secrets}
    if as_json:
        emit_json(created)
    else:
        typer.echo(f"created account {account_id}")
        typer.echo(f"ingest token (shown once): {token}")
        for s in secrets:
            typer.echo(f"webhook secret: {s}")


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every account with its state."""

    async def go() -> list[dict[str, Any]]:
        redis = Redis.from_url(redis_url(settings()))
        try:
            store = _store(redis)
            return [masked(await store.get(a)) for a in await store.list_ids()]
        finally:
            await redis.aclose()

    rows = run(go())
    if as_json:
        emit_json(rows)
    else:
        for r in rows:
            typer.echo(f"{r['account_id']}\t{r['state']}\t{r['name']}")


@app.command()
def show(account_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One account, secrets masked."""

    async def go() -> dict[str, Any]:
        redis = Redis.from_url(redis_url(settings()))
        try:
            return masked(await _store(redis).get(account_id))
        except AccountNotFound:
            fail(f"no account {account_id!r}")
        finally:
            await redis.aclose()

    emit_json(run(go()))
