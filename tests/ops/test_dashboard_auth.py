"""Dashboard sessions end on the server after their max age or at logout, and the login form stops answering a client that
keeps sending wrong tokens (real HTTP to the producer app, real Redis)."""

from __future__ import annotations

import time

import httpx
from redis import Redis

from passbridge.keys import DASHBOARD_LOGIN_FAILURES, DASHBOARD_REVOKED
from producer.dashboard import auth

from .harness import ADMIN_TOKEN


def test_a_session_cookie_is_refused_after_its_max_age(dashboard_url: str) -> None:
    def status_with(cookie: str) -> int:
        return httpx.get(f"{dashboard_url}/dashboard", cookies={auth.COOKIE: cookie}, timeout=10).status_code

    now = int(time.time())
    assert status_with(auth.session_value(ADMIN_TOKEN)) == 200
    assert status_with(auth.session_value(ADMIN_TOKEN, now - auth.SESSION_MAX_AGE_S + 60)) == 200
    # A copy of a cookie the browser was told to drop 12 h ago no longer works, however it is kept.
    assert status_with(auth.session_value(ADMIN_TOKEN, now - auth.SESSION_MAX_AGE_S - 1)) == 401
    assert status_with(auth.session_value(ADMIN_TOKEN, now + 3600)) == 401  # issued in the future
    assert status_with(auth.session_value("another-token", now)) == 401
    mac = auth.session_value(ADMIN_TOKEN, now - auth.SESSION_MAX_AGE_S - 1).partition(".")[2]
    assert status_with(f"{now}.{mac}") == 401  # a fresher time on an old cookie's HMAC
    # A byte that decodes (latin-1) to a digit int() refuses, '\u00b2': a 401, not a 500.
    raw = f"{auth.COOKIE}=".encode() + b"\xb2" + f"{now}.{mac}".encode()
    assert httpx.get(f"{dashboard_url}/dashboard", headers={"cookie": raw}, timeout=10).status_code == 401
    assert status_with("garbage") == 401
    with httpx.Client(base_url=dashboard_url, timeout=10) as browser:
        r = browser.post("/dashboard/login", data={"token": ADMIN_TOKEN})
        assert r.status_code == 303
        issued_s = int(r.cookies[auth.COOKIE].partition(".")[0])
        assert abs(issued_s - now) < 60
        assert browser.get("/dashboard").status_code == 200


def test_the_login_form_stops_a_client_guessing_tokens(dashboard_url: str) -> None:
    guesser = httpx.Client(base_url=dashboard_url, timeout=10)
    # Another client address on the loopback network is not affected.
    other = httpx.Client(
        base_url=dashboard_url, timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.2")
    )
    try:
        for n in range(auth.LOGIN_MAX_FAILURES):
            r = guesser.post("/dashboard/login", data={"token": f"guess-{n}"})
            assert r.status_code == 401, n
        r = guesser.post("/dashboard/login", data={"token": ADMIN_TOKEN})
        assert r.status_code == 429
        assert "Too many wrong tokens" in r.text
        assert 0 < int(r.headers["retry-after"]) <= auth.LOGIN_WINDOW_S
        assert auth.COOKIE not in r.cookies
        assert other.post("/dashboard/login", data={"token": "wrong"}).status_code == 401
        assert other.post("/dashboard/login", data={"token": ADMIN_TOKEN}).status_code == 303
        # Bearer access (scripts) is not a login and is not throttled.
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        assert guesser.get("/dashboard", headers=headers).status_code == 200
    finally:
        guesser.close()
        other.close()


def test_a_login_failure_counter_without_a_ttl_gets_its_window(dashboard_url: str, redis_url: str) -> None:
    # Before Redis 7 the counter can expire between the transaction's SET NX and INCR, which recreates it
    # without a TTL: it must still end, not refuse (or count against) the address for good.
    r = Redis.from_url(redis_url)
    counting, refused = DASHBOARD_LOGIN_FAILURES + "127.0.0.3", DASHBOARD_LOGIN_FAILURES + "127.0.0.4"
    r.set(counting, 3)
    r.set(refused, auth.LOGIN_MAX_FAILURES)
    try:
        for address, key, status in ((3, counting, 401), (4, refused, 429)):
            transport = httpx.HTTPTransport(local_address=f"127.0.0.{address}")
            with httpx.Client(base_url=dashboard_url, timeout=10, transport=transport) as client:
                assert client.post("/dashboard/login", data={"token": "wrong"}).status_code == status
            assert 0 < r.ttl(key) <= auth.LOGIN_WINDOW_S, key
        assert r.get(counting) == b"4"
    finally:
        r.delete(counting, refused)
        r.close()


def test_logout_ends_the_session_on_the_server(dashboard_url: str, redis_url: str) -> None:
    # Two operators log in (within the same second, as often as not: each login is still its own session).
    now = int(time.time())
    assert auth.session_value(ADMIN_TOKEN, now) != auth.session_value(ADMIN_TOKEN, now)
    other = httpx.Client(base_url=dashboard_url, timeout=10)
    assert other.post("/dashboard/login", data={"token": ADMIN_TOKEN}).status_code == 303
    with httpx.Client(base_url=dashboard_url, timeout=10) as browser:
        assert browser.post("/dashboard/login", data={"token": ADMIN_TOKEN}).status_code == 303
        copied = browser.cookies[auth.COOKIE]  # e.g. from a HAR attached to a ticket
        assert copied != other.cookies[auth.COOKIE]
        r = browser.post("/dashboard/logout")
        assert r.status_code == 303
        assert r.headers["location"] == "/dashboard/login"
    with httpx.Client(base_url=dashboard_url, timeout=10, cookies={auth.COOKIE: copied}) as thief:
        r = thief.get("/dashboard")
        assert r.status_code == 401
        assert 'action="/dashboard/login"' in r.text
        r = thief.get("/dashboard/fragment/overview", headers={"x-dashboard-fragment": "1"})
        assert r.status_code == 401
    # Only that session ends: the other operator's still works ...
    try:
        assert other.get("/dashboard").status_code == 200
    finally:
        other.close()
    # ... and the marker is a digest of the cookie that expires when the cookie would have.
    redis = Redis.from_url(redis_url)
    try:
        keys = redis.keys(DASHBOARD_REVOKED + "*")
        assert len(keys) == 1
        assert copied.encode() not in keys[0]
        ttl = redis.ttl(keys[0])
        assert auth.SESSION_MAX_AGE_S - 60 < ttl <= auth.SESSION_MAX_AGE_S + auth.SESSION_SKEW_S
    finally:
        redis.close()
    # Logging out with a cookie that is not a valid session records nothing.
    httpx.post(f"{dashboard_url}/dashboard/logout", cookies={auth.COOKIE: "garbage"}, timeout=10)
    httpx.post(f"{dashboard_url}/dashboard/logout", timeout=10)
    redis = Redis.from_url(redis_url)
    try:
        assert len(redis.keys(DASHBOARD_REVOKED + "*")) == 1
    finally:
        redis.close()
