"""The declarative ``accounts.yaml``: accounts described in a file, applied at start (compose deployments).

Shape (every field of :class:`~passbridge.account_spec.AccountSpec` may appear)::

    accounts:
      acme:
        name: Acme Coffee
        ingest_token: ${ACME_INGEST_TOKEN}
        webhook_secrets: [${ACME_WEBHOOK_SECRET}]
        klaviyo_api_key: ${ACME_KLAVIYO_KEY}
        sync_pass_types: [ptk_0x216]

``${NAME}`` in any string is replaced by the environment variable ``NAME`` (an unset one is an error naming
the account and field), so the file itself can be committed without secrets. Applying is an upsert of the
fields each account lists; fields it does not list keep their stored values (OAuth tokens from ``accounts
connect`` survive every restart). The producer calls :func:`apply_accounts_file` at start when
``PASSBRIDGE_ACCOUNTS_FILE`` is set (workers only read the registry).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml
from pydantic import ValidationError
from redis.asyncio import Redis

from passbridge.account_spec import AccountSpec, build
from passbridge.accounts import ACCOUNT_ID, Account, AccountStore
from passbridge.crypto import cipher_from_settings
from passbridge.logging import redact_text
from passbridge.settings import Settings

log = structlog.get_logger(__name__)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class AccountsFileError(ValueError):
    """The file is unreadable or invalid; the message names the account and field."""


@dataclass
class ApplyReport:
    """What applying a set of specs did."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "warnings": self.warnings,
        }


def _interpolate(value: Any, env: Mapping[str, str], where: str, unset: list[str]) -> Any:
    """``value`` with every ``${NAME}`` replaced; each reference to an unset variable is added to ``unset``
    (named by account and field), so one run reports all of them."""
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                unset.append(f"{where}: environment variable {name} is not set")
                return match.group(0)
            return env[name]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}[{i}]", unset) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}.{k}", unset) for k, v in value.items()}
    return value


def _describe(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{prefix}{'.' + loc if loc else ''}: {msg}")
    return "; ".join(parts)


def parse_accounts(doc: Any, env: Mapping[str, str]) -> dict[str, AccountSpec]:
    """Validate a parsed accounts document into specs by account id; raises :class:`AccountsFileError`."""
    if not isinstance(doc, dict) or set(doc) - {"accounts"}:
        raise AccountsFileError("the file must be a mapping with one key, `accounts`")
    accounts = doc.get("accounts") or {}
    if not isinstance(accounts, dict):
        raise AccountsFileError("`accounts` must map account ids to their settings")
    specs: dict[str, AccountSpec] = {}
    # Every account is checked and every problem reported at once: a file is fixed in one round, not one
    # error per run.
    problems: list[str] = []
    for account_id, body in accounts.items():
        where = f"accounts.{account_id}"
        if not isinstance(account_id, str) or not ACCOUNT_ID.fullmatch(account_id):
            problems.append(f"{where}: an account id is 1-64 letters, digits, '.', '_' or '-'")
            continue
        if not isinstance(body, dict):
            problems.append(f"{where}: must be a mapping of settings")
            continue
        unset: list[str] = []
        resolved = _interpolate(body, env, where, unset)
        if unset:
            problems.extend(unset)  # validating a "${NAME}" left in place would only add noise
            continue
        try:
            specs[account_id] = AccountSpec.model_validate(resolved)
        except ValidationError as exc:
            problems.append(_describe(exc, where))
    if problems:
        raise AccountsFileError("; ".join(problems))
    return specs


def load_accounts_file(path: Path, env: Mapping[str, str] | None = None) -> dict[str, AccountSpec]:
    """Read and validate ``path``; ``${VAR}`` references resolve from ``env`` (default: the process's)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise AccountsFileError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AccountsFileError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    return parse_accounts(doc, os.environ if env is None else env)


#: A name PyYAML quotes in its problem text: whatever followed ``*``, ``!`` or ``!…!`` in the file (an undefined
#: alias, an unknown tag or tag handle) — a literal secret value written there, say.
_QUOTED_NAME = re.compile(r"\b(alias|tag|handle) '[^']*'")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's quote of the source line: that line may hold a literal key."""
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    # The problem text can quote a token from the file: not the names (a secret need not look like one, so
    # masking secret-shaped text alone let an OAuth client secret through), and nothing secret-shaped.
    return redact_text(_QUOTED_NAME.sub(r"\1 '…'", f"{problem}{where}"))


def _warnings(account: Account) -> list[str]:
    out = []
    who = f"account {account.account_id}"
    if not account.ingest_token_sha256:
        out.append(f"{who} has no ingest token: the events API refuses it")
    if not account.secrets.webhook_secrets:
        out.append(f"{who} has no webhook secret: signed webhooks are refused")
    if account.klaviyo_auth() is None:
        out.append(
            f"{who} has no Klaviyo credentials: set klaviyo_api_key or run `passbridge accounts connect`"
        )
    return out


async def apply_specs(
    store: AccountStore, specs: Mapping[str, AccountSpec], *, prune: bool = False
) -> ApplyReport:
    """Upsert each spec (atomically per account); with ``prune``, remove accounts the specs do not name."""
    # Build every account first so that one invalid account stops the whole file before anything is written.
    for account_id, spec in specs.items():
        try:
            build(account_id, spec, await store.find(account_id))
        except ValidationError as exc:
            raise AccountsFileError(_describe(exc, f"accounts.{account_id}")) from None  # never quotes input
        except ValueError as exc:
            raise AccountsFileError(f"accounts.{account_id}: {exc}") from None
    report = ApplyReport()
    for account_id, spec in specs.items():

        def change(
            current: Account | None, account_id: str = account_id, spec: AccountSpec = spec
        ) -> Account:
            return build(account_id, spec, current)

        before, after = await store.update(account_id, change)
        assert after is not None
        if before is None:
            report.created.append(account_id)
        elif before != after:
            report.updated.append(account_id)
        else:
            report.unchanged.append(account_id)
        report.warnings += _warnings(after)
    if prune:
        for account_id in await store.list_ids():
            if account_id not in specs and await store.remove(account_id):
                report.removed.append(account_id)
    return report


async def apply_accounts_file(
    redis: Redis, settings: Settings, path: Path | None = None, *, prune: bool = False
) -> ApplyReport | None:
    """Apply ``path`` (default ``PASSBRIDGE_ACCOUNTS_FILE``) to the registry; ``None`` when there is no file.

    The producer's lifespan calls this at start, and so should every other long-running entry point (the
    workers' ``on_startup``): a deployment then needs no separate set-up step. Invalid files raise
    :class:`AccountsFileError` so that a bad configuration stops the process instead of half-applying.
    """
    path = path or settings.accounts_file
    if path is None:
        return None
    specs = load_accounts_file(path)
    report = await apply_specs(AccountStore(redis, cipher_from_settings(settings)), specs, prune=prune)
    log.info(
        "accounts file applied",
        path=str(path),
        created=report.created,
        updated=report.updated,
        unchanged=len(report.unchanged),
        removed=report.removed,
    )
    for warning in report.warnings:
        log.warning("account incomplete", detail=warning)
    return report
