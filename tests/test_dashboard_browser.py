"""The dashboard in a real browser (headless Chromium through Playwright) against a real daemon and
simulators: the tiles, an upgrade started from the page with its progress and outcome, a cancel
(the simulator records the STOP), a refusal's message. ``tests/browser.py`` says what is needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytest_twisted

from tests import browser
from tests.conftest import ROOT
from tests.live_rig import BrowserThread

#: Where the upgrade test leaves a screenshot of the page mid-run (docs/dashboard.png is one of these).
SCREENSHOT_TMP = Path(ROOT / ".pytest_cache" / "dashboard.png")
WAIT_MS = 60_000  # what the page waits for at most (an upgrade takes a few seconds at this time scale)


def test_a_browser_is_available():
    """Fails, saying how to get one, unless the browser tests are skipped on purpose."""
    problem = browser.missing()
    if problem is None:
        return
    if browser.skipped_on_purpose():
        pytest.skip(f"{problem}; {browser.SKIP_VARIABLE} is set")
    pytest.fail(f"{problem}: {browser.HOW_TO_GET_ONE}", pytrace=False)


@pytest.fixture(scope="module")
def chromium():
    """(the browser thread, a launched Chromium)"""
    problem = browser.missing()
    if problem is not None:
        pytest.skip(f"{problem} (see test_a_browser_is_available)")
    from twisted.internet import reactor

    thread = BrowserThread(reactor)

    def start():
        from playwright.sync_api import sync_playwright

        playwright = sync_playwright().start()
        return playwright, browser.launch(playwright)

    playwright, instance = thread.call(start)
    yield thread, instance
    thread.call(instance.close)
    thread.call(playwright.stop)
    thread.close()


@pytest.fixture
def page(chromium):
    """(run, page): ``await run(lambda: ...)`` runs Playwright calls on the browser's thread."""
    thread, instance = chromium
    errors: list[str] = []

    def open_page():
        context = instance.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        return context, page

    context, page = thread.call(open_page)
    yield thread.run, page
    thread.call(context.close)
    assert not errors, errors


@pytest_twisted.ensureDeferred
async def test_upgrade_cancel_and_refusal_from_the_page(rig, page):
    from playwright.sync_api import expect

    run, page = page
    rig.make_image("v2.bin", "2.0.0", 200_000)
    fast = await rig.start_sim("fast")
    # The slow one stalls in phase 1 after 4 replies, long enough to be cancelled from the page.
    slow = await rig.start_sim("slow", "--stall", "4:3000")
    await rig.start_daemon()
    fast_tile, slow_tile = page.locator('[data-device="fast"]'), page.locator('[data-device="slow"]')

    def tiles_and_catalogue():
        page.goto(rig.url + "/")
        expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
        expect(fast_tile.locator(".name")).to_have_text("fast")
        expect(fast_tile.locator(".state")).to_have_text("idle")
        expect(slow_tile.locator(".version")).to_have_text("unknown")
        expect(page.locator("#firmware-select option")).to_have_count(1)
        expect(page.locator("#firmware-select option")).to_contain_text("v2.bin")

    await run(tiles_and_catalogue)

    def upgrade_both():
        fast_tile.locator(".select").check()
        slow_tile.locator(".select").check()
        page.locator("#upgrade-button").click()
        # The progress bar moves, and the outcome arrives.
        expect(fast_tile.locator(".progress-text")).to_contain_text("%", timeout=WAIT_MS)
        expect(fast_tile.locator(".outcome")).to_have_text("succeeded", timeout=WAIT_MS)
        expect(fast_tile.locator(".version")).to_have_text("2.0.0")
        expect(fast_tile.locator(".state")).to_have_text("idle")
        row = page.locator("#history tr", has_text="fast").first
        expect(row.locator(".outcome")).to_have_text("succeeded", timeout=WAIT_MS)
        expect(slow_tile.locator(".phase")).to_have_text("phase 1", timeout=WAIT_MS)
        expect(slow_tile.locator(".state")).to_have_text("running")
        page.screenshot(path=str(SCREENSHOT_TMP))

    await run(upgrade_both)
    assert fast.saw("session_end", phase=2, outcome="ok")

    def cancel_slow():
        slow_tile.locator(".cancel").click()
        expect(slow_tile.locator(".outcome")).to_have_text("aborted", timeout=WAIT_MS)
        expect(page.locator("#history tr", has_text="slow").first.locator(".outcome")).to_have_text("aborted")

    await run(cancel_slow)
    # The STOP reached the device.
    await rig.wait_for(lambda: slow.saw("stop_received", phase=1), "the simulator's stop_received")

    # A refusal shows the API's own message: the device is busy with a job started elsewhere.
    job = rig.api("POST", "/v1/jobs", {"device": "slow", "firmware": "v2.bin"})["job"]

    def refused():
        expect(slow_tile.locator(".state")).to_have_text(re.compile("running|queued"), timeout=WAIT_MS)
        slow_tile.locator(".select").check()
        page.locator("#upgrade-button").click()
        message = f"slow: device slow is busy with job {job['id']}"
        expect(page.locator("#error")).to_contain_text(message, timeout=WAIT_MS)

    await run(refused)
    rig.api("POST", f"/v1/jobs/{job['id']}/cancel", {})
    await run(lambda: expect(slow_tile.locator(".state")).to_have_text("idle", timeout=WAIT_MS))


@pytest_twisted.ensureDeferred
async def test_the_page_asks_for_the_token_and_uses_it(rig, page):
    from playwright.sync_api import expect

    run, page = page
    rig.make_image("v2.bin", "2.0.0", 50_000)
    await rig.start_sim("dev1")
    await rig.start_daemon('control_token = "s3cret-token"')

    def with_token():
        page.goto(rig.url + "/")
        expect(page.locator("#token-form")).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#live")).to_have_text("token needed", timeout=WAIT_MS)
        page.locator("#token-input").fill("s3cret-token")
        page.locator("#token-form button").click()
        expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
        expect(page.locator('[data-device="dev1"] .state')).to_have_text("idle")
        expect(page.locator("#firmware-select option")).to_contain_text("v2.bin")

    await run(with_token)


@pytest_twisted.ensureDeferred
async def test_a_batch_from_the_page_whose_canary_fails(rig, page):
    from playwright.sync_api import expect

    run, page = page
    rig.make_image("v2.bin", "2.0.0", 50_000)
    canary = await rig.start_sim("canary", "--reject-image")
    rest = await rig.start_sim("rest")
    await rig.start_daemon()

    def batch_from_the_page():
        page.goto(rig.url + "/")
        expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
        expect(page.locator("#firmware-select option")).to_contain_text("v2.bin")
        page.locator('[data-device="canary"] .select').check()
        page.locator('[data-device="rest"] .select').check()
        page.locator("#batch-canary").fill("1")
        page.locator("#batch-button").click()
        row = page.locator("#batches tbody tr").first
        expect(row.locator(".result")).to_have_text("failed", timeout=WAIT_MS)
        expect(row.locator(".state")).to_have_text("finished")
        expect(row.locator(".members")).to_have_text("1 failed, 1 skipped")
        expect(row.locator(".stopped")).to_contain_text("canary canary did not succeed")
        expect(page.locator('[data-device="rest"] .state')).to_have_text("idle")
        # A refusal shows the API's message: the batch needs devices.
        page.locator("#batch-button").click()
        expect(page.locator("#error")).to_contain_text("tick at least one device for the batch")

    await run(batch_from_the_page)
    assert canary.saw("session_start") and not rest.saw("ctp_connect")
