"""The page's own script, run once when the page loads (`demo.load(None, js=PAGE_JS)`): listen where it happens.

- The audio player's position is drawn on every figure of the page (a thin line across the rows, moving while the
  clip plays, staying where it was paused).
- A click on a figure plays the clip from the time clicked.
- The status line stays in view while the page scrolls (CSS), and Run brings the status line, the headline and the
  figure's top into view (`SCROLL_TO_STATUS`, the Run button's own `js`).

Why a script: Gradio 6.17 gives neither by its own means. `gr.Plot` has no click or select event (only `change`),
and `gr.Audio` tells the server nothing while it plays (its `playback_position` is a start position the server may
set, and the server would only learn of a click through an event the plot does not have). The player is a
WaveSurfer whose <audio> element is never put into the page, so the script keeps a reference to each <audio> the
page creates (`document.createElement` is wrapped once) and uses the one with a clip loaded. Seeking that element
moves Gradio's waveform and time display too (WaveSurfer follows its media element's events). Plotly's own
`plotly_click` event gives the time clicked, and `_fullLayout.xaxis` maps a time to pixels. Tested in Chromium by
tests/test_app_browser.py.
"""

PAGE_CSS = """
.gradio-container { overflow: clip !important; }  /* Gradio's overflow: hidden would stop the sticky status line */
#run-status { position: sticky; top: 0; z-index: 30; background: var(--body-background-fill); padding: 2px 0; }
.moshi-ttt-cursor { position: absolute; width: 0; border-left: 2px solid rgba(220, 20, 60, 0.85);
                    pointer-events: none; z-index: 5; display: none; }
.js-plotly-plot .cartesianlayer { cursor: pointer; }
"""

PAGE_JS = (
    """() => {
  if (window.__moshiTtt) return;
  const style = document.createElement('style');
  style.textContent = """
    + repr(PAGE_CSS)
    + """;
  document.head.appendChild(style);
  const created = [];  // every <audio> the page creates (WaveSurfer keeps its own out of the page)
  const create = document.createElement.bind(document);
  document.createElement = function (tag, options) {
    const element = create(tag, options);
    if (String(tag).toLowerCase() === 'audio') created.push(new WeakRef(element));
    return element;
  };
  const media = () => {  // the clip's player: the newest <audio> with a clip loaded
    for (let i = created.length - 1; i >= 0; i--) {
      const a = created[i].deref();
      if (a && a.currentSrc && !a.currentSrc.startsWith('data:') && isFinite(a.duration) && a.duration > 0) return a;
    }
    return null;
  };
  const plots = () => Array.from(document.querySelectorAll('.js-plotly-plot'));
  const draw = (gd, t) => {  // the line at time t across the figure's rows
    let line = gd.querySelector(':scope > .moshi-ttt-cursor');
    if (!line) {
      line = document.createElement('div');
      line.className = 'moshi-ttt-cursor';
      gd.appendChild(line);
    }
    const layout = gd._fullLayout, xa = layout && layout.xaxis;
    if (t === null || !xa || !xa.range || t < xa.range[0] || t > xa.range[1] || gd.offsetParent === null) {
      line.style.display = 'none';
      return;
    }
    if (getComputedStyle(gd).position === 'static') gd.style.position = 'relative';
    line.style.left = (xa._offset + xa.l2p(t) - 1) + 'px';
    line.style.top = layout._size.t + 'px';
    line.style.height = layout._size.h + 'px';
    line.style.display = 'block';
    line.dataset.t = t.toFixed(3);
  };
  const bind = (gd) => {  // a click on the figure plays the clip from there
    if (gd.__moshiTttBound || typeof gd.on !== 'function') return;
    gd.__moshiTttBound = true;
    gd.on('plotly_click', (event) => {
      const a = media(), point = event && event.points && event.points[0];
      if (!a || !point || typeof point.x !== 'number') return;
      a.currentTime = Math.max(0, Math.min(point.x, a.duration));
      a.play().catch(() => {});
    });
  };
  window.__moshiTtt = {media, lastT: null};
  setInterval(() => {
    const a = media(), t = a ? a.currentTime : null;
    for (const gd of plots()) {
      bind(gd);
      draw(gd, t);
    }
    window.__moshiTtt.lastT = t;
  }, 100);
}"""
)


# Run's `js` (Gradio runs it before the event and sends what it returns as the event's inputs, so it hands them on):
# when the page is scrolled past the status line (the user went down to the settings), it scrolls back to it.
SCROLL_TO_STATUS = """(...values) => {
  const status = document.querySelector('#run-status');
  if (status && status.getBoundingClientRect().top < 0) {
    window.scrollTo({top: window.scrollY + status.getBoundingClientRect().top - 8, behavior: 'instant'});
  }
  return values;
}"""
