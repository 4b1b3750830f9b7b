"""What an operator declares about an account — from the CLI or ``accounts.yaml`` — and how it is applied.

:class:`AccountSpec` is the one input shape both front ends share; :func:`build` (pure) merges a spec into
the stored account. Only the fields a spec *sets* change the account, so an ``accounts.yaml`` that names a
few fields leaves the rest (OAuth tokens won through ``accounts connect``, a state set by workers) alone. A
field set to ``null`` clears it (back to its default).

The override models here are the contract with the workers: ``Account.rate_limit_overrides`` holds
``{endpoint: RateLimitOverride}`` and ``Account.retry_policy`` holds :class:`RetryOverrides`, both as plain
JSON with unset keys left out.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from passbridge.accounts import (
    DEFAULT_PASS_URL_TEMPLATE,
    Account,
    AccountSecrets,
    AccountState,
    OAuthTokens,
    check_klaviyo_base_url,
    hash_token,
)

#: Klaviyo operations whose limits an account may override (``*`` = all of them), by Klaviyo's operationId —
#: the name the workers' rate limiter gives each bucket (``worker/klaviyo/endpoints.py``).
RATE_LIMITED_ENDPOINTS = frozenset(
    {
        "*",
        "create_event",  # POST /api/events
        "bulk_create_events",  # POST /api/event-bulk-create-jobs
        "create_or_update_profile",  # POST /api/profile-import
        "bulk_import_profiles",  # POST /api/profile-bulk-import-jobs
        "create_data_source_record",  # POST /api/data-source-record-create-jobs
        "bulk_create_data_source_records",  # POST /api/data-source-record-bulk-create-jobs
    }
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RateLimitOverride(BaseModel):
    """Lower (or, for a raised Klaviyo quota, higher) limits for one endpoint of one account."""

    model_config = ConfigDict(extra="forbid")

    #: Requests per second (Klaviyo's burst window).
    burst: int | None = Field(default=None, gt=0)
    #: Requests per minute (Klaviyo's steady window).
    steady: int | None = Field(default=None, gt=0)
    #: Use only this share of Klaviyo's tier, e.g. 0.5 when another integration spends the other half.
    fraction: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _something(self) -> RateLimitOverride:
        if self.burst is None and self.steady is None and self.fraction is None:
            raise ValueError("set at least one of burst, steady, fraction")
        return self


class RetryOverrides(BaseModel):
    """An account's departures from the default retry policy."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    base_delay_s: float | None = Field(default=None, gt=0)
    max_delay_s: float | None = Field(default=None, gt=0)
    #: An event older than this (since it was received) goes to the DLQ instead of another attempt.
    max_age_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> RetryOverrides:
        if self.base_delay_s and self.max_delay_s and self.base_delay_s > self.max_delay_s:
            raise ValueError("base_delay_s must not exceed max_delay_s")
        return self


def check_webhook_secret(value: str) -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of at least 16 random bytes."""
    if not value.startswith("whsec_"):
        raise ValueError("a webhook secret starts with whsec_")
    body = value.removeprefix("whsec_")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(raw) < 16:
        raise ValueError("a webhook secret must hold at least 16 bytes (24 or more recommended)")
    return value


#: What an HTTP header value can carry as one token: visible ASCII.
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")


def _no_blank(value: SecretStr | None, what: str) -> SecretStr | None:
    if value is not None and (
        not value.get_secret_value() or value.get_secret_value() != value.get_secret_value().strip()
    ):
        raise ValueError(f"{what} must be non-empty with no surrounding whitespace")
    return value


class AccountSpec(BaseModel):
    """The operator's declaration of an account; unset fields keep their stored values."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    #: Stored only as its SHA-256.
    ingest_token: SecretStr | None = None
    ingest_token_sha256: str | None = None
    #: Every active secret; several while senders rotate.
    webhook_secrets: list[SecretStr] | None = None
    apple_token_secret: SecretStr | None = None
    apple_pass_types: dict[str, str] | None = None
    google_issuer_id: str | None = None
    google_keys_file: str | None = None
    google_classes: dict[str, str] | None = None
    google_serial_from: Literal["suffix", "object_id"] | None = None
    pass_url_template: str | None = None
    #: Pass types (templates) to sync; empty or null = all.
    sync_pass_types: list[str] | None = None
    klaviyo_api_key: SecretStr | None = None
    klaviyo_oauth_client_id: str | None = None
    klaviyo_oauth_client_secret: SecretStr | None = None
    #: This account's Klaviyo (API and OAuth token endpoint) instead of ``PASSBRIDGE_KLAVIYO_BASE_URL``;
    #: null = the global one.
    klaviyo_base_url: str | None = None
    rate_limits: dict[str, RateLimitOverride] | None = None
    retry: RetryOverrides | None = None
    state: AccountState | None = None
    state_reason: str | None = None

    @field_validator("ingest_token", "apple_token_secret", "klaviyo_oauth_client_secret")
    @classmethod
    def _secret_present(cls, value: SecretStr | None) -> SecretStr | None:
        return _no_blank(value, "the secret")

    @field_validator("klaviyo_api_key")
    @classmethod
    def _api_key(cls, value: SecretStr | None) -> SecretStr | None:
        value = _no_blank(value, "the Klaviyo private API key")
        # It is sent as an HTTP header: a control, blank or non-ASCII character inside (a paste that broke
        # the line) could never reach Klaviyo; workers would retry it as a network error.
        if value is not None and not _HEADER_TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError(
                "the Klaviyo private API key must be printable ASCII with no blank inside (Klaviyo's keys are "
                "pk_ and hex digits)"
            )
        return value

    @field_validator("ingest_token_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.match(value):
            raise ValueError("must be 64 lower-case hex digits (the SHA-256 of the token)")
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _webhooks(cls, value: list[SecretStr] | None) -> list[SecretStr] | None:
        if value is None:
            return None
        for secret in value:
            check_webhook_secret(secret.get_secret_value())
        if len({s.get_secret_value() for s in value}) != len(value):
            raise ValueError("the same webhook secret is listed twice")
        return value

    @field_validator("pass_url_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        if "{serial_number}" not in value:
            raise ValueError("must contain {serial_number}")
        try:
            value.format(serial_number="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError("may use no placeholder but {serial_number}") from None
        return value

    @field_validator("klaviyo_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        return None if value is None else check_klaviyo_base_url(value)

    @field_validator("rate_limits")
    @classmethod
    def _endpoints(cls, value: dict[str, RateLimitOverride] | None) -> dict[str, RateLimitOverride] | None:
        for endpoint in value or {}:
            if endpoint not in RATE_LIMITED_ENDPOINTS:
                raise ValueError(
                    f"unknown endpoint {endpoint!r}; one of {', '.join(sorted(RATE_LIMITED_ENDPOINTS))}"
                )
        return value

    @model_validator(mode="after")
    def _one_token_form(self) -> AccountSpec:
        if "ingest_token" in self.model_fields_set and "ingest_token_sha256" in self.model_fields_set:
            raise ValueError("give ingest_token or ingest_token_sha256, not both")
        if (
            self.klaviyo_oauth_client_secret is not None
            and "klaviyo_oauth_client_id" not in self.model_fields_set
        ):
            raise ValueError("klaviyo_oauth_client_secret needs klaviyo_oauth_client_id")
        return self


#: Spec fields copied onto the account as they are (``None`` → the account's default).
_PLAIN: dict[str, Any] = {
    "name": "",
    "apple_pass_types": {},
    "google_issuer_id": None,
    "google_keys_file": None,
    "google_classes": {},
    "google_serial_from": "suffix",
    "pass_url_template": DEFAULT_PASS_URL_TEMPLATE,
    "sync_pass_types": [],
    "state_reason": "",
    "klaviyo_base_url": None,
}


def _oauth(current: OAuthTokens | None, spec: AccountSpec) -> OAuthTokens | None:
    client_id = spec.klaviyo_oauth_client_id
    if client_id is None:
        return None
    if current is not None and current.client_id == client_id:
        # Same client: keep the grant's tokens, take a new client secret if one is given.
        if spec.klaviyo_oauth_client_secret is None:
            return current
        return current.model_copy(update={"client_secret": spec.klaviyo_oauth_client_secret})
    if spec.klaviyo_oauth_client_secret is None:
        raise ValueError("a new klaviyo_oauth_client_id needs its klaviyo_oauth_client_secret")
    # A different client: tokens of the old grant do not belong to it.
    return OAuthTokens(client_id=client_id, client_secret=spec.klaviyo_oauth_client_secret)


def build(account_id: str, spec: AccountSpec, existing: Account | None = None) -> Account:
    """The account after applying ``spec`` to ``existing`` (or to a new account). Pure.

    Raises ``ValueError`` (pydantic's ``ValidationError`` is one) naming the field when the result is not a
    valid account. When Klaviyo credentials change on a ``disconnected`` account, it becomes ``connected``
    again so that workers try the new credentials.
    """
    base = existing if existing is not None else Account(account_id=account_id)
    given = spec.model_fields_set
    doc: dict[str, Any] = base.model_dump(exclude={"secrets"})
    secrets: dict[str, Any] = dict(base.secrets)

    for name, default in _PLAIN.items():
        if name in given:
            value = getattr(spec, name)
            doc[name] = default if value is None else value
    if "ingest_token" in given:
        doc["ingest_token_sha256"] = (
            hash_token(spec.ingest_token.get_secret_value()) if spec.ingest_token else ""
        )
    if "ingest_token_sha256" in given:
        doc["ingest_token_sha256"] = spec.ingest_token_sha256 or ""
    if "rate_limits" in given:
        doc["rate_limit_overrides"] = {
            endpoint: o.model_dump(exclude_none=True) for endpoint, o in (spec.rate_limits or {}).items()
        }
    if "retry" in given:
        doc["retry_policy"] = spec.retry.model_dump(exclude_none=True) if spec.retry else {}
    if "webhook_secrets" in given:
        secrets["webhook_secrets"] = spec.webhook_secrets or []
    for name in ("apple_token_secret", "klaviyo_api_key"):
        if name in given:
            secrets[name] = getattr(spec, name)
    if "klaviyo_oauth_client_id" in given:
        secrets["klaviyo_oauth"] = _oauth(base.secrets.klaviyo_oauth, spec)

    credentials_changed = (
        secrets["klaviyo_api_key"] != base.secrets.klaviyo_api_key
        or secrets["klaviyo_oauth"] != base.secrets.klaviyo_oauth
    )
    if "state" in given and spec.state is not None:
        doc["state"] = spec.state
    elif credentials_changed and base.state == AccountState.disconnected:
        doc["state"], doc["state_reason"] = AccountState.connected, ""
    doc["account_id"] = account_id
    doc["secrets"] = AccountSecrets(**secrets)
    return Account.model_validate(doc)
