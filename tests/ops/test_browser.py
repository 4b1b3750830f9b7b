"""The dashboard in a real headless Chromium (Playwright, Debian's ``chromium``), against the real producer, a
real worker and the Klaviyo sandbox: log in, watch the overview refresh itself, look a serial up, open a dead
letter, replay it and see it delivered, replay a filtered selection after confirming, purge one.

Set ``PASSBRIDGE_SCREENSHOT_DIR=docs`` to refresh the screenshots in ``docs/`` (otherwise they go to the
test's tmp dir).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import ADMIN_TOKEN, Stack, item, wait_until
from .scenario import Known

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A fresh headless Chromium profile (Playwright's BrowserContext); skips when there is no Chromium."""
    if not CHROMIUM.exists():
        pytest.skip(
            "no Chromium at /usr/bin/chromium and none could be installed: `make test` runs "
            "`apt-get install -y chromium` when it is missing and it runs as root"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency) is missing")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    return Path(os.environ.get("PASSBRIDGE_SCREENSHOT_DIR") or tmp_path)


def log_in(page: Any, base_url: str) -> None:
    response = page.goto(f"{base_url}/dashboard")
    assert response is not None
    assert response.status == 401
    page.fill('input[name="token"]', ADMIN_TOKEN)
    page.click("text=Log in")
    page.wait_for_url(f"{base_url}/dashboard")


def test_look_up_replay_and_purge_in_chromium(fresh_stack: Stack, browser: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    stack = fresh_stack
    stack.add_account("acme")
    stack.start_producer(processes=1)
    stack.start_worker()
    a1 = [
        item("acme-a1-c", "A1", "created", minute=1),
        item("acme-a1-i", "A1", "installed", minute=2),
        item("acme-a1-u", "A1", "updated", minute=3),
    ]
    assert stack.post("acme", a1).status_code == 202
    wait_until(lambda: stack.drained("acme"), 30, "A1 delivered")
    sandbox = stack.sandbox
    sandbox.set_faults(error_rates={400: 1.0}, operations=["create_or_update_profile"])
    poison = [item(f"acme-{s.lower()}-c", s, "created", minute=5) for s in ("S2", "S3", "S4")]
    assert stack.post("acme", poison).status_code == 202
    wait_until(lambda: stack.dlq_size("acme") == 3, 30, "three dead letters")
    sandbox.clear_faults()
    sandbox.close()
    s2, s3, s4 = (p["event_id"] for p in poison)

    page = browser.new_page()
    log_in(page, stack.producer_url)
    row = page.locator('tr[data-account="acme"]')
    expect(row.locator("td.depth")).to_have_text("0")
    expect(row.locator("a.dlq")).to_have_text("3")
    expect(page.locator("table.workers")).to_contain_text("alive")
    # The overview refreshes itself from /dashboard/fragment/overview.
    page.wait_for_selector("#overview[data-refreshed]", timeout=10_000)
    expect(row.locator("svg.chart").first).to_be_visible()
    page.screenshot(path=str(shots / "dashboard-overview.png"), full_page=True)

    page.select_option('form[action="/dashboard/serial"] select', "acme")
    page.fill('input[name="serial"]', "A1")
    page.click("text=Find serial")
    expect(page.locator("#serial-status")).to_have_text("idle")
    expect(page.locator("table.timeline tr.kind-written")).to_have_count(3)
    expect(page.locator("pre.json")).to_contain_text("acme-a1-u")
    page.screenshot(path=str(shots / "dashboard-serial.png"), full_page=True)

    page.click("nav >> text=Dead letters")
    expect(page.locator("table.dlq tbody tr")).to_have_count(3)
    page.click(f"text={s2}")
    expect(page.locator("#payload")).to_contain_text("s2@example.com")
    expect(page.locator("table.errors")).to_contain_text("create_or_update_profile")
    expect(page.locator("#dlq-reason")).to_contain_text("HTTP 400")
    page.screenshot(path=str(shots / "dashboard-dlq-entry.png"), full_page=True)
    page.click("#replay-one")
    expect(page.locator(".notice")).to_contain_text("replayed")
    # The event page refreshes itself until the worker has delivered the event.
    expect(page.locator("#event-where")).to_have_text("delivered", timeout=20_000)
    assert s2 in stack.stored_unique_ids("acme")
    page.screenshot(path=str(shots / "dashboard-replayed.png"), full_page=True)

    page.goto(f"{stack.producer_url}/dashboard/dlq")
    page.fill('.filters input[name="serial"]', "S3")
    page.fill('.filters input[name="code"]', "400")
    page.click(".filters >> text=Filter")
    expect(page.locator("table.dlq tbody tr")).to_have_count(1)
    page.click("text=Replay all matching…")
    expect(page.locator("h1")).to_have_text("Replay 1 dead-lettered event?")
    page.screenshot(path=str(shots / "dashboard-confirm.png"), full_page=True)
    page.click("#confirm")
    expect(page.locator(".notice")).to_have_text("replayed 1 of 1 selected")
    wait_until(lambda: s3 in stack.stored_unique_ids("acme"), 20, "S3 delivered")

    page.goto(f"{stack.producer_url}/dashboard/dlq/entry?account=acme&id={s4}")
    page.click("text=Purge…")
    expect(page.locator("h1")).to_have_text("Purge 1 dead-lettered event?")
    page.click("#confirm")
    expect(page.locator(".notice")).to_have_text("purged 1 of 1 selected")
    expect(page.locator("table.dlq")).to_have_count(0)
    assert stack.dlq_size("acme") == 0
    assert s4 not in stack.stored_unique_ids("acme")


def test_overview_of_the_scenario_in_chromium(known: Known, browser: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    log_in(page, known.stack.producer_url)
    expect(page.locator("table.accounts tbody tr")).to_have_count(5)
    initech = page.locator('tr[data-account="initech"]')
    expect(initech).to_contain_text("paused")
    expect(initech).to_contain_text("billing hold")
    expect(page.locator('tr[data-account="globex"] a.dlq')).to_have_text("1")
    page.screenshot(path=str(shots / "dashboard-accounts.png"), full_page=True)
    page.click('a:text-is("hooli")')
    expect(page.locator("h1")).to_contain_text("hooli")
    expect(page.locator("main table").first).to_contain_text("H1")  # parked, with its next attempt
    page.screenshot(path=str(shots / "dashboard-account.png"), full_page=True)
