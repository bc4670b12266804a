"""The app in a real browser: Debian's chromium driven by Playwright, as a newcomer meets it at 1400 x 1000.

test_upload_run_and_read_the_plot_in_chromium: the tiny test models, an upload, a run, the plot read back.
test_the_demo_tour_in_chromium: the demo assets, in one page: the first page, a chunked run (timed), listening from
a click on the figure, the per-codebook view, a live run (timed: does the page keep pace?), Stop, Compare settings,
a 0.5 s clip, a refusal and a reopened results.json. Its screenshots land in test-output/tour_*.png and its timings
in test-output/demo_timings.json (test-output/ is git-ignored).
"""

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import soundfile as sf

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
DEMO = Path(__file__).resolve().parent.parent / "demo_assets"

pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium for the browser test (see .ci/run)")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402  (after the skip above)

from moshi_ttt.app import engine  # noqa: E402
from moshi_ttt.app.models import SharedModelRun  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]  # fmt: skip
VIEWPORT = {"width": 1400, "height": 1000}

COUNT_TRACES = """() => {
  const plot = document.querySelector('#live-plot .js-plotly-plot');
  if (!plot || !plot.data) return null;
  const drawn = (axis) => plot.data.filter(t => (t.yaxis || 'y') === axis && t.y && t.y.length).length;
  return {loss: drawn('y'), drift: drawn('y3'), inner: drawn('y4')};
}"""


def test_upload_run_and_read_the_plot_in_chromium(server, assets):
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            # Not "networkidle": the app's session heartbeat (for demo.unload) keeps a stream open.
            page.goto(server, wait_until="load")
            upload = page.locator("#clip-audio input[type=file]")
            upload.wait_for(state="attached", timeout=30_000)
            upload.set_input_files(str(assets / "a.wav"))
            page.wait_for_selector("#clip-audio audio", state="attached", timeout=60_000)  # the upload finished
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_function("() => document.querySelector('#run-status').innerText.startsWith('Done')",
                                   timeout=90_000)  # fmt: skip
            page.wait_for_selector("text=a_results", timeout=30_000)  # Gradio shows stem and extension apart
            counts = page.evaluate(COUNT_TRACES)
        finally:
            browser.close()
    assert counts["loss"] == 4  # baseline and TTT, each raw (faint) and smoothed (bold)
    assert counts["drift"] == 4  # two TTT layers, W1 and W2 each
    assert counts["inner"] == 2 * 3  # two layers: at W_base, at the mini-batch start, after the update


# In-page recorder, installed before the page's scripts: wraps Plotly.react (Gradio re-creates the plot and calls
# it at each update) and notes, after each call on the live figure with curves, the time, the curves' length,
# whether the plot is visible and not covered (the element at its top row belongs to it), its rows and their
# drawn subplots. Polling with a timer would undercount: while the page redraws back to back, Chromium runs timers
# late.
RECORDER = """(() => {
  window.__frames = []; window.__t0 = performance.now();
  let plotly;
  const record = () => {
    const p = document.querySelector('#live-plot .js-plotly-plot');
    if (!p || !p.data || !p.data.length) return;
    const n = (p.data[0].y || []).length;
    const last = window.__frames[window.__frames.length - 1];
    if (n === 0 || (last && last.n === n)) return;
    const r = p.getBoundingClientRect();
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + 120);
    window.__frames.push({t: performance.now() - window.__t0, n,
                          visible: r.top >= 0 && r.top + 200 <= window.innerHeight && !!hit && p.contains(hit),
                          rows: new Set(p.data.map(t => t.yaxis || 'y')).size,
                          drawn: p.querySelectorAll('.cartesianlayer .subplot').length,
                          status: (document.querySelector('#run-status') || {}).innerText || ''});
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
IN_VIEW = """(selector) => { const e = document.querySelector(selector); if (!e) return false;
  const r = e.getBoundingClientRect(); return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight; }"""


def _tokens(status: str) -> tuple[int, int] | None:
    match = re.search(r"(\d+) / (\d+) tokens", status)
    return (int(match.group(1)), int(match.group(2))) if match else None


class _PacedRun(SharedModelRun):
    """A scoring step that takes at least STEP_FLOOR_S: the tour's live run must last long enough for the page's
    pacing to be seen and for Stop to land mid-run, however fast the machine scores the demo models: 0.19 s per
    step makes the live run of the 610-token demo clip (61 steps) last at least 11.6 s, ten or more figure updates."""

    STEP_FLOOR_S = 0.19

    def __next__(self):
        start = time.monotonic()
        try:
            return super().__next__()
        finally:
            time.sleep(max(0.0, self.STEP_FLOOR_S - (time.monotonic() - start)))


@pytest.fixture(scope="module")
def demo_server():
    if not (DEMO / "ttt").is_dir():
        pytest.skip("demo_assets/ is not built")
    from conftest import free_port

    import app
    from moshi_ttt.app.demo_assets import example_clips
    from moshi_ttt.app.models import ModelCache, build_allow_list

    cache = ModelCache(build_allow_list([DEMO], use_env=False))
    demo = app.build_demo(cache, example_clips(DEMO))
    demo.queue(default_concurrency_limit=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "SharedModelRun", _PacedRun)  # a run as long on a fast CI machine as on a slow one
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
        yield url
        demo.close()


def _screenshot(page, name: str) -> None:
    """A PNG of the viewport through the DevTools protocol: Playwright's own screenshot waits for document.fonts,
    which can take longer than its timeout while the page redraws the plot on a busy 2-core machine."""
    cdp = page.context.new_cdp_session(page)
    try:
        shot = cdp.send("Page.captureScreenshot", {"format": "png"})
    finally:
        cdp.detach()
    (OUTPUT / f"tour_{name}.png").write_bytes(base64.b64decode(shot["data"]))


def _close_toasts(page) -> None:
    """Closes Gradio's error toasts (a refusal's), which would cover the next screenshot's corner."""
    for button in page.locator(".toast-close").all():
        button.click()


def _status(page, selector: str = "#run-status") -> str:
    return page.locator(selector).inner_text()


def _wait_status(page, text: str, timeout_s: float = 240, selector: str = "#run-status") -> float:
    """Seconds until the status line contains `text`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if text in _status(page, selector):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never came; the status says {_status(page, selector)!r}")


def _wait_changed(page, before: str, timeout_s: float = 240) -> None:
    """Until the status line differs from `before`: a run started. Its "Working" may last less than one poll on a
    loaded machine, so the change is what is waited for, not that word."""
    start = time.monotonic()
    while _status(page) == before:
        assert time.monotonic() - start < timeout_s, f"the status stayed {before!r}"
        time.sleep(0.05)


def _upload(page, clip: Path) -> None:
    clear = page.locator("#clip-audio button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
        page.wait_for_selector("#clip-audio input[type=file]", state="attached", timeout=30_000)
    page.locator("#clip-audio input[type=file]").set_input_files(str(clip))
    page.wait_for_selector("#clip-audio audio", state="attached", timeout=60_000)  # the upload finished
    page.wait_for_timeout(500)


def _run(page, mode: str, until: str = "Done") -> dict:
    """Selects `mode`, presses Run and waits for `until`: what the recorder saw and when (s from the click)."""
    page.get_by_label(mode, exact=True).check()
    page.evaluate(START_RECORDING)
    before = _status(page)
    page.get_by_role("button", name="Run", exact=True).click()
    _wait_changed(page, before)  # the previous run's status is gone
    done_s = _wait_status(page, until)
    page.wait_for_timeout(500)  # the last frame's record
    return {"frames": page.evaluate("() => window.__frames"), "done_s": done_s, "status": _status(page)}


def _scored_s(status: str) -> float:
    """The server's scoring time from "Done: ... in 12.3 s."."""
    return float(re.search(r"in ([0-9.]+) s\.", status).group(1))


def test_the_demo_tour_in_chromium(demo_server, tmp_path):
    OUTPUT.mkdir(exist_ok=True)
    from conftest import SR, speechlike

    short, silent = tmp_path / "short_clip.wav", tmp_path / "silent_clip.wav"
    sf.write(short, speechlike(0.5, 5), SR)
    sf.write(silent, np.zeros(3 * SR, dtype=np.float32), SR)
    seen: dict = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.add_init_script(RECORDER)
            page.goto(demo_server, wait_until="load")
            page.get_by_role("button", name="Run", exact=True).wait_for()
            page.wait_for_selector("#live-plot .js-plotly-plot", timeout=60_000)  # the empty frame: plotly loaded
            # 1. First page: what it shows, where to start, Run above the fold.
            seen["intro"] = page.locator("#intro").inner_text()
            seen["run_in_view"] = page.evaluate(IN_VIEW, "#run-button")
            seen["status_in_view"] = page.evaluate(IN_VIEW, "#run-status")
            _screenshot(page, "01_first_page")
            # 2. The demo clip, chunked, timed from the click: the first plot with curves and "Done".
            page.get_by_role("button", name="demo_repeat.wav").first.click()
            page.wait_for_selector("#clip-audio audio", state="attached", timeout=60_000)
            page.wait_for_timeout(1000)
            seen["chunked"] = _run(page, "chunked")
            seen["headline"] = page.locator("#headline").inner_text()
            seen["readings"] = page.locator("#readings").inner_text()
            page.wait_for_selector("text=demo_repeat_results", timeout=30_000)
            href = page.locator("#downloads a[href*='demo_repeat_results.json']").first.get_attribute("href")
            seen["png_name"] = page.evaluate("""() => document.querySelector('#live-plot .js-plotly-plot')
                ._context.toImageButtonOptions.filename""")
            reopened = tmp_path / "cluster_run_results.json"  # kept now (the session's next run deletes its folder)
            reopened.write_bytes(Path(unquote(href.split("file=", 1)[1])).read_bytes())
            _screenshot(page, "02_chunked")
            # 3. Listen where it happens: a click on the figure at 30 s plays from there, the line follows.
            at = page.evaluate("""() => { const gd = document.querySelector('#live-plot .js-plotly-plot');
                const xa = gd._fullLayout.xaxis, r = gd.getBoundingClientRect();
                return [r.left + xa._offset + xa.l2p(30), r.top + gd._fullLayout._size.t + 60]; }""")
            page.mouse.click(*at)
            page.wait_for_timeout(1200)
            seen["listen"] = page.evaluate("""() => { const a = window.__moshiTtt.media();
                const line = document.querySelector('#live-plot .moshi-ttt-cursor');
                return {time: a && a.currentTime, paused: a && a.paused, line: line && +line.dataset.t,
                        shown: !!line && line.style.display === 'block'}; }""")
            _screenshot(page, "03_listen")
            page.evaluate("() => window.__moshiTtt.media().pause()")
            # 4. The per-codebook view of the same run.
            page.get_by_role("tab", name="Per codebook").click()
            page.wait_for_selector("#codebook-plot .js-plotly-plot", timeout=30_000)
            page.wait_for_timeout(800)
            seen["codebooks"] = page.locator("#codebook-table").inner_text()
            _screenshot(page, "04_per_codebook")
            page.get_by_role("tab", name="Figure").click()
            # 5. Live, token by token: the plot visible from its first frame, the page at the scoring's pace.
            page.get_by_label("live token by token", exact=True).check()
            page.evaluate(START_RECORDING)
            before = _status(page)
            page.get_by_role("button", name="Run", exact=True).click()
            start = time.monotonic()
            _wait_changed(page, before)
            while not _status(page).startswith("Scoring") or _tokens(_status(page))[0] < 380:
                assert time.monotonic() - start < 240, _status(page)
                time.sleep(0.05)
            seen["live_top_row_in_view"] = page.evaluate(IN_VIEW, "#run-status")
            _screenshot(page, "05_live")
            seen["live_done_s"] = time.monotonic() - start + _wait_status(page, "Done")
            page.wait_for_timeout(500)
            seen["live"] = {"frames": page.evaluate("() => window.__frames"), "status": _status(page)}
            # 6. Stop mid-run: partial figure, headline, table and downloads.
            before = _status(page)
            page.get_by_role("button", name="Run", exact=True).click()
            _wait_changed(page, before)
            while not _status(page).startswith("Scoring") or _tokens(_status(page))[0] < 330:
                time.sleep(0.05)
            page.get_by_role("button", name="Stop", exact=True).click()
            _wait_status(page, "Stopped after")
            page.wait_for_selector("text=demo_repeat_partial_results", timeout=30_000)
            seen["stopped_headline"] = page.locator("#headline").inner_text()
            seen["stopped_summary"] = page.locator("#summary").inner_text()
            _screenshot(page, "06_stopped")
            # 7. Compare settings: mini_batch_size 4 and 16, persistence on and off, in one figure and a table.
            page.get_by_role("tab", name="Compare settings").click()
            page.get_by_label("64", exact=True).uncheck()
            page.get_by_role("button", name="Compare", exact=True).click()
            _wait_status(page, "Done: 4 of 4 settings", selector="#compare-status")
            page.wait_for_timeout(1000)
            page.locator("#compare-table").scroll_into_view_if_needed()  # (Gradio renders the rows in view)
            page.wait_for_timeout(500)
            seen["compare_table"] = page.locator("#compare-table").inner_text()
            page.evaluate("() => window.scrollTo(0, 0)")
            seen["compare_traces"] = page.evaluate("""() => document.querySelector('#compare-plot .js-plotly-plot')
                .data.filter(t => t.yaxis === 'y').map(t => t.name)""")
            _screenshot(page, "07_compare")
            page.get_by_role("tab", name="Figure").click()
            # 8. A 0.5 s clip: the figure says why its lower rows are empty, the headline has a caveat.
            _upload(page, short)
            _run(page, "chunked")
            seen["short_notes"] = page.evaluate("""() => document.querySelector('#live-plot .js-plotly-plot')
                .layout.annotations.map(a => a.text)""")
            seen["short_headline"] = page.locator("#headline").inner_text()
            _screenshot(page, "08_short_clip")
            # 9. A refusal: the status line says why, no "Working…" left behind.
            _upload(page, silent)
            page.get_by_role("button", name="Run", exact=True).click()
            _wait_status(page, "Not scored")  # (the short clip's status said "Done")
            page.wait_for_timeout(800)
            seen["refusal"] = _status(page)
            _screenshot(page, "09_refusal")
            # 10. Reopen the chunked run's results.json: the same headline, no rescoring.
            page.get_by_text("Open a results.json (no rescoring)").click()
            page.locator("input[type=file][accept*='.json']").set_input_files(str(reopened))
            page.wait_for_timeout(1500)
            page.get_by_role("button", name="Open", exact=True).click()
            _wait_status(page, "Opened")
            _close_toasts(page)
            page.wait_for_timeout(1000)
            seen["reopened_headline"] = page.locator("#headline").inner_text()
            seen["reopened_status"] = _status(page)
            page.evaluate("() => window.scrollTo(0, 0)")
            _screenshot(page, "10_reopened")
        finally:
            browser.close()

    assert "tiny demo models" in seen["intro"] and "Start here" in seen["intro"] and "not Moshi 7B" in seen["intro"]
    assert seen["run_in_view"] and seen["status_in_view"]  # Run above the fold at 1400 x 1000
    from moshi_ttt.reports.headline import readings_for

    tokens = -(-sf.info(DEMO / "demo_repeat.wav").frames // 1920)  # whole codec frames, the last one padded
    spans = [f"{r.start_s:.1f}-{r.end_s:.1f}" for r in readings_for(DEMO / "demo_repeat.wav")]
    chunked = seen["chunked"]
    assert chunked["status"].startswith(f"Done: {tokens} / {tokens} tokens"), chunked["status"]
    curves = [f for f in chunked["frames"] if f["n"] > 0]
    assert curves and curves[0]["visible"] and max(f["rows"] for f in curves) == 4
    assert re.search(rf"2nd \({spans[1]} s\) [0-9.]+% (lower|higher)", seen["headline"]), seen["headline"]
    assert len(spans) == 3 and all(span in seen["readings"] for span in spans)
    assert seen["png_name"] == "demo_repeat_moshi_ttt"  # the camera button's PNG is named after the clip
    listen = seen["listen"]
    assert listen["shown"] and not listen["paused"] and 29.5 <= listen["time"] <= 33.0, listen
    assert abs(listen["line"] - listen["time"]) < 0.6, listen
    assert "semantic (codebook 0)" in seen["codebooks"] and "acoustic (codebooks 1-7)" in seen["codebooks"]
    live = seen["live"]
    assert live["status"].startswith("Done") and seen["live_top_row_in_view"]
    frames = live["frames"]
    assert len(frames) >= 10 and all(f["visible"] for f in frames) and max(f["drawn"] for f in frames) >= 4
    assert "(stopped)" in seen["stopped_headline"] and "(partial)" in seen["stopped_summary"]
    names = [f"ttt · b={b} · {p}" for b in (4, 16) for p in ("persistent", "reset every window")]
    assert seen["compare_traces"] == [*names, "baseline"]
    assert seen["compare_table"].count("ttt · b=") == 4
    assert sum("No fast-weight update: the clip has 7 tokens" in n for n in seen["short_notes"]) == 2
    assert "Caveat" in seen["short_headline"]
    assert "Not scored: silent_clip.wav is silent" in seen["refusal"] and "Working" not in seen["refusal"]
    assert seen["reopened_status"].startswith("Opened cluster") and "nothing rescored" in seen["reopened_status"]
    assert seen["reopened_headline"] == seen["headline"]

    live_scored_s = _scored_s(live["status"])
    timings = {
        "chunked": {
            "first_plot_with_curves_s": round(curves[0]["t"] / 1000, 2),
            "done_s": round(chunked["done_s"], 2),
            "server_scoring_s": _scored_s(chunked["status"]),
            "frames": len(curves),
        },
        "live": {
            "first_plot_with_curves_s": round(frames[0]["t"] / 1000, 2),
            "done_s": round(seen["live_done_s"], 2),
            "server_scoring_s": live_scored_s,
            "page_behind_scoring_s": round(seen["live_done_s"] - live_scored_s, 2),
            "frames": len(frames),
            "longest_gap_between_frames_s": round(
                max(b["t"] - a["t"] for a, b in zip(frames, frames[1:], strict=False)) / 1000, 2
            ),  # fmt: skip
        },
        "load_average": os.getloadavg(),
    }
    (OUTPUT / "demo_timings.json").write_text(json.dumps(timings, indent=1))
    print(json.dumps(timings))
    # The page keeps pace: it is "Done" within a few seconds of the scoring (encoding the clip comes first).
    assert timings["live"]["page_behind_scoring_s"] < 8, timings
