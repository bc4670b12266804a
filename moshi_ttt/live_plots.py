"""The app's live figure: per-token loss (left) and TTT fast-weight drift (right) on one time axis.

The figure is built as a plain Plotly dict (`figure_dict`): the app sends it as JSON (`figure_json`) at every live
update, which costs about a millisecond, where building it through plotly's validated objects cost ~100 ms per
update (most of a chunked run's time on the demo models). `live_figure` wraps the same dict in a `go.Figure`.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import plotly.graph_objects as go

from .plots import FRAME_RATE, moving_average

RUN_COLORS = {"baseline": "#636efa", "ttt": "#ef553b"}
RUN_LABELS = {"baseline": "baseline", "ttt": "TTT"}
LAYER_COLORS = ("#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff", "#fecb52")
UIREVISION = "moshi-ttt-live"  # constant: zoom and pan survive the updates
TITLES = ("Per-token loss", "TTT fast-weight drift ||W - W_base|| / ||W_base||")
DOMAINS = ([0.0, 0.46], [0.54, 1.0])  # the two panels side by side (plotly's make_subplots with spacing 0.08)


def figure_dict(
    loss_per_token: dict[str, list[float]], drift: dict[str, dict], smooth: int = 25, total_tokens: int | None = None
) -> dict:
    """Two panels sharing the time axis (seconds; hover shows the token index too), as a Plotly figure dict.

    Args:
        loss_per_token: run ("baseline", "ttt") -> per-token loss so far; raw values faint, moving average bold.
        drift: TTT layer -> {"W1": [...], "W2": [...], "t": [token of each update]} (results.json "drift").
        smooth: moving-average window in tokens.
        total_tokens: fixes the x range to the whole clip, so the curves grow into a stable frame.
    Returns:
        {"data": [...], "layout": {...}} of JSON types (no template: plotly's default applies).
    """
    data = []
    for run, loss in loss_per_token.items():
        y = np.asarray(loss, dtype=np.float64)
        tokens = np.arange(y.size)
        color, label = RUN_COLORS.get(run, "#7f7f7f"), RUN_LABELS.get(run, run)
        common = {
            "type": "scatter", "x": (tokens / FRAME_RATE).tolist(), "customdata": tokens.tolist(), "mode": "lines",
            "legendgroup": run, "hovertemplate": "%{y:.3f} nats at %{x:.2f} s (token %{customdata})",
            "xaxis": "x", "yaxis": "y",
        }  # fmt: skip
        data.append({**common, "y": _finite_or_none(y), "name": f"{label} (per token)",
                     "line": {"color": color, "width": 1}, "opacity": 0.25, "showlegend": False})  # fmt: skip
        data.append({**common, "y": _finite_or_none(moving_average(y, smooth)), "name": label,
                     "line": {"color": color, "width": 2.5}})  # fmt: skip
    for i, (layer, record) in enumerate(sorted(drift.items(), key=lambda kv: int(kv[0]))):
        steps = np.asarray(record["t"], dtype=np.int64)
        color = LAYER_COLORS[i % len(LAYER_COLORS)]
        for name, dash in (("W1", "solid"), ("W2", "dot")):
            data.append({
                "type": "scatter", "x": (steps / FRAME_RATE).tolist(), "y": _finite_or_none(record[name]),
                "customdata": steps.tolist(), "mode": "lines", "name": f"layer {layer} {name}",
                "line": {"color": color, "dash": dash}, "hovertemplate": "%{y:.4f} at %{x:.2f} s (token %{customdata})",
                "xaxis": "x2", "yaxis": "y2",
            })  # fmt: skip
    x_range = None if total_tokens is None else [0, max(total_tokens, 1) / FRAME_RATE]
    layout: dict = {
        "uirevision": UIREVISION, "height": 460, "margin": {"t": 60, "b": 50, "l": 60, "r": 20},
        "legend": {"orientation": "h", "y": -0.2}, "annotations": [],
    }  # fmt: skip
    y_titles = ("cross-entropy (nats)", "relative drift")
    for i, (domain, title, y_title) in enumerate(zip(DOMAINS, TITLES, y_titles, strict=True)):
        suffix = "" if i == 0 else str(i + 1)
        layout[f"xaxis{suffix}"] = {"anchor": f"y{suffix}", "domain": domain,
                                    "title": {"text": "time (s) · 12.5 tokens per second"}}  # fmt: skip
        if x_range is not None:
            layout[f"xaxis{suffix}"]["range"] = x_range
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "domain": [0.0, 1.0], "title": {"text": y_title}}
        layout["annotations"].append({
            "text": title, "font": {"size": 16}, "showarrow": False, "x": sum(domain) / 2, "xanchor": "center",
            "xref": "paper", "y": 1.0, "yanchor": "bottom", "yref": "paper",
        })  # fmt: skip
    return {"data": data, "layout": layout}


def live_figure(
    loss_per_token: dict[str, list[float]], drift: dict[str, dict], smooth: int = 25, total_tokens: int | None = None
) -> go.Figure:
    """`figure_dict` as a plotly Figure (validated; for notebooks and reports)."""
    return go.Figure(figure_dict(loss_per_token, drift, smooth, total_tokens))


def figure_json(
    loss_per_token: dict[str, list[float]], drift: dict[str, dict], smooth: int = 25, total_tokens: int | None = None
) -> str:
    """`figure_dict` as the JSON a browser's Plotly reads, with plotly's default template (what
    `live_figure(...).to_json()` gives, without building the validated objects)."""
    fig = figure_dict(loss_per_token, drift, smooth, total_tokens)
    fig["layout"]["template"] = _default_template()
    return json.dumps(fig, allow_nan=False)


@functools.cache
def _default_template() -> dict:
    """The template plotly puts into every figure's JSON (pio.templates.default, "plotly" unless changed)."""
    return json.loads(go.Figure().to_json())["layout"]["template"]


def _finite_or_none(values) -> list:
    return [float(v) if v is not None and np.isfinite(v) else None for v in values]
