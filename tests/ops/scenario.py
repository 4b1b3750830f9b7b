"""The known state the operations tests inspect, built by running the real producer and worker.

| account  | what happened                                                           | left behind                  |
| -------- | ----------------------------------------------------------------------- | ---------------------------- |
| acme     | 9 events over the API (one request each), 1 duplicate, 2 NDJSON lines   | everything delivered         |
|          | and 1 bad line, requests with a wrong token until both producer         |                              |
|          | processes answered some                                                 |                              |
| globex   | Klaviyo rejects profile writes (400) while G1 is sent; then G2 is fine  | G1 in the DLQ                |
| initech  | registered as paused ("billing hold")                                   | 2 events queued, paused      |
| hooli    | Klaviyo answers 503 to create_event; retry delays up to 30 days         | H1 parked, next attempt late |
| umbrella | Klaviyo answers 429 to create_event for a moment                        | delivered after the 429s     |
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis as redis_sync

from passbridge.accounts import AccountState
from passbridge.keys import account_keys

from .harness import Stack, item, wait_until

ACME_API = [
    item("acme-a1-c", "A1", "created", platform="apple", pass_type="loyalty", minute=1),
    item("acme-a1-i", "A1", "installed", platform="apple", pass_type="loyalty", minute=2),
    item("acme-a1-u", "A1", "updated", platform="apple", pass_type="loyalty", minute=3),
    item("acme-a2-c", "A2", "created", platform="google", pass_type="loyalty", minute=1),
    item("acme-a2-i", "A2", "installed", platform="google", pass_type="loyalty", minute=2),
    item("acme-a2-x", "A2", "uninstalled", platform="google", pass_type="loyalty", minute=4),
    item("acme-a3-c", "A3", "created", platform="apple", pass_type="coupon", minute=1),
    item("acme-a4-c", "A4", "created", platform="google", pass_type="coupon", minute=1),
    item("acme-a4-i", "A4", "installed", platform="google", pass_type="coupon", minute=2),
]
ACME_NDJSON = [
    item("acme-a5-c", "A5", "created", platform="apple", pass_type="loyalty", minute=5),
    item("acme-a5-i", "A5", "installed", platform="apple", pass_type="loyalty", minute=6),
]
GLOBEX_DEAD = item("globex-g1-c", "G1", "created", minute=1)
GLOBEX_OK = item("globex-g2-c", "G2", "created", minute=2)
INITECH = [item("initech-i1-c", "I1", "created", minute=1), item("initech-i1-i", "I1", "installed", minute=2)]
HOOLI = item("hooli-h1-c", "H1", "created", minute=1)
UMBRELLA = item("umbrella-u1-c", "U1", "created", minute=1)
#: hooli's serial must stay parked for the whole test session.
PARKED_AT_LEAST_S = 300


@dataclass
class Known:
    """What the scenario did, for the tests to check against."""

    stack: Stack
    #: Sandbox answers to create_event by status, counted by the sandbox itself.
    create_event: dict[str, int] = field(default_factory=dict)
    #: Requests refused for a wrong ingest token.
    unauthorized: int = 0
    built_at: float = 0.0
    #: Every answer of the sandbox: operation → status → count (provisioning included).
    answered: dict[str, dict[str, int]] = field(default_factory=dict)


def _retry_record(r: redis_sync.Redis, account_id: str, event_id: str) -> dict[str, Any] | None:
    raw = r.hget(account_keys(account_id).retries, event_id)
    return orjson.loads(raw) if raw else None


def build(stack: Stack) -> Known:
    """Run the scenario of the module docstring; returns once every account is in its final state."""
    for account_id in ("acme", "globex", "umbrella"):
        stack.add_account(account_id)
    # Full-jitter delays drawn from [0, 30 days): parked for less than PARKED_AT_LEAST_S once in ~9,000 runs.
    month = 30 * 86_400
    stack.add_account("hooli", retry_policy={"base_delay_s": month, "max_delay_s": month})
    stack.add_account("initech", state=AccountState.paused, state_reason="billing hold")
    stack.start_producer(processes=2)
    stack.start_worker()
    sandbox = stack.sandbox
    r = stack.sync_redis()
    try:
        for it in ACME_API:
            resp = stack.post("acme", [it])
            assert resp.status_code == 202, resp.text
            assert resp.json()["results"][0]["status"] == "accepted", resp.text
        dup = stack.post("acme", [ACME_API[0]])
        assert dup.json()["results"][0]["status"] == "duplicate", dup.text
        nd = stack.post_ndjson("acme", [orjson.dumps(i) for i in ACME_NDJSON] + [b"{not json"])
        assert nd.status_code == 200, nd.text
        assert (nd.json()["accepted"], len(nd.json()["rejected"])) == (2, 1), nd.text
        unauthorized = 0

        def both_producers_counted() -> bool:
            # Requests with a wrong token change nothing but a counter: send them until both producer
            # processes have answered some, so the metrics test sees counts of two processes added up.
            nonlocal unauthorized
            assert stack.post("acme", [item("x", "X", "created")], token="pbi_wrong").status_code == 401
            unauthorized += 1
            return len(stack.producer_pids_counting("passbridge_rejected_total")) >= 2

        wait_until(both_producers_counted, 30, "both producer processes answering")
        wait_until(lambda: stack.drained("acme"), 60, "acme delivered")

        sandbox.set_faults(error_rates={400: 1.0}, operations=["create_or_update_profile"])
        assert stack.post("globex", [GLOBEX_DEAD]).status_code == 202
        wait_until(lambda: stack.dlq_size("globex") == 1, 30, "globex's poison event dead-lettered")
        sandbox.clear_faults()
        assert stack.post("globex", [GLOBEX_OK]).status_code == 202
        wait_until(lambda: stack.drained("globex"), 30, "globex delivered")

        assert stack.post("initech", INITECH).status_code == 202
        wait_until(lambda: r.exists(account_keys("initech").paused), 30, "initech paused by the engine")

        sandbox.set_faults(error_rates={503: 1.0}, operations=["create_event"])
        assert stack.post("hooli", [HOOLI]).status_code == 202
        keys = account_keys("hooli")

        def parked_long() -> bool:
            score = r.zscore(keys.ready, "H1")
            return score is not None and score > (time.time() + PARKED_AT_LEAST_S) * 1000

        wait_until(parked_long, 30, "hooli's serial parked for a long time")
        sandbox.clear_faults()

        sandbox.set_faults(error_rates={429: 1.0}, operations=["create_event"])
        assert stack.post("umbrella", [UMBRELLA]).status_code == 202
        wait_until(
            lambda: (rec := _retry_record(r, "umbrella", UMBRELLA["event_id"])) and rec["throttled"] >= 1,
            30,
            "umbrella throttled",
        )
        sandbox.clear_faults()
        wait_until(lambda: stack.drained("umbrella"), 30, "umbrella delivered")
        counts = sandbox.requests(limit=0)["counts"]
        # Every process flushes its activity counts every 2 s.
        time.sleep(2.5)
        answered = {op: {str(k): int(v) for k, v in c.items()} for op, c in counts.items()}
        return Known(stack, answered.get("create_event", {}), unauthorized, time.time(), answered)
    except Exception:
        print(stack.logs())
        raise
    finally:
        sandbox.close()
        r.close()
