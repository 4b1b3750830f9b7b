"""Sandbox configuration: accounts (private keys, OAuth clients, entitlements), limits, faults, timings.

Plain dataclasses so tests build them inline; ``SandboxConfig.with_api_keys`` is what ``--api-key`` does.
Secrets (keys, client secrets) are excluded from ``repr`` so a logged config never leaks them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

#: Every scope the emulated operations ask for; a key or client without an explicit list gets all of them.
ALL_SCOPES: frozenset[str] = frozenset(
    {
        "accounts:read",
        "profiles:read",
        "profiles:write",
        "events:read",
        "events:write",
        "metrics:read",
        "lists:read",
        "lists:write",
        "custom-objects:read",
        "custom-objects:write",
    }
)


@dataclass(frozen=True)
class ApiKeyConfig:
    """One private API key (``pk_...``); ``scopes`` None means full access."""

    key: str = field(repr=False)
    scopes: frozenset[str] | None = None


@dataclass(frozen=True)
class OAuthClientConfig:
    """An OAuth app installed on an account.

    ``redirect_uris`` empty allows any redirect URI; ``approve`` False makes the authorize endpoint deny (as a
    user clicking "Deny" would); ``scopes`` caps what the app may be granted.
    """

    client_id: str
    client_secret: str = field(repr=False)
    redirect_uris: tuple[str, ...] = ()
    scopes: frozenset[str] = ALL_SCOPES
    approve: bool = True


@dataclass(frozen=True)
class AccountConfig:
    """One sandbox Klaviyo account."""

    account_id: str
    api_keys: tuple[ApiKeyConfig, ...] = ()
    oauth_clients: tuple[OAuthClientConfig, ...] = ()
    custom_objects: bool = True
    name: str = "Sandbox account"
    timezone: str = "UTC"
    currency: str = "USD"


@dataclass(frozen=True)
class Outage:
    """A scheduled outage: from ``start_s`` after the app starts (or after it is scheduled through the control
    API) for ``duration_s`` seconds every /api request answers ``status`` (0 drops the connection instead)."""

    start_s: float
    duration_s: float
    status: int = 503


#: The ways a profile bulk-import job can word its import errors (``FaultConfig.import_error_shape``).
IMPORT_ERROR_SHAPES = ("absolute", "relative", "unnamed")


@dataclass(frozen=True)
class FaultConfig:
    """Injected failures. Rates are probabilities per /api request (drawn in this order, at most one fires).

    ``latency_ms`` is added to every /api request, plus a uniform random 0..``jitter_ms``. A hung request never
    answers until the client gives up (or ``hang_s`` passes). A dropped request closes the connection without
    a response; with ``drop_after_processing`` the request is applied first (the answer is lost, not the
    write). ``operations`` limits faults to those operation ids (empty = all).

    ``reject_external_ids`` refuses, deterministically, every profile write, metric event and data-source
    record of those identities the way Klaviyo refuses a bad item (a 400 ``invalid`` whose ``source.pointer``
    names the item; inside a profile bulk-import job an import error for that item while the rest of the job
    is imported). Profiles and metric events are matched by their profile's ``external_id``, records by their
    top-level ``external_id`` or ``serial_number``. ``reject_operations`` limits it to those operation ids
    (e.g. only the bulk endpoints, while other faults hit every operation); empty: ``operations`` applies.

    ``import_error_shape`` is how a profile bulk-import job words its import errors (the spec leaves both the
    pointer and ``original_payload`` open): ``absolute`` (default) points into the job body
    (``/data/attributes/profiles/data/<i>/...``) with the whole resource object as ``original_payload``;
    ``relative`` points into the single profile (``/data/attributes/...``) with only its attributes as
    ``original_payload``; ``unnamed`` has the relative pointer and no ``original_payload``, so nothing in the
    error names its item.

    ``retired_revisions`` maps a served revision to how every /api request sent with it is answered, as Klaviyo
    answers once it stops serving a revision: ``410`` (retired) or ``404`` ("No valid revisions found for
    method"). Checked after authentication, like the revision itself.
    """

    error_rates: tuple[tuple[int, float], ...] = ()
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 300.0
    drop_rate: float = 0.0
    drop_after_processing: bool = False
    operations: frozenset[str] = frozenset()
    outages: tuple[Outage, ...] = ()
    seed: int | None = None
    reject_external_ids: frozenset[str] = frozenset()
    reject_operations: frozenset[str] = frozenset()
    import_error_shape: str = "absolute"
    retired_revisions: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.import_error_shape not in IMPORT_ERROR_SHAPES:
            raise ValueError(f"import_error_shape must be one of {', '.join(IMPORT_ERROR_SHAPES)}")
        if any(status not in (404, 410) for _, status in self.retired_revisions):
            raise ValueError("retired_revisions answers 410 (retired) or 404 (no valid revisions)")

    @property
    def active(self) -> bool:
        """Whether any fault can fire (the hot path skips the fault machinery otherwise)."""
        return bool(
            self.error_rates
            or self.latency_ms
            or self.jitter_ms
            or self.hang_rate
            or self.drop_rate
            or self.outages
        )


@dataclass(frozen=True)
class SandboxConfig:
    """Everything the sandbox app needs.

    ``rate_scale`` F runs Klaviyo's rate-limit clock F times faster (windows of 1/F s and 60/F s, the same
    counts, Retry-After divided by F); ``unlimited`` turns rate limits off. ``ingest_delay_s`` is how long
    data-source records wait before they are processed (Klaviyo ingests them asynchronously);
    ``job_step_s`` is how long a profile bulk-import job stays queued and then processing (wall seconds, each);
    ``job_latency_s`` (plus a uniform random 0..``job_latency_jitter_s``) is how much longer each job takes, in
    Klaviyo seconds: divided by ``rate_scale`` like the rate-limit clock, half of it queued and half processing
    (Klaviyo promises no completion time; tens of seconds to minutes are plausible);
    ``publish_delay_s`` is how long a schema published with ``PATCH status: active`` reads ``publishing``
    before it is active (0: active at once). ``relationship_linkage_meta`` False leaves ``meta`` out of the items
    of ``GET .../relationships/profile-object-schemas`` (the spec's ``{type, id}``; a third party observed
    ``meta.relationship_id`` there): the id is then only in ``GET /api/object-schemas/{id}?include=...``.
    """

    accounts: tuple[AccountConfig, ...] = ()
    rate_scale: float = 1.0
    unlimited: bool = False
    faults: FaultConfig = FaultConfig()
    access_token_ttl_s: float = 3600.0
    rotate_refresh_tokens: bool = False
    ingest_delay_s: float = 0.05
    job_step_s: float = 0.05
    job_latency_s: float = 0.0
    job_latency_jitter_s: float = 0.0
    publish_delay_s: float = 0.0
    relationship_linkage_meta: bool = True
    request_log_size: int = 10_000
    base_url: str | None = None

    def __post_init__(self) -> None:
        if self.job_latency_s < 0 or self.job_latency_jitter_s < 0:
            raise ValueError("job_latency_s and job_latency_jitter_s must be >= 0")

    def job_latency(self, draw: float) -> float:
        """The extra wall seconds one profile bulk-import job takes (``draw``: uniform in 0..1)."""
        return (self.job_latency_s + draw * self.job_latency_jitter_s) / self.rate_scale

    @classmethod
    def with_api_keys(cls, *keys: str, custom_objects: bool = True, **options: Any) -> SandboxConfig:
        """One account per key, each with exactly that private key and full access (what ``--api-key`` does);
        ``options`` are the other ``SandboxConfig`` fields (``rate_scale=60``, ``unlimited=True``, ...).

        Account ids are derived from the key (stable across restarts), never the key itself."""
        accounts = tuple(
            AccountConfig(
                account_id=account_id_for_key(key),
                api_keys=(ApiKeyConfig(key),),
                custom_objects=custom_objects,
            )
            for key in keys
        )
        return cls(accounts=accounts, **options)


def account_id_for_key(key: str) -> str:
    """A 6-character account id derived from a key (Klaviyo account ids are 6 characters)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    return "S" + digest[:5].upper()
