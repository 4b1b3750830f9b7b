"""``passbridge accounts ...``: the account registry.

``add | list | show | update | remove | check | connect | apply | rotate-key``; every command takes ``--json``.
Secrets given to ``add``/``update`` may be ``-`` to read them from stdin (kept out of shell history), and
generated credentials are printed exactly once. ``show`` and ``list`` mask every secret.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from passbridge.account_state import AccountState
from passbridge.cli.common import AnswerConsole, emit_json, fail, redis_url, run, safe, settings

# What a command needs is imported when it runs: `passbridge --help` should not pay for httpx, Redis or pydantic.
if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet
    from pydantic import SecretStr, ValidationError

    from passbridge.account_spec import AccountSpec
    from passbridge.accounts import Account, AccountStore
    from passbridge.accounts_file import ApplyReport

app = typer.Typer(help="Merchant accounts: credentials, sources, Klaviyo connection.", no_args_is_help=True)
out = AnswerConsole()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
AccountArg = Annotated[str, typer.Argument(help="Account id (letters, digits, . _ -).")]
NameOpt = Annotated[str | None, typer.Option(help="Display name.")]
IngestTokenOpt = Annotated[
    str | None, typer.Option(help="Ingest token to use (stored hashed; '-' reads stdin). Generated on add.")
]
AppleSecretOpt = Annotated[
    str | None,
    typer.Option(help="Apple pass authentication-token secret ('-' reads stdin). Generated on add."),
]
ApplePassTypeOpt = Annotated[
    list[str] | None,
    typer.Option(help="passTypeIdentifier=PASS_TYPE (repeatable; replaces the stored mapping)."),
]
GoogleIssuerOpt = Annotated[str | None, typer.Option(help="Google Wallet issuer id.")]
GoogleKeysOpt = Annotated[
    str | None, typer.Option(help="Google root signing keys file (JSON), for callbacks.")
]
GoogleClassOpt = Annotated[
    list[str] | None, typer.Option(help="classId=PASS_TYPE (repeatable; replaces the stored mapping).")
]
GoogleSerialOpt = Annotated[
    str | None, typer.Option(help="How a Google objectId becomes a serial: suffix | object_id.")
]
PassUrlOpt = Annotated[str | None, typer.Option(help="Pass URL template containing {serial_number}.")]
SyncOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--sync-pass-type",
        help="A pass type (template) to sync (repeatable; replaces the list). Others are acknowledged and "
        "counted as skipped. Default: all.",
    ),
]
KlaviyoKeyOpt = Annotated[str | None, typer.Option(help="Klaviyo private API key pk_... ('-' reads stdin).")]
ClientIdOpt = Annotated[
    str | None, typer.Option(help="Klaviyo OAuth client id (tokens come from `connect`).")
]
ClientSecretOpt = Annotated[str | None, typer.Option(help="Klaviyo OAuth client secret ('-' reads stdin).")]
KlaviyoBaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        help="This account's Klaviyo base URL (API and OAuth token endpoint), e.g. the sandbox for a trial "
        "merchant or an egress proxy. Default: PASSBRIDGE_KLAVIYO_BASE_URL."
    ),
]
RateLimitOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="ENDPOINT.FIELD=VALUE, e.g. create_event.burst=100 or '*.fraction=0.5' (repeatable; replaces the "
        "stored overrides). FIELD: burst (per s), steady (per min), fraction (of Klaviyo's tier)."
    ),
]
RetryOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="FIELD=VALUE: max_attempts, base_delay_s, max_delay_s, max_age_s (repeatable; replaces the "
        "stored overrides)."
    ),
]
WebhookSecretOpt = Annotated[
    list[str] | None,
    typer.Option("--webhook-secret", help="A Standard Webhooks secret whsec_... (repeatable)."),
]


# ---------------------------------------------------------------------------------------------------- helpers


@asynccontextmanager
async def _registry() -> AsyncIterator[AccountStore]:
    from redis.asyncio import Redis

    from passbridge.accounts import AccountStore
    from passbridge.crypto import SecretKeyError

    s = settings()
    redis = Redis.from_url(redis_url(s))
    try:
        yield AccountStore(redis, _cipher())
    except SecretKeyError as exc:
        fail(str(exc))
    finally:
        await redis.aclose()


def _cipher() -> MultiFernet:
    from passbridge.crypto import SecretKeyError, cipher_from_settings

    try:
        return cipher_from_settings(settings())
    except SecretKeyError as exc:
        fail(str(exc))


_stdin_used = False


@app.callback()
def _fresh_command() -> None:
    """Per-command state starts afresh (matters when commands run in one process, as in tests)."""
    global _stdin_used
    _stdin_used = False


def _secret(value: str | None, option: str) -> SecretStr | None:
    """A secret option's value; ``-`` reads one line from stdin (once per command)."""
    from pydantic import SecretStr

    global _stdin_used
    if value is None:
        return None
    if value == "-":
        if _stdin_used:
            fail(f"{option}: only one option may read its value from stdin")
        _stdin_used = True
        value = sys.stdin.readline().strip()
        if not value:
            fail(f"{option}: nothing was read from stdin")
    return SecretStr(value)


def _pairs(values: list[str] | None, option: str) -> dict[str, str] | None:
    if values is None:
        return None
    result = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key or not val:
            fail(f"{option} takes KEY=VALUE, got {v!r}")
        result[key] = val
    return result


def _rate_limits(values: list[str] | None) -> dict[str, dict[str, str]] | None:
    pairs = _pairs(values, "--rate-limit")
    if pairs is None:
        return None
    result: dict[str, dict[str, str]] = {}
    for key, val in pairs.items():
        endpoint, dot, name = key.rpartition(".")
        if not dot or not endpoint:
            fail(f"--rate-limit takes ENDPOINT.FIELD=VALUE, got {key}={val}")
        result.setdefault(endpoint, {})[name] = val
    return result


def _base_url(value: str | None) -> str | None:
    """``--klaviyo-base-url``; an empty one is refused with the way to do what it probably meant."""
    if value == "":
        fail(
            "--klaviyo-base-url: give a URL; --clear-klaviyo-base-url goes back to PASSBRIDGE_KLAVIYO_BASE_URL"
        )
    return value


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "account"
        parts.append(f"{loc}: {str(err['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def _spec(fields: dict[str, Any], clear: tuple[str, ...] = ()) -> AccountSpec:
    """A spec from the options that were given (``None`` = not given); ``clear`` names fields to reset."""
    from pydantic import ValidationError

    from passbridge.account_spec import AccountSpec

    given = {k: v for k, v in fields.items() if v is not None} | dict.fromkeys(clear)
    try:
        return AccountSpec.model_validate(given)
    except ValidationError as exc:
        fail(_validation_message(exc))


def _build(account_id: str, spec: AccountSpec, current: Account | None) -> Account:
    from pydantic import ValidationError

    from passbridge.account_spec import build

    try:
        return build(account_id, spec, current)
    except ValidationError as exc:
        fail(_validation_message(exc))
    except ValueError as exc:
        fail(str(exc))


def _missing(account_id: str) -> NoReturn:
    fail(f"no account {account_id!r}; `passbridge accounts list` shows the accounts")


def _print_once(shown: dict[str, Any]) -> None:
    for label, value in shown.items():
        for v in value if isinstance(value, list) else [value]:
            out.print(
                f"{label.replace('_', ' ')} (shown once): [bold]{v}[/]", highlight=False, soft_wrap=True
            )


def _overrides(doc: dict[str, Any]) -> str:
    """``{"create_event": {"burst": 100}}`` → ``create_event burst=100``; ``{"max_attempts": 5}`` → ``max_attempts=5``."""
    parts = []
    for key, value in doc.items():
        if isinstance(value, dict):
            parts.append(f"{key} " + " ".join(f"{k}={v}" for k, v in value.items()))
        else:
            parts.append(f"{key}={value}")
    return "; ".join(parts)


def _show_table(doc: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column(overflow="fold")
    sec = doc["secrets"]
    oauth = sec["klaviyo_oauth"]
    rows: list[tuple[str, Any]] = [
        ("account", doc["account_id"]),
        ("name", doc["name"]),
        ("state", doc["state"] + (f" ({doc['state_reason']})" if doc["state_reason"] else "")),
        ("klaviyo", doc["klaviyo_auth"] or "not connected"),
        ("klaviyo api key", sec["klaviyo_api_key"]),
        (
            "klaviyo oauth",
            None
            if oauth is None
            else f"client {oauth['client_id']}, "
            + ("tokens set" if oauth["refresh_token"] else "not approved yet")
            + (
                f", access token expires in {oauth['expires_in_s']} s"
                if oauth["expires_in_s"] is not None
                else ""
            ),
        ),
        ("oauth scopes", " ".join(oauth["scopes"]) if oauth else None),
        ("klaviyo base url", doc["klaviyo_base_url"]),
        ("ingest token", f"sha256 {doc['ingest_token_sha256']}" if doc["ingest_token_sha256"] else "none"),
        ("webhook secrets", ", ".join(sec["webhook_secrets"]) or "none"),
        ("apple token secret", sec["apple_token_secret"] or "none"),
        ("apple pass types", ", ".join(f"{k} → {v}" for k, v in doc["apple_pass_types"].items())),
        ("google issuer", doc["google_issuer_id"]),
        ("google keys file", doc["google_keys_file"]),
        ("google classes", ", ".join(f"{k} → {v}" for k, v in doc["google_classes"].items())),
        ("google serial from", doc["google_serial_from"]),
        ("pass url", doc["pass_url_template"]),
        ("synced pass types", ", ".join(doc["sync_pass_types"]) or "all"),
        ("rate limits", _overrides(doc["rate_limit_overrides"]) or "Klaviyo's tiers"),
        ("retry policy", _overrides(doc["retry_policy"]) or "default"),
    ]
    for label, value in rows:
        if value not in (None, "", {}):
            table.add_row(label, safe(value))
    out.print(table)


def _report(doc: dict[str, Any], as_json: bool, shown: dict[str, Any] | None = None) -> None:
    if as_json:
        emit_json({**doc, "shown_once": shown or {}})
        return
    _show_table(doc)
    if shown:
        _print_once(shown)


# ------------------------------------------------------------------------------------------------- commands


@app.command()
def add(
    account_id: AccountArg,
    name: NameOpt = None,
    ingest_token: IngestTokenOpt = None,
    webhook_secret: WebhookSecretOpt = None,
    apple_token_secret: AppleSecretOpt = None,
    apple_pass_type: ApplePassTypeOpt = None,
    google_issuer_id: GoogleIssuerOpt = None,
    google_keys_file: GoogleKeysOpt = None,
    google_class: GoogleClassOpt = None,
    google_serial_from: GoogleSerialOpt = None,
    pass_url_template: PassUrlOpt = None,
    sync_pass_type: SyncOpt = None,
    klaviyo_api_key: Annotated[
        str | None,
        typer.Option(help="Klaviyo private API key pk_... ('-' reads stdin)."),
    ] = None,
    klaviyo_oauth_client_id: ClientIdOpt = None,
    klaviyo_oauth_client_secret: ClientSecretOpt = None,
    klaviyo_base_url: KlaviyoBaseUrlOpt = None,
    rate_limit: RateLimitOpt = None,
    retry: RetryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an account. Credentials not given are generated and printed once (stored hashed or encrypted)."""
    from pydantic import SecretStr

    from passbridge.accounts import masked, new_token, new_webhook_secret

    shown: dict[str, Any] = {}
    token = _secret(ingest_token, "--ingest-token")
    if token is None:
        token = SecretStr(new_token("pbi_"))
        shown["ingest_token"] = token.get_secret_value()
    if not webhook_secret:
        webhook_secret = [new_webhook_secret()]
        shown["webhook_secret"] = webhook_secret
    apple = _secret(apple_token_secret, "--apple-token-secret")
    if apple is None:
        apple = SecretStr(new_token(""))
        shown["apple_token_secret"] = apple.get_secret_value()
    spec = _spec(
        {
            "name": name,
            "ingest_token": token,
            "webhook_secrets": webhook_secret,
            "apple_token_secret": apple,
            "apple_pass_types": _pairs(apple_pass_type, "--apple-pass-type"),
            "google_issuer_id": google_issuer_id,
            "google_keys_file": google_keys_file,
            "google_classes": _pairs(google_class, "--google-class"),
            "google_serial_from": google_serial_from,
            "pass_url_template": pass_url_template,
            "sync_pass_types": sync_pass_type,
            "klaviyo_api_key": _secret(klaviyo_api_key, "--klaviyo-api-key"),
            "klaviyo_oauth_client_id": klaviyo_oauth_client_id,
            "klaviyo_oauth_client_secret": _secret(
                klaviyo_oauth_client_secret, "--klaviyo-oauth-client-secret"
            ),
            "klaviyo_base_url": _base_url(klaviyo_base_url),
            "rate_limits": _rate_limits(rate_limit),
            "retry": _pairs(retry, "--retry"),
        }
    )
    account = _build(account_id, spec, None)

    async def go() -> Account:
        async with _registry() as store:
            before, after = await store.update(
                account_id, lambda current: account if current is None else None
            )
            if before is not None:
                fail(
                    f"account {account_id!r} exists; change it with `passbridge accounts update {account_id}`"
                )
            assert after is not None
            return after

    created = run(go())
    if not as_json:
        out.print(f"created account [bold]{account_id}[/]")
    _report(masked(created), as_json, shown)


@app.command()
def update(
    account_id: AccountArg,
    name: NameOpt = None,
    ingest_token: IngestTokenOpt = None,
    new_ingest_token: Annotated[
        bool,
        typer.Option("--new-ingest-token", help="Generate a new ingest token (the old one stops working)."),
    ] = False,
    add_webhook_secret: Annotated[
        list[str] | None, typer.Option(help="Add an active webhook secret whsec_... (repeatable).")
    ] = None,
    generate_webhook_secret: Annotated[
        bool,
        typer.Option("--new-webhook-secret", help="Generate and add a webhook secret (rotation step 1)."),
    ] = False,
    remove_webhook_secret: Annotated[
        list[str] | None,
        typer.Option(
            help="Remove a webhook secret: the secret, or its tail as `show` prints it (rotation step 2)."
        ),
    ] = None,
    apple_token_secret: AppleSecretOpt = None,
    apple_pass_type: ApplePassTypeOpt = None,
    google_issuer_id: GoogleIssuerOpt = None,
    google_keys_file: GoogleKeysOpt = None,
    google_class: GoogleClassOpt = None,
    google_serial_from: GoogleSerialOpt = None,
    pass_url_template: PassUrlOpt = None,
    sync_pass_type: SyncOpt = None,
    sync_all: Annotated[bool, typer.Option("--sync-all", help="Sync every pass type again.")] = False,
    klaviyo_api_key: KlaviyoKeyOpt = None,
    clear_klaviyo_api_key: Annotated[bool, typer.Option(help="Forget the private API key.")] = False,
    klaviyo_oauth_client_id: ClientIdOpt = None,
    klaviyo_oauth_client_secret: ClientSecretOpt = None,
    clear_oauth: Annotated[bool, typer.Option(help="Forget the OAuth client and its tokens.")] = False,
    klaviyo_base_url: KlaviyoBaseUrlOpt = None,
    clear_klaviyo_base_url: Annotated[
        bool, typer.Option(help="Use PASSBRIDGE_KLAVIYO_BASE_URL again for this account.")
    ] = False,
    rate_limit: RateLimitOpt = None,
    clear_rate_limits: Annotated[bool, typer.Option(help="Use Klaviyo's tiers again.")] = False,
    retry: RetryOpt = None,
    clear_retry: Annotated[bool, typer.Option(help="Use the default retry policy again.")] = False,
    state: Annotated[
        AccountState | None, typer.Option(help="connected (resume), paused, or disconnected.")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why the state changed (shown to operators).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change an account; only the options given change. Secrets generated here are printed once."""
    from pydantic import SecretStr

    from passbridge.accounts import masked, new_token, new_webhook_secret

    shown: dict[str, Any] = {}
    token = _secret(ingest_token, "--ingest-token")
    if new_ingest_token:
        if token is not None:
            fail("give --ingest-token or --new-ingest-token, not both")
        token = SecretStr(new_token("pbi_"))
        shown["ingest_token"] = token.get_secret_value()
    added = list(add_webhook_secret or [])
    if generate_webhook_secret:
        added.append(new_webhook_secret())
        shown["webhook_secret"] = added[-1]
    for flag, value, option in (
        (sync_all, sync_pass_type, "--sync-pass-type"),
        (clear_klaviyo_api_key, klaviyo_api_key, "--klaviyo-api-key"),
        (clear_oauth, klaviyo_oauth_client_id, "--klaviyo-oauth-client-id"),
        (clear_klaviyo_base_url, klaviyo_base_url, "--klaviyo-base-url"),
        (clear_rate_limits, rate_limit, "--rate-limit"),
        (clear_retry, retry, "--retry"),
    ):
        if flag and value is not None:
            fail(f"{option} contradicts the matching --clear/--sync-all option")
    fields: dict[str, Any] = {
        "name": name,
        "ingest_token": token,
        "apple_token_secret": _secret(apple_token_secret, "--apple-token-secret"),
        "apple_pass_types": _pairs(apple_pass_type, "--apple-pass-type"),
        "google_issuer_id": google_issuer_id,
        "google_keys_file": google_keys_file,
        "google_classes": _pairs(google_class, "--google-class"),
        "google_serial_from": google_serial_from,
        "pass_url_template": pass_url_template,
        "sync_pass_types": [] if sync_all else sync_pass_type,
        "klaviyo_api_key": _secret(klaviyo_api_key, "--klaviyo-api-key"),
        "klaviyo_oauth_client_id": klaviyo_oauth_client_id,
        "klaviyo_oauth_client_secret": _secret(klaviyo_oauth_client_secret, "--klaviyo-oauth-client-secret"),
        "klaviyo_base_url": _base_url(klaviyo_base_url),
        "rate_limits": {} if clear_rate_limits else _rate_limits(rate_limit),
        "retry": {} if clear_retry else _pairs(retry, "--retry"),
        "state": state,
        # A new state without a reason clears the old reason.
        "state_reason": "" if state is not None and reason is None else reason,
    }
    # Clearing is an explicit null in the spec (see AccountSpec).
    clear = (
        ("klaviyo_api_key",) * clear_klaviyo_api_key
        + ("klaviyo_oauth_client_id",) * clear_oauth
        + ("klaviyo_base_url",) * clear_klaviyo_base_url
    )
    spec = _spec(fields, clear)
    changes_secrets = bool(added or remove_webhook_secret)

    if not spec.model_fields_set and not changes_secrets:
        fail("nothing to change: give at least one option (see --help)")

    def change(current: Account | None) -> Account | None:
        if current is None:
            _missing(account_id)
        result = _build(account_id, spec, current)
        if changes_secrets:
            webhook = [s.get_secret_value() for s in result.secrets.webhook_secrets]
            for ref in remove_webhook_secret or []:
                tail = ref.split("…")[-1]  # `show` prints whsec_…abcd
                hits = [s for s in webhook if s == ref or (len(tail) >= 4 and s.endswith(tail))]
                if len(hits) != 1:
                    # ref may be the whole secret: echo only the tail `show` would print.
                    shown = ("whsec_" if ref.startswith("whsec_") else "") + "…" + tail[-4:]
                    fail(
                        f"--remove-webhook-secret {shown!r} matches {len(hits)} secrets; give more of its tail "
                        "or the whole secret"
                    )
                webhook.remove(hits[0])
            webhook += added
            result = _build(account_id, _spec({"webhook_secrets": webhook}), result)
        return result

    async def go() -> Account:
        async with _registry() as store:
            _, after = await store.update(account_id, change)
            assert after is not None
            return after

    account = run(go())
    if not as_json:
        out.print(f"updated account [bold]{account_id}[/]")
    _report(masked(account), as_json, shown)


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Every account: state, Klaviyo connection, synced pass types, events waiting and skipped."""
    from rich.table import Table

    from passbridge.accounts import masked
    from passbridge.keys import account_keys

    async def go() -> list[dict[str, Any]]:
        async with _registry() as store:
            rows = []
            for account_id in await store.list_ids():
                doc = masked(await store.get(account_id))
                keys = account_keys(account_id)
                depth, skipped = (
                    await store.redis.get(keys.depth),
                    await store.redis.hget(keys.stats, "skipped"),
                )
                doc["waiting"] = int(depth or 0)
                doc["skipped"] = int(skipped or 0)
                rows.append(doc)
            return rows

    rows = run(go())
    if as_json:
        emit_json(rows)
        return
    if not rows:
        out.print(
            "no accounts yet: `passbridge accounts add ID` or `passbridge accounts apply accounts.yaml`"
        )
        return
    table = Table("account", "name", "state", "klaviyo", "synced pass types", "waiting", "skipped")
    colors = {"connected": "green", "paused": "yellow", "disconnected": "red"}
    for r in rows:
        table.add_row(
            safe(r["account_id"]),
            safe(r["name"]),
            f"[{colors[r['state']]}]{r['state']}[/]",
            safe(r["klaviyo_auth"]) if r["klaviyo_auth"] else "[red]none[/]",
            safe(", ".join(r["sync_pass_types"]) or "all"),
            str(r["waiting"]),
            str(r["skipped"]),
        )
    out.print(table)


@app.command()
def show(account_id: AccountArg, as_json: JsonOpt = False) -> None:
    """One account, every secret masked."""
    from passbridge.accounts import AccountNotFound, masked

    async def go() -> dict[str, Any]:
        async with _registry() as store:
            try:
                return masked(await store.get(account_id))
            except AccountNotFound:
                _missing(account_id)

    doc = run(go())
    if as_json:
        emit_json(doc)
    else:
        _show_table(doc)


@app.command()
def remove(
    account_id: AccountArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    purge: Annotated[
        bool,
        typer.Option(
            help="Also delete the account's queued events, dead letters, pass states and counters (also for an "
            "account removed earlier without --purge)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove an account from the registry (its credentials stop working at once)."""
    from passbridge.keys import ACTIVE_ACCOUNTS, REMOVED_ACCOUNTS, account_keys

    if not yes:
        if not sys.stdin.isatty():
            fail("removing an account needs --yes when not run interactively")
        typer.confirm(f"remove account {account_id}{' and purge its queue' if purge else ''}?", abort=True)

    async def go() -> dict[str, Any]:
        async with _registry() as store:
            redis = store.redis
            waiting = int(await redis.get(account_keys(account_id).depth) or 0)
            removed = await store.remove(account_id)
            # An account removed earlier without --purge left its keys (state, DLQ, counters, ...) behind;
            # --purge must still reach them, or nothing could ever delete them.
            if not removed and not (purge and await redis.sismember(REMOVED_ACCOUNTS, account_id)):
                _missing(account_id)
            purged = 0
            if purge:
                # Out of the active set first: the activity sample (sample_series.lua, one script) then no
                # longer writes its series, whose hash a sample just after the scan below recreated.
                await redis.zrem(ACTIVE_ACCOUNTS, account_id)
                # Every key under the account's prefix: mailboxes, ready/leased sets, dedup, stats, OAuth.
                async for key in redis.scan_iter(match=account_keys(account_id).base + ":*", count=500):
                    purged += await redis.unlink(key)
                await redis.srem(REMOVED_ACCOUNTS, account_id)  # nothing of it is left to show
            return {"account_id": account_id, "removed": removed, "waiting": waiting, "purged_keys": purged}

    doc = run(go())
    if as_json:
        emit_json(doc)
        return
    if doc["removed"]:
        out.print(f"removed account [bold]{account_id}[/]")
    else:
        out.print(f"account [bold]{account_id}[/] was removed earlier; purging what it left behind")
    if purge:
        out.print(f"purged {doc['purged_keys']} keys ({doc['waiting']} queued events)")
    elif doc["waiting"]:
        out.print(
            f"{doc['waiting']} events are still queued; they are not sent without the account "
            f"(`passbridge accounts remove {account_id} --purge` deletes them)"
        )


@app.command()
def check(
    account_id: AccountArg,
    refresh: Annotated[
        bool, typer.Option(help="Refresh an expired OAuth access token before checking.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Answer in plain words: credentials valid? scopes? revision? Custom Objects? events flowing?

    Exits 1 when any answer is a failure.
    """
    import httpx
    from rich.table import Table

    from passbridge.account_check import Status, check_account
    from passbridge.accounts import AccountNotFound

    s = settings()

    async def go() -> dict[str, Any]:
        async with _registry() as store, httpx.AsyncClient(timeout=10) as http:
            try:
                report = await check_account(store.redis, store, s, http, account_id, refresh=refresh)
            except AccountNotFound:
                _missing(account_id)
            return report.as_dict()

    doc = run(go())
    if as_json:
        emit_json(doc)
    else:
        marks = {
            Status.ok: "[green]ok[/]",
            Status.warn: "[yellow]warn[/]",
            Status.fail: "[red]FAIL[/]",
            Status.skip: "[dim]–[/]",
        }
        table = Table("", "question", "answer", box=None)
        for f in doc["findings"]:
            table.add_row(marks[Status(f["status"])], safe(f["topic"]), safe(f["words"]))
        out.print(table)
        out.print(
            f"account {safe(account_id)}: " + ("[green]ready[/]" if doc["ok"] else "[red]needs attention[/]")
        )
    if not doc["ok"]:
        raise typer.Exit(1)


@app.command()
def connect(
    account_id: AccountArg,
    client_id: Annotated[
        str | None, typer.Option(help="Klaviyo OAuth app client id (default: the account's stored client).")
    ] = None,
    client_secret: Annotated[
        str | None,
        typer.Option(
            envvar="PASSBRIDGE_KLAVIYO_CLIENT_SECRET",
            help="Klaviyo OAuth app client secret ('-' reads stdin; default: the stored one).",
        ),
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(help="A scope to ask for (repeatable; default: every scope passbridge needs)."),
    ] = None,
    redirect_uri: Annotated[
        str | None,
        typer.Option(
            help="Where Klaviyo sends the merchant back (default: PASSBRIDGE_PUBLIC_URL + /oauth/klaviyo/callback)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the Klaviyo authorize URL for the merchant to open (OAuth code flow, PKCE S256).

    The producer's /oauth/klaviyo/callback then stores the tokens; the link works once, for 10 minutes.
    """
    from passbridge.accounts import AccountNotFound
    from passbridge.oauth import DEFAULT_SCOPES, start_connect

    s = settings()
    secret = _secret(client_secret, "--client-secret")

    async def go() -> dict[str, Any]:
        async with _registry() as store:
            try:
                account = await store.get(account_id)
            except AccountNotFound:
                _missing(account_id)
            stored = account.secrets.klaviyo_oauth
            cid = client_id or (stored.client_id if stored else None)
            csecret = secret or (stored.client_secret if stored and stored.client_id == cid else None)
            if not cid or csecret is None:
                fail("give --client-id and --client-secret of your Klaviyo OAuth app")
            started = await start_connect(
                store.redis,
                store.cipher,
                s,
                account_id,
                client_id=cid,
                client_secret=csecret,
                scopes=tuple(scope) if scope else DEFAULT_SCOPES,
                redirect_uri=redirect_uri,
                klaviyo_base_url=account.klaviyo_base_url,
            )
            return {
                "account_id": account_id,
                "authorize_url": started.authorize_url,
                "redirect_uri": started.redirect_uri,
                "scopes": list(started.scopes),
                "expires_in_s": started.expires_in_s,
            }

    doc = run(go())
    if as_json:
        emit_json(doc)
        return
    out.print(f"Open this link as the merchant and approve access for account [bold]{account_id}[/]:")
    out.print(doc["authorize_url"], soft_wrap=True, highlight=False)
    out.print(
        f"Klaviyo then returns to {doc['redirect_uri']} (the producer must be reachable there); the link "
        f"works once within {doc['expires_in_s'] // 60} minutes. `passbridge accounts check {account_id}` "
        "confirms the connection."
    )


@app.command()
def apply(
    file: Annotated[Path, typer.Argument(help="accounts.yaml", dir_okay=False)],
    prune: Annotated[bool, typer.Option(help="Remove registered accounts the file does not list.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply a declarative accounts.yaml (what PASSBRIDGE_ACCOUNTS_FILE does at start). ${VAR} reads env."""
    from passbridge.accounts_file import AccountsFileError, apply_specs, load_accounts_file

    try:
        specs = load_accounts_file(file)
    except AccountsFileError as exc:
        fail(str(exc))

    async def go() -> ApplyReport:
        async with _registry() as store:
            try:
                return await apply_specs(store, specs, prune=prune)
            except AccountsFileError as exc:
                fail(str(exc))

    report = run(go())
    if as_json:
        emit_json(report.as_dict())
        return
    for verb, ids in (("created", report.created), ("updated", report.updated), ("removed", report.removed)):
        for account_id in ids:
            out.print(f"{verb} {account_id}")
    if report.unchanged:
        out.print(f"unchanged: {', '.join(report.unchanged)}")
    for warning in report.warnings:
        out.print(f"[yellow]warning:[/] {safe(warning)}")


@app.command("rotate-key")
def rotate_key(as_json: JsonOpt = False) -> None:
    """Re-encrypt every account's secrets with the newest PASSBRIDGE_SECRET_KEY (the first one).

    Rotation: first give every producer and worker PASSBRIDGE_SECRET_KEY=NEW,OLD and restart them, then run
    this, then drop OLD everywhere and restart again.
    """
    from passbridge.crypto import SecretKeyError
    from passbridge.oauth import rotate_pending

    started = time.monotonic()

    async def go() -> dict[str, Any]:
        async with _registry() as store:
            try:
                accounts = await store.rotate_key()
                pending = await rotate_pending(store.redis, store.cipher, await store.list_ids())
            except SecretKeyError as exc:
                fail(str(exc))
            return {"accounts": accounts, "pending_connects": pending}

    doc = run(go())
    doc["seconds"] = round(time.monotonic() - started, 3)
    if as_json:
        emit_json(doc)
    else:
        out.print(
            f"re-encrypted the secrets of {doc['accounts']} accounts and {doc['pending_connects']} pending "
            "connects with the newest key; older keys can now be removed from PASSBRIDGE_SECRET_KEY (in every "
            "process, then restart them)"
        )
