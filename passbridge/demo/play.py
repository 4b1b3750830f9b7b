"""Send a :class:`~passbridge.demo.scenario.Scenario` to a running producer over HTTP, as each source would.

Each pass's deliveries go out one after another (a pass's lifecycle is sequential in the real world); many
passes are in flight at once. Every answer is checked against what the delivery expects, and counted.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from passbridge.demo.scenario import Delivery, DemoAccount, Scenario
from producer.sources.apple import pass_token
from producer.sources.google_sign import GoogleSigner


@dataclass
class Credentials:
    """What the player needs to sign and authenticate as each account."""

    ingest_token: str
    webhook_secret: str
    apple_token_secret: str
    google: GoogleSigner


@dataclass
class PlayResult:
    """Answers counted by outcome, the mismatches (answer ≠ expectation) and the time taken."""

    outcomes: Counter[str] = field(default_factory=Counter)
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    created_at: dict[tuple[str, str], datetime] = field(default_factory=dict)
    seconds: float = 0.0


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Player:
    """Plays deliveries against ``producer_url`` with ``concurrency`` passes in flight.

    The lanes share ``concurrency // per_pool`` small connection pools rather than one large one: httpcore
    scans every connection of a pool for every request, so one pool of 32 connections cost the player more
    CPU than the producer spent answering (the demo runs every process on the same cores).
    """

    def __init__(
        self,
        producer_url: str,
        creds: dict[str, Credentials],
        accounts: list[DemoAccount],
        concurrency: int = 32,
        per_pool: int = 4,
    ) -> None:
        self.url = producer_url
        self.creds = creds
        self.accounts = {a.account_id: a for a in accounts}
        self.concurrency = concurrency
        self.per_pool = max(1, per_pool)
        self.result = PlayResult()

    def _client(self, connections: int) -> httpx.AsyncClient:
        # Idle connections are dropped after 2 s, well before uvicorn's 5 s keep-alive timeout: with both at
        # 5 s, a connection the server is closing can be picked for the next request (a ReadError).
        limits = httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=2.0
        )
        # Plain HTTP on loopback: no TLS context (building one loads the CA bundle).
        return httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits, verify=False)  # noqa: S501

    async def play(self, scenario: Scenario, progress: Callable[[int], None] | None = None) -> PlayResult:
        """Backfill first (NDJSON), then every pass's lane; returns the counted answers."""
        started = time.monotonic()
        pools = [self._client(self.per_pool) for _ in range(max(1, self.concurrency // self.per_pool))]
        try:
            for account_id, items in scenario.backfill.items():
                await self._backfill(pools[0], account_id, items)
                if progress:
                    progress(len(items))
            queue: asyncio.Queue[list[Delivery]] = asyncio.Queue()
            for lane in scenario.lanes:
                queue.put_nowait(lane)

            async def lane_worker(http: httpx.AsyncClient) -> None:
                while not queue.empty():
                    lane = queue.get_nowait()
                    for d in lane:
                        await self._send(http, d)
                        if progress:
                            progress(1)

            await asyncio.gather(*(lane_worker(pools[i % len(pools)]) for i in range(self.concurrency)))
        finally:
            for http in pools:
                await http.aclose()
        self.result.seconds = time.monotonic() - started
        return self.result

    def _tally(self, d: Delivery, got: str, detail: str = "") -> None:
        self.result.outcomes[got] += 1
        if got in ("bad_signature", "invalid", "forged"):
            self.result.rejected_by_reason[got] += 1
        if got != d.expect:
            self.result.mismatches.append(
                f"{d.kind} {d.account_id}/{d.serial}: expected {d.expect}, got {got} {detail[:200]}"
            )

    async def _backfill(self, http: httpx.AsyncClient, account_id: str, items: list[dict[str, Any]]) -> None:
        body = b"\n".join(orjson.dumps(i) for i in items) + b"\n"
        r = await http.post(
            f"/v1/accounts/{account_id}/events/ndjson",
            content=body,
            headers={
                "Authorization": f"Bearer {self.creds[account_id].ingest_token}",
                "content-type": "application/x-ndjson",
            },
        )
        r.raise_for_status()
        doc = r.json()
        self.result.outcomes["accepted"] += doc["accepted"]
        self.result.outcomes["duplicate"] += doc["duplicates"]
        self.result.outcomes["invalid"] += len(doc["rejected"])
        self.result.rejected_by_reason["invalid"] += len(doc["rejected"])

    async def _send(self, http: httpx.AsyncClient, d: Delivery) -> None:
        for attempt in range(20):  # a 503 (backpressure) is retried after Retry-After, as a source would
            r = await self._request(http, d)
            if r.status_code != 503:
                break
            await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), 2.0) * (attempt + 1) / 4)
        self._tally(d, self._classify(d, r), r.text)

    def _classify(self, d: Delivery, r: httpx.Response) -> str:
        if r.status_code == 401:
            return "forged" if d.kind == "google" else "bad_signature"
        if r.status_code == 422:
            return "invalid"
        if d.kind in ("apple_register", "apple_unregister"):
            fired = r.headers.get("x-passbridge-event") or (r.json().get("event_id") if r.content else None)
            if r.status_code in (200, 201):
                return "accepted" if fired else "no_event"
            return f"http_{r.status_code}"
        if r.status_code in (200, 202):
            return "duplicate" if r.json().get("duplicate") else "accepted"
        return f"http_{r.status_code}"

    async def _request(self, http: httpx.AsyncClient, d: Delivery) -> httpx.Response:
        creds = self.creds[d.account_id]
        acct = self.accounts[d.account_id]
        if d.kind == "webhook":
            assert d.body is not None
            assert d.msg_id is not None
            now = datetime.now(UTC)
            key = (d.account_id, d.serial)
            ts = now
            if d.event_kind == "created":
                # Issued a minute before its webhook arrives, so a late event can claim a time between the
                # creation and the install (which Apple and Google stamp on arrival).
                ts = now - timedelta(seconds=60)
                self.result.created_at[key] = ts
            if d.stale_of is not None:
                ts = self.result.created_at.get(key, now - timedelta(days=30)) + timedelta(seconds=d.stale_of)
            body = orjson.dumps({**d.body, "timestamp": _iso(ts)}).decode()
            secret = creds.webhook_secret
            if d.tamper:
                secret = "whsec_" + "A" * 32
            sig = Webhook(secret).sign(d.msg_id, now, body)
            headers = {
                "webhook-id": d.msg_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": sig,
                "content-type": "application/json",
            }
            return await http.post(f"/webhooks/{d.account_id}", content=body, headers=headers)
        if d.kind in ("apple_register", "apple_unregister"):
            assert d.device is not None
            token = pass_token(creds.apple_token_secret, acct.apple_pass_type_id, d.serial)
            path = (
                f"/apple/{d.account_id}/v1/devices/{d.device}/registrations/"
                f"{acct.apple_pass_type_id}/{d.serial}"
            )
            headers = {"Authorization": f"ApplePass {token}"}
            if d.kind == "apple_register":
                return await http.post(path, json={"pushToken": f"push-{d.device}"}, headers=headers)
            return await http.delete(path, headers=headers)
        assert d.google_event is not None
        assert d.msg_id is not None
        signer = creds.google
        if d.tamper:
            signer = GoogleSigner(signer.issuer_id)  # keys the account does not trust
        message = signer.message(d.google_event, d.serial, acct.google_class_id.split(".", 1)[1], d.msg_id)
        return await http.post(
            f"/google/{d.account_id}/callback",
            content=signer.sign(message),
            headers={"content-type": "application/json"},
        )
