"""producer.signatures decides exactly what the ``standardwebhooks`` package decides, on a fuzzed corpus.

The reference below is how the producer used the package before (a ``Webhook`` per secret, tried in order;
"No matching signature found" moves on to the next secret, any other failure stops), so the fast verifier
must give the same outcome and the same reason for every case.
"""

from __future__ import annotations

import base64
import os
import random
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

from producer.signatures import Rejection, SignatureRejected, verify_signature

_PACKAGE_REASONS = {
    "Message timestamp too old": Rejection.too_old,
    "Message timestamp too new": Rejection.too_new,
    "Missing required headers": Rejection.missing,
    "Invalid Signature Headers": Rejection.bad_timestamp,
}


def reference(secrets: list[str], body: bytes, headers: dict[str, str]) -> str:
    """The package's verdict: "ok", a Rejection value, or the exception it raised."""
    for secret in secrets:
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
            return "ok"
        except WebhookVerificationError as exc:
            if str(exc) != "No matching signature found":
                return _PACKAGE_REASONS[str(exc)].value
        except EmptyWebhookSecretError:
            return "EmptyWebhookSecretError"
        except (ValueError, IndexError):
            return Rejection.malformed.value
    return Rejection.no_match.value


def fast(secrets: list[str], body: bytes, headers: dict[str, str]) -> str:
    try:
        verify_signature(secrets, body, headers)
    except SignatureRejected as exc:
        return exc.reason.value
    except EmptyWebhookSecretError:
        return "EmptyWebhookSecretError"
    return "ok"


def _secret(rng: random.Random) -> str:
    raw = base64.b64encode(rng.randbytes(rng.choice([16, 24, 32]))).decode()
    return rng.choice(
        [
            "whsec_" + raw,
            raw,  # no prefix
            "whsec_" + raw.rstrip("="),  # unpadded
            "whsec_" + raw[:-3] + "*" + raw[-2:],  # a stray character (the package's decoder skips it)
            "whsec_" + raw[:5],  # truncated: bad padding
        ]
        if rng.random() < 0.15
        else ["whsec_" + raw]
    )


def _timestamp(rng: random.Random, now: int) -> tuple[str, int]:
    """A webhook-timestamp header and the second a sender would sign for it."""
    # Offsets stay 10 s clear of the ±300 s boundary: the package reads the clock itself, a moment after we did.
    ts = now + rng.choice([0, 1, -60, 120, -290, 290, -310, 310, -4000, 86_400])
    form = rng.random()
    if form < 0.6:
        return str(ts), ts
    if form < 0.7:
        return f"{ts}.{rng.randrange(10)}", ts  # fractions are signed as their floor
    if form < 0.75:
        return f"00{ts}", ts
    if form < 0.8:
        return f" {ts} ", ts
    if form < 0.85:
        return f"{ts:.3e}", int(float(f"{ts:.3e}"))
    return rng.choice(["", "abc", "nan", "inf", "-inf", "99999999999999", "1_7", "+" + str(ts), "٣"]), ts


def _case(rng: random.Random, pool: list[str], now: int) -> tuple[list[str], bytes, dict[str, str]]:
    secrets = rng.sample(pool, rng.choice([1, 1, 2, 3]))
    body = b'{"type":"pass.installed","data":{"serialNumber":"S%d"}}' % rng.randrange(1000)
    msg_id = rng.choice(["msg_1", f"msg_{rng.randrange(10**6)}", "msg_é", ""])
    header, signed_ts = _timestamp(rng, now)
    signers = [*secrets, *rng.sample(pool, 2)]  # some sign with secrets the account does not have
    entries = []
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        roll = rng.random()
        signer = rng.choice(signers)
        if roll < 0.6 and msg_id:
            try:
                when = datetime.fromtimestamp(signed_ts, tz=UTC)
                entries.append(Webhook(signer).sign(msg_id, when, body.decode()))
            except (ValueError, EmptyWebhookSecretError, OverflowError, OSError):
                entries.append("v1," + base64.b64encode(os.urandom(32)).decode())
        elif roll < 0.7:
            entries.append("v2," + base64.b64encode(os.urandom(32)).decode())
        elif roll < 0.75:
            entries.append("v1,not*base64")
        elif roll < 0.8:
            entries.append("v1,abc")  # bad padding
        elif roll < 0.85:
            entries.append(rng.choice(["nonsense", "v1,a,b", ""]))
        else:
            entries.append("v1," + base64.b64encode(os.urandom(32)).decode())
    headers = {"webhook-id": msg_id, "webhook-timestamp": header, "webhook-signature": " ".join(entries)}
    for name in list(headers):
        if rng.random() < 0.04:
            del headers[name]
    if rng.random() < 0.08:
        body = body.replace(b"installed", b"uninstalled")  # tampered
    if rng.random() < 0.03:
        body += b"\xff"  # not UTF-8
    return secrets, body, headers


@pytest.mark.parametrize("seed", range(4))
def test_same_verdict_as_the_package_on_a_fuzzed_corpus(seed: int) -> None:
    rng = random.Random(seed)
    pool = [_secret(rng) for _ in range(6)]
    verdicts: Counter[str] = Counter()
    for _ in range(2500):
        secrets, body, headers = _case(rng, pool, int(time.time()))
        expected = reference(secrets, body, headers)
        assert fast(secrets, body, headers) == expected, (secrets, body, headers)
        verdicts[expected] += 1
    # The corpus reaches every outcome, acceptance included.
    assert set(verdicts) >= {"ok", *(r.value for r in Rejection)}, verdicts
    assert verdicts["ok"] > 200


def test_rotation_accepts_any_active_secret_in_any_position() -> None:
    old, new, retired = (_secret(random.Random(i)) for i in (10, 11, 12))
    body = b'{"type":"pass.created"}'
    now = datetime.now(UTC)
    ts = str(int(now.timestamp()))
    for signers in ([new], [old], [retired, old], [old, new], [retired, retired, new]):
        sig = " ".join(Webhook(s).sign("msg_r", now, body.decode()) for s in signers)
        headers = {"webhook-id": "msg_r", "webhook-timestamp": ts, "webhook-signature": sig}
        assert fast([new, old], body, headers) == reference([new, old], body, headers) == "ok"
        assert fast([retired], body, headers) == reference([retired], body, headers)
    headers = {
        "webhook-id": "msg_r",
        "webhook-timestamp": ts,
        "webhook-signature": Webhook(retired).sign("msg_r", now, body.decode()),
    }
    assert fast([new, old], body, headers) == Rejection.no_match.value
