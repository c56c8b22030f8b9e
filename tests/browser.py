"""Headless Chromium for the dashboard's browser tests: Debian's ``chromium`` driven by Playwright
for Python (``executable_path``; never ``playwright install``, which downloads a browser build).

:func:`missing` says what is missing, or None. ``tests/test_dashboard_browser.py`` fails with
:data:`HOW_TO_GET_ONE` when the browser or Playwright is missing, unless ``NETOTA_SKIP_BROWSER_TESTS=1``
is set (then its tests are skipped, with that reason).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

#: The browser binary (Debian's package installs it here); NETOTA_CHROMIUM overrides it.
CHROMIUM = os.environ.get("NETOTA_CHROMIUM", "/usr/bin/chromium")
#: Headless, no sandbox (CI runs as root), and nothing that reaches the network on its own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SKIP_VARIABLE = "NETOTA_SKIP_BROWSER_TESTS"
HOW_TO_GET_ONE = (
    "the dashboard's browser tests need headless Chromium and Playwright for Python: "
    "`apt-get install -y chromium` (Debian; .ci/run does this as root) and `make install` (installs the "
    "playwright package; never run `playwright install`). Set NETOTA_CHROMIUM=/path/to/chromium for another "
    f"binary, or {SKIP_VARIABLE}=1 to skip these tests on purpose."
)


def missing() -> str | None:
    """What the browser tests lack here, or None."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and shutil.which(CHROMIUM) is None:
        return f"no Chromium at {CHROMIUM}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None


def skipped_on_purpose() -> bool:
    return os.environ.get(SKIP_VARIABLE, "") not in ("", "0")


def launch(playwright: object) -> object:
    """A headless Chromium browser from a started ``sync_playwright()``. Its home, config and cache
    are a temporary directory (removed when the tests end), not the user's ~/.config and ~/.cache."""
    home = tempfile.mkdtemp(prefix="netota-chromium-")
    atexit.register(shutil.rmtree, home, True)
    env = {**os.environ, "HOME": home, "XDG_CONFIG_HOME": f"{home}/config", "XDG_CACHE_HOME": f"{home}/cache"}
    return playwright.chromium.launch(  # type: ignore[attr-defined]
        executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True, env=env
    )
