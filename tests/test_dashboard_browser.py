"""The dashboard in a real browser (headless Chromium through Playwright) against a real daemon and
simulators: the tiles, an upgrade started from the page with its progress and outcome, a cancel
(the simulator records the STOP), a refusal's message, the point of no return's banner, a resume
from the history. ``tests/browser.py`` says what is needed."""

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


#: Installed in the page: records every text set in a tile's parts and every show/hide of its
#: banner, as [part, text] (part: the element's first class; text: "shown"/"hidden" for the banner),
#: so a test can check what the page drew and in which order however quickly it went by.
RECORD_TILE = """(device) => {
  const tile = document.querySelector(`[data-device="${device}"]`);
  const seen = window.netotaSeen = [];
  new MutationObserver((records) => {
    for (const r of records) {
      const part = r.target.classList ? r.target.classList[0] : r.target.parentElement.classList[0];
      if (r.type === "attributes") {
        if (part === "no-return") seen.push([part, r.target.hidden ? "hidden" : "shown"]);
      } else {
        for (const node of r.addedNodes) seen.push([part, node.textContent]);
      }
    }
  }).observe(tile, { subtree: true, childList: true, attributes: true, attributeFilter: ["hidden"] });
}"""


def first_index(seen: list[list[str]], part: str, text: str | re.Pattern[str]) -> int:
    """Where the tile first showed ``text`` (or a match of it) in ``part``; fails if it never did."""
    for i, (p, t) in enumerate(seen):
        if p == part and (text.search(t) if isinstance(text, re.Pattern) else t == text):
            return i
    raise AssertionError(f"the tile never showed {text!r} in .{part}: {seen}")


def banner_past_all_size(seen: list[list[str]]) -> int:
    """Checks that the tile drew phase 2 without the banner before it showed it (the daemon says the
    point of no return is passed once the loader announced all_size, after phase 2 began); returns
    where it first showed."""
    phase2 = first_index(seen, "phase", "phase 2")
    shown = first_index(seen, "no-return", "shown")
    assert phase2 < shown and ["no-return", "hidden"] in seen[phase2:shown], seen
    return shown


@pytest_twisted.ensureDeferred
async def test_the_point_of_no_return_and_a_resume_from_the_page(rig, page):
    from playwright.sync_api import expect

    run, page = page
    rig.make_image("v2.bin", "2.0.0", 200_000)
    # Phase 2 stalls after 3 replies, past the all_size notice, for 50 device seconds (10 s at this
    # time scale; the loader's watchdog would reset it at 60): the page is looked at, and the job
    # cancelled, during that stall. The stall fires once, so the resumed job runs through.
    dev = await rig.start_sim("dev", "--stall-after-reads", "3:50", "--fault-phase", "2", time_scale="0.2")
    await rig.start_daemon()
    tile = page.locator('[data-device="dev"]')
    banner = tile.locator(".no-return")

    def upgrade():
        page.goto(rig.url + "/")
        expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
        expect(tile.locator(".state")).to_have_text("idle")
        expect(page.locator("#firmware-select option")).to_contain_text("v2.bin")
        expect(banner).to_be_hidden()
        page.evaluate(RECORD_TILE, "dev")
        tile.locator(".select").check()
        page.locator("#upgrade-button").click()

    await run(upgrade)
    stall = await rig.wait_for(lambda: dev.first("fault_stall", phase=2), "the simulator's stall in phase 2")
    all_size = dev.first("all_size_sent", phase=2)
    assert all_size is not None and all_size["time"] <= stall["time"], dev.events()

    def past_the_point_of_no_return_then_cancel():
        # The device is stalled in phase 2, past all_size: the banner says so, the tile is framed.
        expect(banner).to_be_visible(timeout=WAIT_MS)
        expect(banner).to_have_text("POINT OF NO RETURN: do not power off")
        expect(tile).to_have_class(re.compile(r"\bpast-no-return\b"))
        expect(tile.locator(".phase")).to_have_text("phase 2")
        expect(tile.locator(".state")).to_have_text("running")
        seen = page.evaluate("window.netotaSeen")
        assert first_index(seen, "phase", "phase 1") < first_index(seen, "phase", "phase 2"), seen
        banner_past_all_size(seen)
        job = tile.locator(".cancel").get_attribute("data-job")
        tile.locator(".cancel").click()
        expect(tile.locator(".outcome")).to_have_text("aborted", timeout=WAIT_MS)
        expect(tile.locator(".state")).to_have_text("idle")
        expect(banner).to_be_hidden()
        expect(tile).not_to_have_class(re.compile(r"\bpast-no-return\b"))
        return job

    aborted = await run(past_the_point_of_no_return_then_cancel)
    # The STOP came during the stall: the page showed the banner while the device was past all_size.
    ended = dev.first("session_end", phase=2)
    assert ended is not None and (ended["stop_received"], ended["replies"]) == (True, 3), dev.events()

    def resume():
        # The aborted job's row offers Resume; clicking it starts a new job, whose progress and
        # outcome arrive on the tile.
        row = page.locator(f'#history tr[data-job="{aborted}"]')
        expect(row.locator(".outcome")).to_have_text("aborted", timeout=WAIT_MS)
        page.evaluate("window.netotaSeen.length = 0")
        row.locator(".resume").click()
        expect(tile.locator(".outcome")).to_have_text("succeeded", timeout=WAIT_MS)
        expect(tile.locator(".version")).to_have_text("2.0.0")
        expect(tile.locator(".state")).to_have_text("idle")
        expect(banner).to_be_hidden()
        # Resumed once: the old row offers Resume no more, and the new job's row says how it ended.
        expect(row.locator(".resume")).to_have_count(0, timeout=WAIT_MS)
        resumed = rig.api("GET", f"/v1/jobs/{aborted}")["job"]["resumed_by"]
        expect(page.locator(f'#history tr[data-job="{resumed}"] .outcome')).to_have_text("succeeded", timeout=WAIT_MS)
        return resumed, page.evaluate("window.netotaSeen")

    resumed, seen = await run(resume)
    # The new job went straight to phase 2 (the device waited in its loader), its progress was drawn,
    # the banner came back once it passed all_size again, then the outcome.
    succeeded = first_index(seen, "outcome", "succeeded")
    assert first_index(seen, "phase", "phase 2") <= first_index(seen, "progress-text", re.compile(r"\d %")) < succeeded
    assert banner_past_all_size(seen) < succeeded, seen
    assert ["phase", "phase 1"] not in seen, seen
    new = rig.api("GET", f"/v1/jobs/{resumed}")["job"]
    assert (new["resumed_from"], new["state"], new["outcome"]["kind"]) == (aborted, "finished", "succeeded")
    assert len(dev.saw("session_start", phase=1)) == 1 and dev.saw("session_end", phase=2, outcome="ok")
