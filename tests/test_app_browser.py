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
  const drift = plot.data.filter(t => t.xaxis === 'x3').length;
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
            page.wait_for_selector("audio", state="attached", timeout=60_000)  # the upload finished
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_function(
                "() => { const p = document.querySelector('.js-plotly-plot');"
                " return p && p.data && p.data.some(t => t.xaxis === 'x3'); }",
                timeout=90_000,
            )
            page.wait_for_function("() => document.querySelector('#run-status').innerText.startsWith('Done')",
                                   timeout=90_000)  # fmt: skip
            page.screenshot(path=str(OUTPUT / "app_browser.png"), full_page=True)
            page.wait_for_selector("text=a_results", timeout=30_000)  # Gradio shows stem and extension apart
            counts = page.evaluate(COUNT_TRACES)
        finally:
            browser.close()
    assert counts["loss"] == 4  # baseline and TTT, each raw (faint) and smoothed (bold)
    assert counts["drift"] == 4  # two TTT layers, W1 and W2 each


DEMO = Path(__file__).resolve().parent.parent / "demo_assets"

# In-page recorder, installed before the page's scripts: wraps Plotly.react (Gradio's Plot calls it once or twice per
# update) and notes, after each call, the time, the plot's length, whether the plot is visible and not covered (the
# element at its centre belongs to it), how many rows it has and draws. Polling with a timer would undercount: while
# the page redraws back to back, Chromium runs timers late.
RECORDER = """(() => {
  window.__frames = []; window.__t0 = performance.now();
  let plotly;
  const record = () => {
    const p = document.querySelector('#live-plot .js-plotly-plot');
    if (!p || !p.data || !p.data.length) return;
    const n = (p.data[0].y || []).length;
    const last = window.__frames[window.__frames.length - 1];
    if (last && last.n === n) return;
    const r = p.getBoundingClientRect();
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 3);
    window.__frames.push({t: performance.now() - window.__t0, n, visible: r.height > 200 && !!hit && p.contains(hit),
                          rows: new Set(p.data.map(t => t.yaxis || 'y')).size,
                          drawn: p.querySelectorAll('.cartesianlayer .subplot').length});
  };
  Object.defineProperty(window, 'Plotly', {configurable: true, get: () => plotly, set: (value) => {
    plotly = value;
    if (!value || typeof value.react !== 'function' || value.__recorded) return;
    const react = value.react;
    value.__recorded = true;
    value.react = function (...args) {
      const out = react.apply(this, args);
      Promise.resolve(out).then(record, () => {});
      return out;
    };
  }});
})()"""
START_RECORDING = "() => { window.__frames = []; window.__t0 = performance.now(); }"


def _tokens(status: str) -> tuple[int, int] | None:
    import re

    match = re.search(r"(\d+) / (\d+) tokens", status)
    return (int(match.group(1)), int(match.group(2))) if match else None


@pytest.fixture(scope="module")
def demo_server():
    if not (DEMO / "ttt").is_dir():
        pytest.skip("demo_assets/ is not built")
    import app
    from moshi_ttt.app.demo_assets import example_clips
    from moshi_ttt.app.models import ModelCache, build_allow_list

    cache = ModelCache(build_allow_list([DEMO], use_env=False))
    demo = app.build_demo(cache, example_clips(DEMO))
    demo.queue(default_concurrency_limit=2)
    from conftest import free_port

    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield url
    demo.close()


def _screenshot(page, name: str) -> None:
    """A PNG of the (tall) viewport through the DevTools protocol: Playwright's own screenshot waits for
    document.fonts, which can take longer than its timeout while the page redraws the plot on a busy 2-core machine,
    and a full-page capture resizes the page, which makes the responsive plot redraw again."""
    import base64

    cdp = page.context.new_cdp_session(page)
    try:
        shot = cdp.send("Page.captureScreenshot", {"format": "png"})
    finally:
        cdp.detach()
    (OUTPUT / f"demo_{name}.png").write_bytes(base64.b64decode(shot["data"]))


def _run_demo_clip(page, mode: str, shots: dict[str, float]) -> dict:
    """Selects `mode`, presses Run, takes the screenshots in `shots` (name -> fraction of the clip scored) and
    returns what the recorder saw, with the wall times (ms from the click)."""
    import time

    page.get_by_label(mode, exact=True).check()
    page.evaluate(START_RECORDING)
    page.get_by_role("button", name="Run", exact=True).click()
    start = time.monotonic()
    pending = dict(sorted(shots.items(), key=lambda kv: kv[1]))
    shot_at: dict[str, float] = {}
    while time.monotonic() - start < 240:
        status = page.locator("#run-status").inner_text()
        progress = _tokens(status)
        for name, fraction in list(pending.items()):
            if progress and progress[0] >= fraction * progress[1] and fraction < 1:
                _screenshot(page, name)
                shot_at[name] = round(progress[0] / progress[1], 2)  # what the status said just before the shot
                del pending[name]
        if status.startswith("Done"):
            break
        time.sleep(0.05)
    end_ms = (time.monotonic() - start) * 1000
    page.wait_for_timeout(500)  # the last frame's record
    frames = page.evaluate("() => window.__frames")
    for name in pending:
        _screenshot(page, name)
    return {"frames": frames, "end_ms": end_ms, "status": page.locator("#run-status").inner_text(), "shots": shot_at}


def test_demo_clip_live_plot_is_visible_at_once_and_grows(demo_server):
    """Upload demo_repeat.wav, run it live token by token: the plot is visible (not covered) within 2 s of the first
    update, has >= 3 rows, grows through many frames; then the per-reading table appears. Chunked mode too. The
    measurements land in test-output/demo_timings.json, the screenshots next to it."""
    import json

    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1800})  # the whole app, for the screenshots
            page.add_init_script(RECORDER)
            page.goto(demo_server, wait_until="load")
            page.get_by_role("button", name="Run", exact=True).wait_for()
            page.locator("input[type=file]").first.set_input_files(str(DEMO / "demo_repeat.wav"))
            page.wait_for_selector("audio", state="attached", timeout=60_000)  # the upload finished
            live = _run_demo_clip(page, "live token by token", {"live_25pct": 0.25, "live_50pct": 0.5, "live_end": 1})
            page.wait_for_selector("#readings table", timeout=30_000)
            readings_text = page.locator("#readings").inner_text()
            headline = page.locator("#headline").inner_text()
            chunked = _run_demo_clip(page, "chunked", {"chunked_end": 1})
            # Stop mid-run: the figure stays, the table says "(partial)", the downloads are the partial ones.
            page.get_by_label("live token by token", exact=True).check()
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_function("() => document.querySelector('#run-status').innerText.startsWith('Scoring')",
                                   timeout=60_000)  # fmt: skip
            page.get_by_role("button", name="Stop", exact=True).click()
            page.wait_for_function("() => document.querySelector('#run-status').innerText.startsWith('Stopped')",
                                   timeout=60_000)  # fmt: skip
            page.wait_for_selector("text=demo_repeat_partial_results", timeout=30_000)
            stopped_table = page.get_by_text("(partial)").count()
            _screenshot(page, "stopped")
        finally:
            browser.close()
    assert live["status"].startswith("Done") and chunked["status"].startswith("Done"), live["status"]
    frames = live["frames"]
    first = frames[0]
    visible = next(f for f in frames if f["visible"])
    assert visible["t"] - first["t"] <= 2000, (first, visible)
    assert max(f["rows"] for f in frames) >= 3 and max(f["drawn"] for f in frames) >= 3
    assert all(span in readings_text for span in ("0.6-15.3", "21.3-35.9", "45.2-59.8")), readings_text
    assert "TTT vs baseline" in headline
    assert stopped_table >= 2  # both runs' rows
    timings = {
        mode: {
            "first_visible_plot_s": round(next(f["t"] for f in run["frames"] if f["visible"]) / 1000, 2),
            "frames": len(run["frames"]),
            "end_to_end_s": round(run["end_ms"] / 1000, 2),
            "frames_per_minute": round(len(run["frames"]) / (run["end_ms"] / 60_000), 1),
            "screenshots_at_fraction": run["shots"],
        }
        for mode, run in (("live", live), ("chunked", chunked))
    }
    (OUTPUT / "demo_timings.json").write_text(json.dumps(timings, indent=1))
    print(json.dumps(timings))
    assert timings["live"]["frames"] >= 10 and timings["chunked"]["frames"] >= 5
