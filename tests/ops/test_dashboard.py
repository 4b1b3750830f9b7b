"""The dashboard over HTTP against the scenario's running producer: access control, every page, no secrets,
CSRF and the confirmation step of bulk actions (nothing here changes the scenario's state)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from redis.asyncio import Redis

from passbridge.accounts import AccountStore
from passbridge.crypto import load_cipher
from passbridge.keys import account_keys
from tests.conftest import serve

from .harness import ADMIN_TOKEN
from .scenario import GLOBEX_DEAD, HOOLI, Known


@pytest.fixture
def admin(known: Known) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=known.stack.producer_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ) as client:
        yield client


PAGES = [
    "/dashboard",
    "/dashboard/fragment/overview",
    "/dashboard/workers",
    "/dashboard/workers?fragment=1",
    "/dashboard/account?account=hooli",
    "/dashboard/account?account=initech",
    "/dashboard/serial?account=acme&serial=A1",
    "/dashboard/serial?account=hooli&serial=H1",
    "/dashboard/serial?account=globex&serial=G1&fragment=1",
    "/dashboard/event?account=acme&id=acme-a1-c",
    f"/dashboard/event?account=hooli&id={HOOLI['event_id']}",
    f"/dashboard/event?account=globex&id={GLOBEX_DEAD['event_id']}",
    "/dashboard/event?account=acme&id=no-such-event",
    "/dashboard/dlq",
    "/dashboard/dlq?account=globex&code=400",
    f"/dashboard/dlq/entry?account=globex&id={GLOBEX_DEAD['event_id']}",
]


def test_no_token_no_dashboard(known: Known) -> None:
    base = known.stack.producer_url
    r = httpx.get(f"{base}/dashboard", timeout=10)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert 'name="token"' in r.text  # the login form
    r = httpx.get(f"{base}/dashboard", headers={"authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401
    r = httpx.get(f"{base}/dashboard", cookies={"pb_dashboard": "forged"}, timeout=10)
    assert r.status_code == 401
    r = httpx.get(f"{base}/dashboard/fragment/overview", headers={"x-dashboard-fragment": "1"}, timeout=10)
    assert r.status_code == 401
    r = httpx.post(f"{base}/dashboard/dlq/replay", data={"account": "globex", "id": GLOBEX_DEAD["event_id"]})
    assert r.status_code == 401
    assert known.stack.dlq_size("globex") == 1


def test_login_form_sets_a_session_cookie(known: Known) -> None:
    with httpx.Client(base_url=known.stack.producer_url, timeout=10) as browser:
        r = browser.post("/dashboard/login", data={"token": "nope", "next": "/dashboard/dlq"})
        assert r.status_code == 401
        assert "not the admin token" in r.text
        r = browser.post("/dashboard/login", data={"token": ADMIN_TOKEN, "next": "https://evil.example/"})
        assert r.status_code == 303
        assert r.headers["location"] == "/dashboard"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert ADMIN_TOKEN not in cookie
        assert browser.get("/dashboard").status_code == 200
        assert browser.post("/dashboard/logout").status_code == 303
        assert browser.get("/dashboard").status_code == 401


def test_every_page_renders_and_shows_no_secret(known: Known, admin: httpx.Client) -> None:
    bodies = {}
    for path in PAGES:
        r = admin.get(path)
        assert r.status_code == 200, (path, r.text[:2000])
        assert r.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["cache-control"] == "no-store"
        bodies[path] = r.text
    overview = bodies["/dashboard"]
    for account_id in ("acme", "globex", "hooli", "initech", "umbrella"):
        assert f'data-account="{account_id}"' in overview
    assert "billing hold" in overview
    assert "<svg" in overview
    assert "alive" in overview
    assert "H1" in bodies["/dashboard/account?account=hooli"]  # the parked serial
    assert "acme-a1-u" in bodies["/dashboard/serial?account=acme&serial=A1"]  # applied state
    assert "dead_lettered" in bodies[f"/dashboard/event?account=globex&id={GLOBEX_DEAD['event_id']}"]
    entry = bodies[f"/dashboard/dlq/entry?account=globex&id={GLOBEX_DEAD['event_id']}"]
    assert "create_or_update_profile" in entry
    assert GLOBEX_DEAD["email"] in entry  # the payload
    assert "unknown" in bodies["/dashboard/event?account=acme&id=no-such-event"]

    secrets = [ADMIN_TOKEN, known.stack.secret_key, *known.stack.tokens.values()]

    async def klaviyo_keys() -> list[str]:
        redis = Redis.from_url(known.stack.redis_url)
        store = AccountStore(redis, load_cipher(known.stack.secret_key, known.stack.tmp / "state"))
        keys = []
        for a in known.stack.tokens:
            account = await store.get(a)
            assert account.secrets.klaviyo_api_key is not None
            keys.append(account.secrets.klaviyo_api_key.get_secret_value())
            sealed = await redis.hget(account_keys(a).config, "secrets")
            keys.append(sealed.decode())
        await redis.aclose()
        return keys

    secrets += asyncio.run(klaviyo_keys())
    for path, body in bodies.items():
        for secret in secrets:
            assert secret not in body, f"a secret shows on {path}"


def test_bad_requests_name_the_field(admin: httpx.Client) -> None:
    r = admin.get("/dashboard/serial?account=acme")
    assert r.status_code == 400
    assert "account and serial" in r.text
    r = admin.get("/dashboard/dlq?since=someday")
    assert r.status_code == 400
    assert "since:" in r.text
    r = admin.get("/dashboard/dlq/entry?account=globex&id=nope")
    assert r.status_code == 404
    r = admin.get("/dashboard/account")
    assert r.status_code == 400
    # A mistyped account is named, not shown as a page of zeros (as `passbridge status --account` refuses it).
    r = admin.get("/dashboard/account?account=hoolli")
    assert r.status_code == 404
    assert "no account &#39;hoolli&#39;: not registered, nothing queued or dead-lettered" in r.text


def test_bulk_actions_need_csrf_and_confirmation(known: Known) -> None:
    with httpx.Client(base_url=known.stack.producer_url, timeout=10) as browser:
        assert browser.post("/dashboard/login", data={"token": ADMIN_TOKEN}).status_code == 303
        form = {"action": "replay", "account": "globex", "code": "400"}
        r = browser.post("/dashboard/dlq/bulk", data=form)
        assert r.status_code == 403
        page = browser.get("/dashboard/dlq?account=globex").text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert csrf is not None
        r = browser.post("/dashboard/dlq/bulk", data={**form, "csrf": csrf.group(1)})
        assert r.status_code == 200
        assert "Replay 1 dead-lettered event?" in r.text
        assert GLOBEX_DEAD["event_id"] in r.text
        assert 'name="confirm" value="yes"' in r.text
        r = browser.post("/dashboard/dlq/bulk", data={**form, "code": "999", "csrf": csrf.group(1)})
        assert r.status_code == 303
        assert "nothing matched" in browser.get(r.headers["location"]).text
        r = browser.post("/dashboard/dlq/bulk", data={"action": "explode", "csrf": csrf.group(1)})
        assert r.status_code == 400
    assert known.stack.dlq_size("globex") == 1  # nothing was replayed without the confirmation


def test_static_files_and_disabled_dashboard(known: Known, redis_url: str) -> None:
    base = known.stack.producer_url
    js = httpx.get(f"{base}/dashboard/static/dashboard.js", timeout=10)
    assert js.status_code == 200
    assert "data-refresh" in js.text
    assert httpx.get(f"{base}/dashboard/static/{quote('../views.py')}", timeout=10).status_code == 404

    from producer.app import create_app

    # Served from this process on the session Redis: its flusher must not touch the scenario's Redis.
    settings = known.stack.settings().model_copy(update={"admin_token": None, "redis_url": redis_url})
    server = serve(create_app(settings, redis_url))
    try:
        r = httpx.get(f"{server.url}/dashboard", headers={"authorization": "Bearer anything"}, timeout=10)
        assert r.status_code == 404
        assert "PASSBRIDGE_ADMIN_TOKEN" in r.text
    finally:
        server.stop()
