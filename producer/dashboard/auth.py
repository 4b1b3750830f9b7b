"""Who may see the dashboard: holders of ``Settings.admin_token``.

Two ways in: ``Authorization: Bearer <admin token>`` on every request (scripts, curl), or the login form, which
sets an HttpOnly, SameSite=Strict session cookie. The cookie holds the time it was issued, a random nonce (each
login is its own session, even two in the same second) and an HMAC of both keyed with the token, never the token
itself: the server refuses it once ``SESSION_MAX_AGE_S`` has passed (whatever the browser keeps, so a copied
cookie does not work for ever), and changing the token ends every session. Logging out revokes that session on
the server too (a marker in Redis until the session would have expired), so a copy of the cookie taken before
the logout stops working with it. Forms that change something carry a CSRF value (another HMAC of the token)
that a cookie-authenticated POST must echo. The login form refuses a client (by address) after ``LOGIN_MAX_FAILURES`` wrong tokens within
``LOGIN_WINDOW_S``, so a short token cannot be guessed at network speed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from redis.asyncio import Redis
from starlette.requests import Request

from passbridge.keys import DASHBOARD_REVOKED
from worker import exporter

COOKIE = "pb_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_MAX_AGE_S = 12 * 3600
#: How far in the future an issue time may be (clocks of the producer's hosts differ a little).
SESSION_SKEW_S = 60
#: Wrong tokens one client address may send to the login form per window before it answers 429.
LOGIN_MAX_FAILURES = 10
LOGIN_WINDOW_S = 15 * 60


def _mac(token: str, label: str) -> str:
    return hmac.new(token.encode(), label.encode(), hashlib.sha256).hexdigest()


def session_value(token: str, issued_s: int | None = None, nonce: str | None = None) -> str:
    """The session cookie's value for ``token``: ``<issued epoch s>.<nonce>.<HMAC of both>`` (issued now, with
    a fresh random nonce, by default)."""
    issued = int(time.time()) if issued_s is None else issued_s
    nonce = secrets.token_hex(8) if nonce is None else nonce
    return f"{issued}.{nonce}.{_mac(token, f'passbridge-dashboard-session-v3|{issued}|{nonce}')}"


def session_ok(value: str, token: str, *, now_s: float | None = None) -> bool:
    """Whether ``value`` is a session cookie made with ``token`` and issued less than ``SESSION_MAX_AGE_S`` ago."""
    issued, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses (a crafted cookie was a 500).
    if not (issued.isascii() and issued.isdigit()) or len(issued) > 12 or not nonce or len(nonce) > 64:
        return False
    expected = session_value(token, int(issued), nonce).rpartition(".")[2]
    if not hmac.compare_digest(mac.encode(), expected.encode()):
        return False
    age = (time.time() if now_s is None else now_s) - int(issued)
    return -SESSION_SKEW_S <= age <= SESSION_MAX_AGE_S


def csrf_value(token: str) -> str:
    """The CSRF form value for ``token``."""
    return _mac(token, "passbridge-dashboard-csrf-v1")


def bearer_ok(request: Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (the check /metrics uses too)."""
    return exporter.bearer_ok(request.headers.get("authorization", ""), token) if token else False


def _revoked_key(value: str) -> str:
    # A digest, not the cookie itself: whoever can read Redis must not find working sessions there.
    return DASHBOARD_REVOKED + hashlib.sha256(value.encode()).hexdigest()


async def cookie_ok(request: Request, token: str, redis: Redis) -> bool:
    """Whether the request carries a valid session cookie that was not logged out (one EXISTS, made only
    for a cookie that is otherwise valid)."""
    value = request.cookies.get(COOKIE, "")
    return session_ok(value, token) and not await redis.exists(_revoked_key(value))


async def revoke(request: Request, token: str, redis: Redis) -> None:
    """End the request's session on the server: its cookie is refused from now on, wherever it is copied.

    Only a valid cookie is recorded (so nobody can fill Redis with made-up ones), and the marker lives as long
    as the cookie would still be accepted (its remaining life plus the allowed clock skew).
    """
    value = request.cookies.get(COOKIE, "")
    if not session_ok(value, token):
        return
    remaining_s = int(value.partition(".")[0]) + SESSION_MAX_AGE_S + SESSION_SKEW_S - int(time.time())
    await redis.set(_revoked_key(value), 1, ex=max(1, remaining_s))


def token_ok(given: str, token: str) -> bool:
    """Constant-time check of a token typed into the login form."""
    return hmac.compare_digest(given.strip().encode(), token.encode())


def csrf_ok(request: Request, token: str, form_value: str) -> bool:
    """A state-changing request is allowed: bearer-authenticated (no ambient credentials), or its form echoes
    the CSRF value."""
    if bearer_ok(request, token):
        return True
    return hmac.compare_digest(form_value.encode(), csrf_value(token).encode())
