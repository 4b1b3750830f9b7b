"""The Redis key layout: every key passbridge touches is named here and nowhere else.

See ``docs/architecture.md`` for what each key holds and which Lua script writes it. Keys are per account
(tenancy) except the registry index and the worker wake-up list.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "pb"


@dataclass(frozen=True, slots=True)
class AccountKeys:
    """Keys of one account's queue, state and registry entry."""

    account_id: str
    prefix: str = PREFIX

    @property
    def base(self) -> str:
        return f"{self.prefix}:a:{self.account_id}"

    def mailbox(self, serial: str) -> str:
        """Sorted set of one serial's pending events: score = occurred_at ms, member = seq(12 hex) + JSON."""
        return f"{self.base}:mb:{serial}"

    @property
    def mailbox_prefix(self) -> str:
        return f"{self.base}:mb:"

    @property
    def ready(self) -> str:
        """Sorted set: serials with pending events and not leased; score = not-before ms."""
        return f"{self.base}:ready"

    @property
    def leased(self) -> str:
        """Sorted set: serials currently leased by a worker; score = lease expiry ms."""
        return f"{self.base}:leased"

    @property
    def depth(self) -> str:
        """Integer: pending events of the account (mailbox entries), for backpressure and status."""
        return f"{self.base}:depth"

    @property
    def seq(self) -> str:
        """Integer: the arrival sequence, breaking occurred_at ties in arrival order."""
        return f"{self.base}:seq"

    @property
    def dedup_prefix(self) -> str:
        """Hash buckets ``...:dd:<bucket>``: event_id → serial, each expiring after the dedup window."""
        return f"{self.base}:dd:"

    @property
    def config(self) -> str:
        """Hash: the account's registry entry (secrets encrypted)."""
        return f"{self.base}:cfg"

    @property
    def apple_regs_prefix(self) -> str:
        """Hash per pass ``...:apple:<passTypeId>:<serial>``: deviceLibraryIdentifier → push token."""
        return f"{self.base}:apple:"

    def apple_regs(self, pass_type_id: str, serial: str) -> str:
        return f"{self.base}:apple:{pass_type_id}:{serial}"

    def apple_gen(self, pass_type_id: str, serial: str) -> str:
        """Integer: how many times the pass went from 0 to 1 registered devices (its install generation)."""
        return f"{self.base}:apple-gen:{pass_type_id}:{serial}"

    def apple_device(self, device_id: str, pass_type_id: str) -> str:
        """Sorted set: serials a device registered for one pass type; score = last update ms."""
        return f"{self.base}:apple-dev:{device_id}:{pass_type_id}"

    @property
    def stats(self) -> str:
        """Hash of counters (ingested by source, duplicates, rejected by reason, ...)."""
        return f"{self.base}:stats"

    # --- the engine (worker/): leases, applied state, retries, DLQ, history, pauses -------------------

    @property
    def lease_tokens(self) -> str:
        """Hash: leased serial → its lease token (fencing: only the holder may commit or release)."""
        return f"{self.base}:tok"

    @property
    def state(self) -> str:
        """Hash: serial → the last applied ``PassState`` (``PassState.to_json()``)."""
        return f"{self.base}:state"

    @property
    def retries(self) -> str:
        """Hash: event_id → JSON retry record (attempts, first attempt, errors) of a failing head event."""
        return f"{self.base}:retry"

    @property
    def dlq(self) -> str:
        """Sorted set: dead-lettered event ids; score = when dead-lettered (ms)."""
        return f"{self.base}:dlq"

    @property
    def dlq_entries(self) -> str:
        """Hash: event_id → JSON DLQ entry (the event, its mailbox member, reason, every attempt's error)."""
        return f"{self.base}:dlq:e"

    def history(self, serial: str) -> str:
        """List: the serial's event history (ingested, attempts, written, dead-lettered, replayed)."""
        return f"{self.base}:h:{serial}"

    @property
    def history_prefix(self) -> str:
        return f"{self.base}:h:"

    @property
    def paused(self) -> str:
        """Hash (present while the engine must not claim the account): since_ms, reason."""
        return f"{self.base}:paused"

    @property
    def deferred(self) -> str:
        """String with a TTL: while it exists the engine claims none of the account's serials (an endpoint
        every event needs is out of Klaviyo budget; claiming serials only to park them would churn)."""
        return f"{self.base}:defer"

    @property
    def pause_log(self) -> str:
        """List of closed pause intervals ``"<start_ms>:<end_ms>"`` (newest last), for max-age accounting."""
        return f"{self.base}:pauses"

    # --- Klaviyo side (worker/klaviyo, worker/setup.py) ---

    @property
    def klaviyo(self) -> str:
        """Hash: ids provisioned in the account's Klaviyo by ``passbridge klaviyo setup`` (data source, ...)."""
        return f"{self.base}:klaviyo"

    def rate_window(self, endpoint: str, window: str) -> str:
        """Sorted set: send times (µs) of requests to a Klaviyo endpoint in one sliding window (b|s)."""
        return f"{self.base}:rl:{endpoint}:{window}"

    def rate_pace(self, endpoint: str) -> str:
        """String: when (µs, Redis clock) the next paced backlog request to a Klaviyo endpoint is due (GCRA)."""
        return f"{self.base}:rl:{endpoint}:pace"

    def rate_pause(self, endpoint: str) -> str:
        """String: until when (µs, Redis clock) a 429 paused this Klaviyo endpoint for the account."""
        return f"{self.base}:rl:{endpoint}:pause"

    @property
    def profile_jobs(self) -> str:
        """Hash: serial → JSON ``{"job": id or "", "at": ms}`` while a profile bulk-import job carrying the
        serial may not be complete; later profile writes for the serial wait for it (``worker.import_jobs``)."""
        return f"{self.base}:pjobs"

    @property
    def oauth_lock(self) -> str:
        """Lock held by the one process refreshing the account's OAuth tokens."""
        return f"{self.base}:oauth-lock"

    @property
    def setup_lock(self) -> str:
        """Lock held while ``passbridge klaviyo setup`` provisions the account."""
        return f"{self.base}:setup-lock"

    # --- Accounts: OAuth connect (passbridge/oauth.py) ---

    def oauth_pending(self, nonce: str) -> str:
        """String (expiring): a started OAuth connect — PKCE verifier, redirect URI, client (secret encrypted)."""
        return f"{self.base}:oauth:{nonce}"

    @property
    def oauth_pending_pattern(self) -> str:
        """SCAN pattern matching the account's pending OAuth connects."""
        return f"{self.base}:oauth:*"

    # --- operations (worker/inspect.py, passbridge/metrics.py): activity series and report counters ---

    def series(self, hour: int) -> str:
        """Hash of one hour's 10-second activity buckets: ``"<bucket>:<name>"`` → count (or sampled value).

        ``bucket`` is epoch seconds // 10 and ``hour`` is bucket // 360; names are listed in
        ``passbridge.metrics.SERIES``. Written by every process's ``Recorder``; expires after a few hours.
        """
        return f"{self.base}:ts:{hour}"

    def report(self, day: str) -> str:
        """Hash of one UTC day's (``YYYYMMDD``, by ``occurred_at``) ingested events for ``passbridge report``:
        ``"<HH>|<kind>|<platform>|<pass type>"`` → count."""
        return f"{self.base}:rep:{day}"


ACCOUNTS_INDEX = f"{PREFIX}:accounts"
#: Set of account ids removed from the registry (``AccountStore.remove``): their DLQ and queued events stay,
#: and the operator tools keep listing such an account while it has any (``worker.inspect.account_ids``).
REMOVED_ACCOUNTS = f"{PREFIX}:accounts:removed"
#: A random value every long-running process sets if missing and remembers: gone or replaced later, Redis
#: lost its data (restarted without its AOF, a new server, a flush) (:class:`passbridge.outage.DataMarker`).
DATA_MARKER = f"{PREFIX}:data-marker"
#: List the producer pushes account ids onto so idle workers wake at once (BLPOP) instead of polling.
NOTIFY = f"{PREFIX}:notify"
#: Sorted set of account ids with queued work; score = when the engine should look at the account next
#: (its earliest due serial or lease expiry; after a claim, the claim time, which rotates it to the back).
ACTIVE_ACCOUNTS = f"{PREFIX}:active"
#: The express lane (``worker/express.py``): list of account ids whose enqueue left them with a small
#: backlog, popped by express lanes (BLPOP) so a small account's new event is claimed by a process that is
#: not busy with a big account's backlog. ``_enqueue_core.lua`` derives this name from ``NOTIFY``.
EXPRESS_NOTIFY = f"{NOTIFY}:x"
#: String set by live express lanes (``PX`` a few heartbeats): the backlog (pending events) up to which an
#: account counts as small. While it exists, enqueues of small accounts push ``EXPRESS_NOTIFY`` and the
#: other workers leave a small account's fresh serials to the express lanes for a grace period (claim.lua).
#: ``_enqueue_core.lua`` derives this name from ``NOTIFY``.
EXPRESS_ON = f"{NOTIFY}:x:on"
#: String set (``PX`` a few heartbeats) by a worker busy with a backlog (holding at least
#: ``PASSBRIDGE_WORKER_EXPRESS_BUSY_SERIALS``): only then do enqueues announce small accounts to the express
#: lanes and do the express lanes claim; while no worker is busy, the workers take everything themselves.
#: ``_enqueue_core.lua`` derives this name from ``NOTIFY``.
EXPRESS_BUSY = f"{NOTIFY}:x:busy"
#: String set (``PX`` a minute) by a worker working fresh events of an account with a small backlog: while it
#: exists, the other accounts' backlogs are paced over Klaviyo's minute window (``worker/bulk.py``,
#: ``RateLimiter.pace``), so a small account's events never meet a backlog's burst; with no small account
#: about, backlogs are not held.
PACE_BACKLOGS = f"{PREFIX}:pace"
#: What every account's keys start with (``AccountKeys.base`` = this + account id); claim.lua walks accounts.
ACCOUNT_BASE_PREFIX = f"{PREFIX}:a:"
#: Integer: lease counter; a lease token is ``<worker id>.<counter>`` so tokens never repeat.
LEASE_SEQ = f"{PREFIX}:lease-seq"
#: Sorted set: worker id → last heartbeat (ms); hash ``WORKERS_INFO``: worker id → JSON (host, pid, counts).
WORKERS = f"{PREFIX}:workers"
WORKERS_INFO = f"{PREFIX}:workers:info"
#: ``SET NX`` gate per 10-second bucket (``+ <bucket>``): one process samples every account's depth into the
#: activity series per bucket.
SERIES_SAMPLED = f"{PREFIX}:ts-sampled:"
#: Failed dashboard logins per client address (+ address): a counter that expires after the login window.
DASHBOARD_LOGIN_FAILURES = f"{PREFIX}:dashboard:login-failures:"
#: Dashboard sessions ended by logout (+ SHA-256 of the cookie value): a marker that expires with the session.
DASHBOARD_REVOKED = f"{PREFIX}:dashboard:revoked:"
#: arq's queue (cron sweeps); its health-check key is this + ``:health-check``.
ARQ_QUEUE = f"{PREFIX}:arq"


def account_keys(account_id: str) -> AccountKeys:
    """Keys for ``account_id``."""
    return AccountKeys(account_id)
