"""The app in a real browser: Debian's chromium driven by Playwright uploads a clip, runs, and reads the plot.

The screenshot lands in test-output/app_browser.png (git-ignored).
"""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"

pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium for the browser test (see .ci/run)")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402  (after the skip above)

CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

COUNT_TRACES = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot.data) return null;
  const loss = plot.data.filter(t => (t.xaxis || 'x') === 'x').length;
  const drift = plot.data.filter(t => t.xaxis === 'x2').length;
  const tables = document.querySelectorAll('table').length;
  return {loss, drift, tables};
}"""


def test_upload_run_and_read_the_plot_in_chromium(server, assets):
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # Not "networkidle": the app's session heartbeat (for demo.unload) keeps a stream open.
            page.goto(server, wait_until="load")
            upload = page.locator("input[type=file]").first
            upload.wait_for(state="attached", timeout=30_000)
            upload.set_input_files(str(assets / "a.wav"))
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_function(
                "() => { const p = document.querySelector('.js-plotly-plot');"
                " return p && p.data && p.data.some(t => t.xaxis === 'x2'); }",
                timeout=90_000,
            )
            page.wait_for_selector("text=results.json", timeout=90_000)
            counts = page.evaluate(COUNT_TRACES)
            page.screenshot(path=str(OUTPUT / "app_browser.png"), full_page=True)
        finally:
            browser.close()
    assert counts["loss"] == 4  # baseline and TTT, each raw (faint) and smoothed (bold)
    assert counts["drift"] == 4  # two TTT layers, W1 and W2 each
