"""Headless Chromium under Playwright, for the browser tests.

``require()`` at the top of a test module skips the module when Chromium
(Debian's ``chromium``, which .ci/run installs) or the playwright package is
missing, and returns playwright's sync API; ``launch(sync_api)`` is the body
of the module's ``browser`` fixture: one browser per module, no download.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 30_000        # a bound for any one step: generous, never an assertion of speed


def require() -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium)",
                    allow_module_level=True)
    return pytest.importorskip("playwright.sync_api",
                               reason="the browser tests need the playwright package")


def launch(sync_api: Any) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()
