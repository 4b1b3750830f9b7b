"""The sandbox's live state: accounts and their data, credentials, limiter, faults, request log, timers."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from klaviyo_sandbox.auth import Credentials
from klaviyo_sandbox.config import AccountConfig, SandboxConfig
from klaviyo_sandbox.faults import FaultInjector
from klaviyo_sandbox.operations import EMULATED_OPERATIONS
from klaviyo_sandbox.ratelimit import SlidingWindowLimiter, Tier
from klaviyo_sandbox.requestlog import RequestLog
from klaviyo_sandbox.routing import Router
from klaviyo_sandbox.schema.loader import SpecDocument, load_spec
from klaviyo_sandbox.store import AccountState

T = TypeVar("T")

#: Background work runs at most this long per event-loop turn (see ``Runtime.background``).
BACKGROUND_TURN_S = 0.002
#: Background work: does what it can until ``time.perf_counter()`` passes the deadline it is given (at least
#: one step), and returns whether more remains.
Work = Callable[[float], bool]

log = structlog.get_logger("klaviyo_sandbox")


def log_failure(event: str, exc: BaseException, **fields: object) -> None:
    """Log an unexpected exception with a plain traceback. Not ``log.exception``: rendered tracebacks may show
    frame locals, and the request pipeline's locals hold the caller's Authorization header."""
    log.error(
        event,
        error=f"{type(exc).__name__}: {exc}",
        traceback="".join(traceback.format_tb(exc.__traceback__)),
        **fields,
    )


@dataclass(frozen=True)
class OperationInfo:
    """What the hot path needs to know about an operation, precomputed."""

    operation_id: str
    since: str
    scopes: frozenset[str]
    tier: Tier
    has_body: bool
    has_query: bool


class Runtime:
    """Everything a request may touch. One per app."""

    def __init__(self, config: SandboxConfig, spec: SpecDocument | None = None) -> None:
        self.config = config
        self.spec = spec or load_spec()
        self.router = Router()
        self.ops: dict[str, OperationInfo] = {}
        for op_id, op in self.spec.operations.items():
            self.router.add(op["method"], op["path"], op_id)
            self.ops[op_id] = OperationInfo(
                operation_id=op_id,
                since=EMULATED_OPERATIONS[op_id],
                scopes=frozenset(op["scopes"]),
                tier=Tier.parse(op["ratelimit"]),
                has_body=op["request_body"] is not None,
                has_query=any(p["in"] == "query" for p in op["parameters"]),
            )
        self.credentials = Credentials(config.access_token_ttl_s, config.rotate_refresh_tokens)
        self.accounts: dict[str, AccountConfig] = {}
        self.states: dict[str, AccountState] = {}
        for account in config.accounts:
            self.add_account(account)
        self.limiter = SlidingWindowLimiter(config.rate_scale)
        self.unlimited = config.unlimited
        self.faults = FaultInjector(config.faults, time.monotonic())
        self.requests = RequestLog(config.request_log_size)
        self.pending = 0
        self._background: deque[tuple[int, Work]] = deque()
        self._background_scheduled = False
        self.generation = 0

    def add_account(self, account: AccountConfig) -> None:
        """Add (or replace) an account at runtime."""
        if account.account_id in self.accounts:
            raise ValueError(f"account {account.account_id} exists")
        self.accounts[account.account_id] = account
        self.states[account.account_id] = AccountState(account.account_id)
        self.credentials.add_account(account)

    def reset(self) -> None:
        """Forget all data, rate-limit history, the request log and runtime faults (accounts, keys and OAuth
        grants stay). Work scheduled before the reset is discarded."""
        self.generation += 1
        self.states = {acct: AccountState(acct) for acct in self.accounts}
        self.limiter.reset()
        self.requests.clear()
        self.faults.configure(self.config.faults, time.monotonic())
        self.pending = 0
        self._background.clear()

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the event loop after ``delay_s`` (skipped if a reset happens first)."""
        generation = self.generation
        self.pending += 1

        def run() -> None:
            if generation != self.generation:
                return
            self.pending -= 1
            try:
                fn()
            except Exception as exc:
                log_failure("sandbox.background_failed", exc)

        asyncio.get_running_loop().call_later(max(0.0, delay_s), run)

    def background(self, delay_s: float, work: Work) -> None:
        """Start ``work`` after ``delay_s`` as background processing (Klaviyo's jobs: profile imports, bulk
        events, record ingestion), in turns of at most ``BACKGROUND_TURN_S`` shared by every job in progress.

        ``work(deadline)`` does what it can until ``time.perf_counter()`` passes ``deadline`` (at least one
        step) and returns whether more remains. A request that arrives meanwhile waits for one turn at most,
        however many jobs are in progress: Klaviyo's latency does not depend on what other accounts send.
        """
        generation = self.generation
        self.pending += 1

        def start() -> None:
            if generation == self.generation:
                self._background.append((generation, work))
                self._schedule_background()

        asyncio.get_running_loop().call_later(max(0.0, delay_s), start)

    def later_in_turns(
        self,
        delay_s: float,
        items: Sequence[T],
        apply: Callable[[T], object],
        then: Callable[[], object] | None = None,
    ) -> None:
        """Apply ``apply`` to each of ``items`` in order, starting after ``delay_s``, as background work;
        ``then`` runs right after the last one (a job's completion)."""
        done = 0

        def work(deadline: float) -> bool:
            nonlocal done
            while done < len(items):
                apply(items[done])
                done += 1
                if time.perf_counter() >= deadline:
                    break
            if done < len(items):
                return True
            if then is not None:
                then()
            return False

        self.background(delay_s, work)

    def _schedule_background(self) -> None:
        if not self._background_scheduled:
            self._background_scheduled = True
            asyncio.get_running_loop().call_soon(self._background_turn)

    def _background_turn(self) -> None:
        # Round-robin: a job that used up a turn goes to the back of the line. The next turn comes after the
        # loop has looked at its sockets, so requests that arrived meanwhile are served in between.
        self._background_scheduled = False
        deadline = time.perf_counter() + BACKGROUND_TURN_S
        while self._background and time.perf_counter() < deadline:
            generation, work = self._background.popleft()
            if generation != self.generation:
                continue
            try:
                more = work(deadline)
            except Exception as exc:
                log_failure("sandbox.background_failed", exc)
                more = False
            if more:
                self._background.append((generation, work))
            else:
                self.pending -= 1
        if self._background:
            self._schedule_background()
