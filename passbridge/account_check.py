"""``passbridge accounts check A``: an operator's troubleshooting questions, answered in plain words.

Are the Klaviyo credentials valid? Do they carry the scopes passbridge needs? Does Klaviyo accept our
``revision``? Is Custom Objects available and provisioned? Are the account's events flowing?

I/O and judgement are apart: :func:`probe_klaviyo` and :func:`read_flow` only gather facts (HTTP answers,
Redis counters); the ``judge_*`` functions are pure and turn facts into :class:`Finding` s.

Scopes of a private key cannot be listed, so they are probed: a read scope by a small GET, a write scope by
a POST with an empty body — Klaviyo checks permissions before it reads a body, so ``403`` means the scope is
missing and ``400`` means it is there, and nothing is ever written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountState, AccountStore
from passbridge.keys import WORKERS, account_keys
from passbridge.oauth import DEFAULT_SCOPES, token_url
from passbridge.settings import Settings
from worker.inspect import WORKER_ALIVE_MS
from worker.klaviyo.errors import AuthError, KlaviyoError
from worker.klaviyo.oauth import OAuthManager
from worker.pause import redis_now_ms

#: The oldest revision with Custom Objects GA (data sources, object types).
CUSTOM_OBJECTS_REVISION = "2026-07-15"
#: A ready serial nobody claimed for this long means no worker is draining the account.
STALL_AFTER_S = 60.0
WALLETPASS_TITLE = "WalletPass"


class Status(StrEnum):
    """How a finding reads at a glance."""

    ok = "ok"
    warn = "warn"
    fail = "fail"
    skip = "skip"


@dataclass(frozen=True)
class Finding:
    """One answer: which question, how it went, and the sentence an operator reads."""

    topic: str
    status: Status
    words: str

    def as_dict(self) -> dict[str, str]:
        return {"topic": self.topic, "status": self.status.value, "words": self.words}


@dataclass
class CheckReport:
    """Every finding for one account; ``ok`` when none failed."""

    account_id: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status != Status.fail for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "ok": self.ok,
            "findings": [f.as_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class Answer:
    """One HTTP answer from Klaviyo, reduced to what judging needs (no secrets: headers are dropped)."""

    status: int | None  # None: no answer (network error, timeout)
    code: str = ""
    detail: str = ""
    body: Any = None

    @property
    def revision_refused(self) -> bool:
        text = f"{self.code} {self.detail}".lower()
        return (
            (self.status == 400 and "revision" in text)
            or (self.status == 404 and "no valid revisions" in text)
            or self.status == 410  # what Klaviyo answers a retired revision
        )


#: Probes for scopes a private key may lack: (method, path, the scopes that endpoint needs).
SCOPE_PROBES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("GET", "/api/accounts", ("accounts:read",)),
    ("GET", "/api/profiles?page[size]=1", ("profiles:read",)),
    ("GET", "/api/profile-bulk-import-jobs?page[size]=1", ("lists:read", "profiles:read")),
    ("GET", "/api/data-sources", ("custom-objects:read",)),
    ("POST", "/api/events", ("events:write",)),
    ("POST", "/api/profile-import", ("profiles:write",)),
    ("POST", "/api/profile-bulk-import-jobs", ("lists:write", "profiles:write")),
    ("POST", "/api/data-source-record-create-jobs", ("custom-objects:write",)),
)


@dataclass
class KlaviyoFacts:
    """What Klaviyo answered to the check's requests."""

    auth: str  # "oauth" | "api_key"
    refresh_error: str = ""
    refresh_fatal: bool = True  # the grant is gone (reconnect), not a passing token-endpoint failure
    answers: dict[str, Answer] = field(default_factory=dict)  # by probe path
    granted_scopes: tuple[str, ...] | None = None  # known for OAuth grants
    object_types: Answer | None = None


@dataclass
class FlowFacts:
    """The account's queue, read from Redis."""

    depth: int
    ready: int
    stalled: int
    oldest_stalled_s: float | None
    leased: int
    expired_leases: int
    stats: dict[str, int]
    provisioning: dict[str, str] | None  # what `passbridge klaviyo setup` recorded (AccountKeys.klaviyo)
    #: Workers with a recent heartbeat (any account's): none alive is the one case "no worker" is certain.
    live_workers: int = 0
    #: The engine's pause of the account (``kind: reason``), if any.
    engine_pause: str | None = None
    #: Seconds left of the account's deferral after Klaviyo's 429s (no worker claims it meanwhile).
    throttled_s: float | None = None


def _answer(response: httpx.Response) -> Answer:
    try:
        body = response.json()
    except ValueError:
        body = None
    code = detail = ""
    if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
        first = body["errors"][0]
        if isinstance(first, dict):
            code, detail = str(first.get("code") or ""), str(first.get("detail") or "")
    return Answer(response.status_code, code, detail, body)


_UNSENDABLE = (
    "the stored Klaviyo credential cannot be sent in an HTTP header (it holds a control or non-ASCII "
    "character); set it again"
)


async def _call(http: httpx.AsyncClient, method: str, url: str, headers: dict[str, str]) -> Answer:
    try:
        if method == "GET":
            response = await http.get(url, headers=headers)
        else:
            # An empty document: invalid by every schema, so nothing is written (see module docstring).
            response = await http.post(url, headers=headers, json={})
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        # Never sent: a header holds a character HTTP forbids. httpx's message quotes the header it refused,
        # the Authorization one with the credential in it, so only what to do is said.
        return Answer(None, "bad-header", _UNSENDABLE)
    except httpx.HTTPError as exc:
        return Answer(None, type(exc).__name__, str(exc) or type(exc).__name__)
    return _answer(response)


def _refresh_failed(facts: KlaviyoFacts, exc: KlaviyoError) -> KlaviyoFacts:
    facts.refresh_error = str(exc)
    facts.refresh_fatal = isinstance(exc, AuthError)
    return facts


def auth_headers(account: Account, revision: str, access_token: str | None = None) -> dict[str, str]:
    """The Klaviyo headers for the account's credential (the one :meth:`Account.klaviyo_auth` names);
    ``access_token`` overrides the stored one (a token just refreshed)."""
    headers = {"revision": revision, "accept": "application/vnd.api+json"}
    oauth = account.secrets.klaviyo_oauth
    if access_token is not None:
        headers["authorization"] = f"Bearer {access_token}"
    elif account.klaviyo_auth() == "oauth" and oauth is not None and oauth.access_token is not None:
        headers["authorization"] = f"Bearer {oauth.access_token.get_secret_value()}"
    elif account.secrets.klaviyo_api_key is not None:
        headers["authorization"] = f"Klaviyo-API-Key {account.secrets.klaviyo_api_key.get_secret_value()}"
    return headers


async def probe_klaviyo(
    redis: Redis,
    store: AccountStore,
    settings: Settings,
    http: httpx.AsyncClient,
    account: Account,
    *,
    refresh: bool = True,
) -> KlaviyoFacts | None:
    """Ask Klaviyo what the check needs to know; ``None`` when the account has no credentials."""
    auth = account.klaviyo_auth()
    if auth is None:
        return None
    facts = KlaviyoFacts(auth=auth)
    base = account.klaviyo_base_url or settings.klaviyo_base_url.rstrip("/")
    token: str | None = None
    # OAuth tokens are refreshed exactly as the workers refresh them (one refresh at a time per account, under
    # AccountKeys.oauth_lock; a refused grant marks the account disconnected), on the account's own token
    # endpoint when it has a base URL of its own.
    manager = OAuthManager(redis, store, http, token_url(settings))
    if auth == "oauth" and refresh:
        try:
            token = await manager.access_token(account)
        except KlaviyoError as exc:
            return _refresh_failed(facts, exc)
    headers = auth_headers(account, settings.klaviyo_revision, token)
    first = await _call(http, "GET", base + "/api/accounts", headers)
    if first.status == 401 and token is not None:
        # As every Klaviyo client does: a 401 on an access token means refresh once, then retry.
        try:
            token = await manager.refresh(account, stale=token)
        except KlaviyoError as exc:
            return _refresh_failed(facts, exc)
        headers = auth_headers(account, settings.klaviyo_revision, token)
        first = await _call(http, "GET", base + "/api/accounts", headers)
    if auth == "oauth":
        oauth = (await store.get(account.account_id)).secrets.klaviyo_oauth
        facts.granted_scopes = tuple(oauth.scopes) if oauth else ()
    facts.answers["/api/accounts"] = first
    # An OAuth grant lists its scopes; only a private key needs every scope probed.
    probes = SCOPE_PROBES[1:] if facts.granted_scopes is None else SCOPE_PROBES[3:4]
    for method, path, _ in probes:
        facts.answers[path] = await _call(http, method, base + path, headers)
    if facts.answers["/api/data-sources"].status == 200:
        facts.object_types = await _call(http, "GET", base + "/api/object-types", headers)
    return facts


async def read_flow(redis: Redis, account_id: str, now: float | None = None) -> FlowFacts:
    """The account's queue counters from Redis, at ``now`` (epoch s; default Redis's clock, which the engine
    scores readiness, leases and heartbeats with)."""
    now_ms = await redis_now_ms(redis) if now is None else now * 1000
    keys = account_keys(account_id)
    stall_ms = now_ms - STALL_AFTER_S * 1000
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.depth)
        pipe.zcard(keys.ready)
        pipe.zcount(keys.ready, "-inf", stall_ms)
        pipe.zrange(keys.ready, 0, 0, withscores=True)
        pipe.zcard(keys.leased)
        pipe.zcount(keys.leased, "-inf", now_ms)
        pipe.hgetall(keys.stats)
        pipe.zcount(WORKERS, now_ms - WORKER_ALIVE_MS, "+inf")
        pipe.pttl(keys.deferred)
        pipe.hgetall(keys.paused)
        depth, ready, stalled, oldest, leased, expired, stats, alive, deferred, paused = await pipe.execute()
    # What `passbridge klaviyo setup` recorded (worker/setup.py: data_source_id, object_type_id, ...).
    raw = await redis.hgetall(keys.klaviyo)
    provisioning = {k.decode(): v.decode() for k, v in raw.items()} if raw else None
    oldest_stalled = (now_ms - oldest[0][1]) / 1000 if stalled and oldest else None
    return FlowFacts(
        depth=int(depth or 0),
        ready=int(ready),
        stalled=int(stalled),
        oldest_stalled_s=oldest_stalled,
        leased=int(leased),
        expired_leases=int(expired),
        stats={k.decode(): int(v) for k, v in stats.items() if v.isdigit()},
        provisioning=provisioning,
        live_workers=int(alive),
        engine_pause=(
            f"{paused.get(b'kind', b'auth').decode()}: {paused.get(b'reason', b'').decode() or 'no reason given'}"
            if paused
            else None
        ),
        throttled_s=int(deferred) / 1000 if int(deferred) > 0 else None,
    )


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word}" + ("es" if word.endswith("s") else "s")


def judge_credentials(account: Account, facts: KlaviyoFacts | None) -> Finding:
    """Do Klaviyo's answers show working credentials?"""
    if facts is None:
        connect = f"`passbridge accounts connect {account.account_id}`"
        if account.secrets.klaviyo_oauth is not None:
            return Finding(
                "credentials",
                Status.fail,
                f"an OAuth client is set but the merchant has not approved it yet: run {connect} and open "
                "the link it prints",
            )
        return Finding(
            "credentials",
            Status.fail,
            "no Klaviyo credentials: set a private key with `passbridge accounts update "
            f"{account.account_id} --klaviyo-api-key ...` or connect with {connect}",
        )
    kind = "the OAuth grant" if facts.auth == "oauth" else "the private API key"
    if facts.refresh_error and not facts.refresh_fatal:
        return Finding(
            "credentials",
            Status.fail,
            f"the access token could not be refreshed just now ({facts.refresh_error}); check again shortly",
        )
    if facts.refresh_error:
        return Finding(
            "credentials",
            Status.fail,
            f"{kind} no longer works ({facts.refresh_error}); connect again with "
            f"`passbridge accounts connect {account.account_id}`",
        )
    answer = facts.answers["/api/accounts"]
    if answer.status == 200:
        org = ""
        data = answer.body.get("data") if isinstance(answer.body, dict) else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            info = (data[0].get("attributes") or {}).get("contact_information") or {}
            name = info.get("organization_name") if isinstance(info, dict) else None
            org = f" (Klaviyo account {name or ''} {data[0].get('id', '')})".replace("  ", " ")
        return Finding("credentials", Status.ok, f"{kind} is valid{org}")
    if answer.status == 401:
        return Finding(
            "credentials",
            Status.fail,
            f"Klaviyo rejects {kind} ({answer.code or 'authentication_failed'}): it was revoked, expired or "
            "mistyped",
        )
    if answer.status == 403:
        return Finding("credentials", Status.ok, f"{kind} is valid (but lacks accounts:read, see scopes)")
    if answer.revision_refused:
        return Finding("credentials", Status.skip, "not known: Klaviyo refused the revision first")
    if answer.status is None:
        return Finding("credentials", Status.fail, f"cannot reach Klaviyo: {answer.detail}")
    if answer.status == 429:
        return Finding(
            "credentials", Status.warn, "Klaviyo is rate-limiting this account; check again shortly"
        )
    return Finding(
        "credentials", Status.fail, f"Klaviyo answered {answer.status} {answer.code}: {answer.detail}".strip()
    )


def judge_scopes(facts: KlaviyoFacts | None) -> Finding:
    """Are the scopes passbridge needs granted?"""
    if facts is None or facts.refresh_error or facts.answers["/api/accounts"].status in (None, 401):
        return Finding("scopes", Status.skip, "not known without working credentials")
    needed = set(DEFAULT_SCOPES)
    if facts.granted_scopes is not None:
        missing = sorted(needed - set(facts.granted_scopes))
        if missing:
            return Finding(
                "scopes",
                Status.fail,
                f"the OAuth grant lacks {', '.join(missing)}; connect again (it asks for every scope needed)",
            )
        return Finding("scopes", Status.ok, "the OAuth grant holds every scope passbridge needs")
    present: set[str] = set()
    refused: list[tuple[str, ...]] = []
    unknown: list[str] = []
    for _, path, scopes in SCOPE_PROBES:
        answer = facts.answers.get(path)
        if answer is None or answer.status is None or answer.revision_refused:
            unknown.append(path)
        elif answer.status == 403:
            refused.append(scopes)
        elif answer.status < 300 or answer.status in (400, 409, 422):
            # Past the permission check: served, or refused only for the (deliberately empty) body.
            present.update(scopes)
        else:
            unknown.append(path)
    # A 403 on an endpoint needing two scopes blames only those no other probe proved present.
    suspects = {s for scopes in refused for s in scopes}
    missing = sorted(suspects - present or suspects)
    if missing:
        return Finding(
            "scopes",
            Status.fail,
            f"the private key lacks {', '.join(missing)}: create a key with full access to "
            + ", ".join(DEFAULT_SCOPES),
        )
    if unknown:
        return Finding("scopes", Status.warn, f"could not probe {', '.join(unknown)}; check again")
    return Finding("scopes", Status.ok, "the private key has every scope passbridge needs")


def judge_revision(revision: str, facts: KlaviyoFacts | None) -> Finding:
    """Does Klaviyo accept the configured ``revision``, and is it new enough for Custom Objects?"""
    if revision < CUSTOM_OBJECTS_REVISION:
        return Finding(
            "revision",
            Status.fail,
            f"revision {revision} predates Custom Objects; set PASSBRIDGE_KLAVIYO_REVISION to "
            f"{CUSTOM_OBJECTS_REVISION} or later",
        )
    if facts is None or facts.refresh_error or not facts.answers:
        return Finding("revision", Status.skip, "not known without working credentials")
    refused = next((a for a in facts.answers.values() if a.revision_refused), None)
    if refused is not None:
        return Finding(
            "revision", Status.fail, f"Klaviyo refuses revision {revision}: {refused.detail or refused.code}"
        )
    if facts.answers["/api/accounts"].status in (None, 401):
        return Finding("revision", Status.skip, "not known without working credentials")
    return Finding("revision", Status.ok, f"Klaviyo accepts revision {revision}")


def judge_custom_objects(account_id: str, facts: KlaviyoFacts | None, flow: FlowFacts) -> Finding:
    """Is Custom Objects available to the account, and is the WalletPass set-up provisioned?"""
    setup = f"run `passbridge klaviyo setup --account {account_id}`"
    data_sources = facts.answers.get("/api/data-sources") if facts else None
    if facts is None or data_sources is None or data_sources.status in (None, 401):
        if flow.provisioning:
            return Finding(
                "custom objects",
                Status.warn,
                "provisioned earlier; not re-checked without working credentials",
            )
        return Finding("custom objects", Status.skip, "not known without working credentials")
    if data_sources.status == 403:
        return Finding("custom objects", Status.fail, "the credentials lack custom-objects:read (see scopes)")
    if data_sources.revision_refused:
        return Finding("custom objects", Status.fail, "the configured revision does not serve Custom Objects")
    if data_sources.status != 200:
        return Finding(
            "custom objects", Status.warn, f"Klaviyo answered {data_sources.status} to GET /api/data-sources"
        )
    # The provisioned object type by its id; before provisioning, any type titled WalletPass.
    wanted = (flow.provisioning or {}).get("object_type_id")
    walletpass = None
    types = facts.object_types
    if types is not None and types.status == 200 and isinstance(types.body, dict):
        for item in types.body.get("data") or []:
            attrs = item.get("attributes") if isinstance(item, dict) else None
            if not isinstance(attrs, dict):
                continue
            if (wanted and item.get("id") == wanted) or (
                not wanted and attrs.get("title") == WALLETPASS_TITLE
            ):
                walletpass = attrs
    if flow.provisioning is None:
        if walletpass is not None:
            return Finding(
                "custom objects",
                Status.warn,
                f"entitled (a {WALLETPASS_TITLE} object type exists) but not provisioned by passbridge — {setup}",
            )
        return Finding(
            "custom objects",
            Status.warn,
            f"the Custom Objects API answers, entitlement is confirmed when the object type is created; "
            f"not provisioned — {setup}",
        )
    if walletpass is None:
        return Finding(
            "custom objects",
            Status.fail,
            f"provisioned earlier, but Klaviyo no longer has that {WALLETPASS_TITLE} object type — {setup} to "
            "repair it",
        )
    status = walletpass.get("status")
    if status != "active":
        return Finding(
            "custom objects",
            Status.warn,
            f"entitled and provisioned, but the {WALLETPASS_TITLE} schema is {status}, not active — {setup}",
        )
    return Finding(
        "custom objects", Status.ok, f"entitled and provisioned ({WALLETPASS_TITLE} schema active)"
    )


def judge_flow(account: Account, flow: FlowFacts) -> Finding:
    """Are the account's events moving?"""
    skipped = flow.stats.get("skipped", 0)
    tail = f"; {_plural(skipped, 'event')} skipped so far (pass types not synced)" if skipped else ""
    if flow.depth == 0:
        return Finding("events", Status.ok, f"no events waiting{tail}")
    waiting = f"{_plural(flow.depth, 'event')} waiting"
    if account.state != AccountState.connected:
        reason = f" ({account.state_reason})" if account.state_reason else ""
        return Finding(
            "events",
            Status.warn,
            f"{waiting}, held because the account is {account.state.value}{reason}; they flow once it is "
            f"connected again{tail}",
        )
    if flow.engine_pause is not None:
        return Finding(
            "events",
            Status.warn,
            f"{waiting}, held because the engine paused the account ({flow.engine_pause}); they flow once it "
            f"resumes (`passbridge engine resume {account.account_id} --check`){tail}",
        )
    if flow.stalled:
        age = f", the oldest for {flow.oldest_stalled_s:.0f} s" if flow.oldest_stalled_s is not None else ""
        stuck = f"{waiting}; {_plural(flow.stalled, 'pass')} ready for over {STALL_AFTER_S:.0f} s{age}"
        if flow.throttled_s is not None:
            return Finding(
                "events",
                Status.warn,
                f"{stuck}: Klaviyo throttled the account (429), workers take its passes again in "
                f"{flow.throttled_s:.0f} s{tail}",
            )
        if not flow.live_workers:
            return Finding(
                "events",
                Status.fail,
                f"{stuck} and no worker alive (no heartbeat in {WORKER_ALIVE_MS // 1000} s) — are workers "
                f"running (`passbridge worker`)?{tail}",
            )
        alive = "1 worker is" if flow.live_workers == 1 else f"{flow.live_workers} workers are"
        return Finding(
            "events",
            Status.warn,
            f"{stuck} although {alive} alive: busy with other accounts' work (fair share) or held back by "
            f"Klaviyo's rate limits — `passbridge status` shows what each worker holds{tail}",
        )
    notes = []
    if flow.leased:
        notes.append(f"workers hold {_plural(flow.leased, 'pass')}")
    if flow.expired_leases:
        notes.append(
            f"{_plural(flow.expired_leases, 'lease')} expired (a worker stopped; another takes over)"
        )
    parked = flow.ready - flow.stalled
    if parked and not flow.leased:
        notes.append(f"{_plural(parked, 'pass')} waiting to be picked up or retried")
    status = Status.warn if flow.expired_leases else Status.ok
    words = f"{waiting}, flowing: {'; '.join(notes)}" if notes else waiting
    return Finding("events", status, words + tail)


def judge_state(account: Account) -> Finding:
    """Is the account allowed to sync?"""
    if account.state == AccountState.connected:
        return Finding("state", Status.ok, "connected: workers send its events to Klaviyo")
    reason = f" ({account.state_reason})" if account.state_reason else ""
    return Finding(
        "state",
        Status.warn,
        f"{account.state.value}{reason}: its events wait; `passbridge accounts update {account.account_id} "
        "--state connected` resumes it",
    )


async def check_account(
    redis: Redis,
    store: AccountStore,
    settings: Settings,
    http: httpx.AsyncClient,
    account_id: str,
    *,
    refresh: bool = True,
) -> CheckReport:
    """Every finding for ``account_id`` (raises ``AccountNotFound``)."""
    account = await store.get(account_id)
    facts = await probe_klaviyo(redis, store, settings, http, account, refresh=refresh)
    flow = await read_flow(redis, account_id)
    return CheckReport(
        account_id,
        [
            judge_state(account),
            judge_credentials(account, facts),
            judge_scopes(facts),
            judge_revision(settings.klaviyo_revision, facts),
            judge_custom_objects(account_id, facts, flow),
            judge_flow(account, flow),
        ],
    )
