"""The app's live figure: four rows on one shared time axis.

1. per-token loss of both models: thin raw lines and bold smoothed ones, the baseline dashed and drawn on top, so
   both stay visible where they coincide;
2. TTT - baseline: the smoothed per-token difference (below 0: TTT predicts better), a zero line and the running
   (cumulative) mean of the difference since the start of the clip;
3. fast-weight drift ||W - W_base|| / ||W_base|| per TTT layer (W1 solid, W2 dotted);
4. the inner loop per TTT layer: reconstruction loss at W_base, at the mini-batch start and after its update, and
   the variance of the target ||E[Y] - Y||^2 when the record has it (the four TTT stats of ttt-lm-jax).

The figure is built as a plain Plotly dict (`figure_dict`): the app sends it as JSON (`figure_json`) at every live
update, which costs about a millisecond, where building it through plotly's validated objects cost ~100 ms per
update. Evenly spaced curves are sent as `x0`/`dx` with no x array, which halves the JSON. `live_figure` wraps the
same dict in a `go.Figure`.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import plotly.graph_objects as go

from moshi_ttt.reports.figures import FRAME_RATE, moving_average

RUN_COLORS = {"baseline": "#1f3fbf", "ttt": "#ef553b"}
RUN_LABELS = {"baseline": "baseline", "ttt": "TTT"}
RUN_DASH = {"baseline": "dash", "ttt": "solid"}
LAYER_COLORS = ("#00a67d", "#ab63fa", "#ff8c1a", "#19b3e3", "#ff6692", "#7cae3b", "#d65fd6", "#c9a000")
INNER_DASH = {"base": "dot", "start": "dash", "after": "solid", "target_variance": "longdashdot"}
INNER_LABELS = {"base": "at W_base", "start": "at start", "after": "after update", "target_variance": "target var"}
DIFF_COLOR, CUMULATIVE_COLOR = "#444444", "#b8860b"
UIREVISION = "moshi-ttt-live"  # constant: zoom and pan survive the updates
ROWS = (  # (title, y-axis title), top to bottom
    ("Per-token loss (thin: raw, bold: 2 s moving average)", "nats"),
    ("TTT − baseline (below 0: TTT better)", "Δ nats"),
    ("TTT fast-weight drift ||W − W_base|| / ||W_base||  (W1 solid, W2 dotted)", "drift"),
    ("Inner loop per mini-batch: reconstruction loss and target variance", "inner loss"),
)
ROW_GAP = 0.06  # fraction of the plot height between rows (room for the row titles)
DECIMALS = 5  # values are rounded in the JSON (losses of ~5 nats: 1e-5 is far below what a plot shows)


def _row_domains(rows: int = len(ROWS)) -> list[list[float]]:
    """Vertical [bottom, top] of each row, top row first."""
    height = (1.0 - ROW_GAP * (rows - 1)) / rows
    bounds = [[1.0 - (i + 1) * height - i * ROW_GAP, 1.0 - i * height - i * ROW_GAP] for i in range(rows)]
    return [[max(0.0, round(lo, 6)), min(1.0, round(hi, 6))] for lo, hi in bounds]


def _axis(row: int) -> str:
    return "" if row == 0 else str(row + 1)


def figure_dict(
    loss_per_token: dict[str, list[float]],
    drift: dict[str, dict],
    smooth: int = 25,
    total_tokens: int | None = None,
    inner_loss: dict[str, dict] | None = None,
) -> dict:
    """The four rows sharing the time axis (seconds), as a Plotly figure dict.

    Args:
        loss_per_token: run ("baseline", "ttt") -> per-token loss so far (NaN or None where invalid).
        drift: TTT layer -> {"W1": [...], "W2": [...], "t": [token of each update]} (results.json "drift").
        smooth: moving-average window in tokens (rows 1 and 2).
        total_tokens: fixes the x range to the whole clip, so the curves grow into a stable frame.
        inner_loss: TTT layer -> {"base", "start", "after", optional "target_variance", "t"} (results.json).
    Returns:
        {"data": [...], "layout": {...}} of JSON types (no template: plotly's default applies).
    """
    data = []
    step = 1.0 / FRAME_RATE
    for run in sorted(loss_per_token, key=lambda r: r == "baseline"):  # the baseline last: drawn on top
        y = np.asarray([np.nan if v is None else v for v in loss_per_token[run]], dtype=np.float64)
        color, label, dash = RUN_COLORS.get(run, "#7f7f7f"), RUN_LABELS.get(run, run), RUN_DASH.get(run, "solid")
        common = {"type": "scatter", "x0": 0.0, "dx": step, "mode": "lines", "legendgroup": run, "xaxis": "x",
                  "yaxis": "y", "hovertemplate": "%{y:.3f} nats at %{x:.2f} s"}  # fmt: skip
        data.append({**common, "y": _finite_or_none(y), "name": f"{label} (per token)",
                     "line": {"color": color, "width": 1}, "opacity": 0.3, "showlegend": False})  # fmt: skip
        data.append({**common, "y": _finite_or_none(moving_average(y, smooth)), "name": label,
                     "line": {"color": color, "width": 2.5, "dash": dash}})  # fmt: skip
    difference = _difference_traces(loss_per_token, smooth, step)
    data += difference
    layers = sorted(drift, key=int)
    for i, layer in enumerate(layers):
        record = drift[layer]
        x = (np.asarray(record["t"], dtype=np.float64) / FRAME_RATE).tolist()
        color = LAYER_COLORS[i % len(LAYER_COLORS)]
        for name, dash in (("W1", "solid"), ("W2", "dot")):
            data.append({
                "type": "scatter", "x": x, "y": _finite_or_none(record[name]), "mode": "lines",
                "name": f"layer {layer} {name}", "legendgroup": f"layer {layer}",
                "line": {"color": color, "dash": dash}, "hovertemplate": "%{y:.4f} at %{x:.2f} s",
                "xaxis": "x3", "yaxis": "y3",
            })  # fmt: skip
    for i, layer in enumerate(sorted(inner_loss or {}, key=int)):
        record = inner_loss[layer]
        x = (np.asarray(record["t"], dtype=np.float64) / FRAME_RATE).tolist()
        color = LAYER_COLORS[i % len(LAYER_COLORS)]
        for key, dash in INNER_DASH.items():
            if record.get(key) is None:  # target_variance only in records that carry it
                continue
            data.append({
                "type": "scatter", "x": x, "y": _finite_or_none(record[key]), "mode": "lines",
                "name": f"layer {layer} {INNER_LABELS[key]}", "legendgroup": f"layer {layer}",
                "line": {"color": color, "dash": dash, "width": 1.5}, "showlegend": i == 0 or key == "after",
                "hovertemplate": "%{y:.4f} at %{x:.2f} s", "xaxis": "x4", "yaxis": "y4",
            })  # fmt: skip
    layout = _layout(total_tokens, has_ttt=bool(layers or inner_loss))
    if difference:
        # The smoothed curve after its first window, the running mean after four (it settles more slowly).
        layout["yaxis2"]["range"] = _difference_range([difference[0]["y"][smooth:], difference[1]["y"][4 * smooth :]])
    return {"data": data, "layout": layout}


def _difference_range(curves: list[list]) -> list[float]:
    """Row 2's y range: 1st to 99th percentile of the curves' values (0 included).

    The first tokens' differences (a window of a few tokens, often several nats) would otherwise flatten the rest
    of the row (zooming out on the axis still shows them).
    """
    values = np.asarray([v for curve in curves for v in curve if v is not None], dtype=np.float64)
    if values.size == 0:
        return [-0.1, 0.1]
    lo, hi = min(float(np.quantile(values, 0.01)), 0.0), max(float(np.quantile(values, 0.99)), 0.0)
    pad = max(0.15 * (hi - lo), 0.01)
    return [round(lo - pad, DECIMALS), round(hi + pad, DECIMALS)]


def _difference_traces(loss_per_token: dict[str, list[float]], smooth: int, step: float) -> list[dict]:
    """Row 2: TTT - baseline, smoothed, with its running mean and a zero line; [] without both runs."""
    if "baseline" not in loss_per_token or "ttt" not in loss_per_token:
        return []
    base = np.asarray([np.nan if v is None else v for v in loss_per_token["baseline"]], dtype=np.float64)
    ttt = np.asarray([np.nan if v is None else v for v in loss_per_token["ttt"]], dtype=np.float64)
    n = min(base.size, ttt.size)
    diff = ttt[:n] - base[:n]  # [n] NaN where either is invalid
    finite = np.isfinite(diff)
    count = np.cumsum(finite)
    cumulative = np.where(count > 0, np.cumsum(np.where(finite, diff, 0.0)) / np.maximum(count, 1), np.nan)
    common = {"type": "scatter", "x0": 0.0, "dx": step, "mode": "lines", "xaxis": "x2", "yaxis": "y2"}
    return [
        {**common, "y": _finite_or_none(moving_average(diff, smooth)), "name": "TTT − baseline (2 s average)",
         "line": {"color": DIFF_COLOR, "width": 2}, "fill": "tozeroy", "fillcolor": "rgba(68,68,68,0.12)",
         "hovertemplate": "%{y:+.4f} nats at %{x:.2f} s"},
        {**common, "y": _finite_or_none(cumulative), "name": "TTT − baseline, running mean",
         "line": {"color": CUMULATIVE_COLOR, "width": 2.5},
         "hovertemplate": "mean so far %{y:+.4f} nats at %{x:.2f} s"},
        {"type": "scatter", "x": [0.0, max(n, 1) * step], "y": [0.0, 0.0], "mode": "lines", "name": "zero",
         "line": {"color": "#999999", "width": 1}, "showlegend": False, "hoverinfo": "skip", "xaxis": "x2",
         "yaxis": "y2"},
    ]  # fmt: skip


def _layout(total_tokens: int | None, has_ttt: bool) -> dict:
    layout: dict = {
        "uirevision": UIREVISION, "height": 900, "margin": {"t": 30, "b": 50, "l": 60, "r": 20},
        "legend": {"orientation": "h", "y": -0.06, "font": {"size": 11}}, "annotations": [], "hovermode": "x",
    }  # fmt: skip
    x_range = None if total_tokens is None else [0, max(total_tokens, 1) / FRAME_RATE]
    for row, (domain, (title, y_title)) in enumerate(zip(_row_domains(), ROWS, strict=True)):
        suffix = _axis(row)
        xaxis: dict = {"anchor": f"y{suffix}", "domain": [0.0, 1.0]}
        if row:
            xaxis["matches"] = "x"  # one time axis: zooming a row zooms them all
        if row == len(ROWS) - 1:
            xaxis["title"] = {"text": "time (s) · 12.5 tokens per second"}
        if x_range is not None:
            xaxis["range"] = x_range
        layout[f"xaxis{suffix}"] = xaxis
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "domain": domain, "title": {"text": y_title}}
        layout["annotations"].append({
            "text": title, "font": {"size": 14}, "showarrow": False, "x": 0.0, "xanchor": "left",
            "xref": "paper", "y": domain[1], "yanchor": "bottom", "yref": "paper",
        })  # fmt: skip
    if not has_ttt:
        for row in (2, 3):
            layout["annotations"].append({
                "text": "no TTT layer reported yet", "showarrow": False, "x": 0.5, "xanchor": "center",
                "xref": "paper", "y": sum(_row_domains()[row]) / 2, "yref": "paper", "font": {"color": "#888888"},
            })  # fmt: skip
    return layout


def live_figure(
    loss_per_token: dict[str, list[float]],
    drift: dict[str, dict],
    smooth: int = 25,
    total_tokens: int | None = None,
    inner_loss: dict[str, dict] | None = None,
) -> go.Figure:
    """`figure_dict` as a plotly Figure (validated; for notebooks and reports)."""
    return go.Figure(figure_dict(loss_per_token, drift, smooth, total_tokens, inner_loss))


def figure_json(
    loss_per_token: dict[str, list[float]],
    drift: dict[str, dict],
    smooth: int = 25,
    total_tokens: int | None = None,
    inner_loss: dict[str, dict] | None = None,
) -> str:
    """`figure_dict` as the JSON a browser's Plotly reads, with plotly's default template (what
    `live_figure(...).to_json()` gives, without building the validated objects)."""
    fig = figure_dict(loss_per_token, drift, smooth, total_tokens, inner_loss)
    fig["layout"]["template"] = _default_template()
    return json.dumps(fig, allow_nan=False)


@functools.cache
def _default_template() -> dict:
    """The template plotly puts into every figure's JSON (pio.templates.default, "plotly" unless changed)."""
    return json.loads(go.Figure().to_json())["layout"]["template"]


def _finite_or_none(values) -> list:
    return [round(float(v), DECIMALS) if v is not None and np.isfinite(v) else None for v in values]
