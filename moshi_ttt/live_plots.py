"""The app's live figure: per-token loss (left) and TTT fast-weight drift (right) on one time axis."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .plots import FRAME_RATE, moving_average

RUN_COLORS = {"baseline": "#636efa", "ttt": "#ef553b"}
RUN_LABELS = {"baseline": "baseline", "ttt": "TTT"}
LAYER_COLORS = ("#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff", "#fecb52")
UIREVISION = "moshi-ttt-live"  # constant: zoom and pan survive the updates


def live_figure(
    loss_per_token: dict[str, list[float]], drift: dict[str, dict], smooth: int = 25, total_tokens: int | None = None
) -> go.Figure:
    """Two panels sharing the time axis (seconds; hover shows the token index too).

    Args:
        loss_per_token: run ("baseline", "ttt") -> per-token loss so far; raw values faint, moving average bold.
        drift: TTT layer -> {"W1": [...], "W2": [...], "t": [token of each update]} (results.json "drift").
        smooth: moving-average window in tokens.
        total_tokens: fixes the x range to the whole clip, so the curves grow into a stable frame.
    """
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_xaxes=True,
        horizontal_spacing=0.08,
        subplot_titles=("Per-token loss", "TTT fast-weight drift ||W - W_base|| / ||W_base||"),
    )
    for run, loss in loss_per_token.items():
        y = np.asarray(loss, dtype=np.float64)
        tokens = np.arange(y.size)
        seconds = tokens / FRAME_RATE
        color, label = RUN_COLORS.get(run, "#7f7f7f"), RUN_LABELS.get(run, run)
        hover = "%{y:.3f} nats at %{x:.2f} s (token %{customdata})"
        common = {"x": seconds, "customdata": tokens, "mode": "lines", "legendgroup": run, "hovertemplate": hover}
        raw = go.Scatter(y=_finite_or_none(y), name=f"{label} (per token)", line={"color": color, "width": 1},
                         opacity=0.25, showlegend=False, **common)  # fmt: skip
        bold = go.Scatter(y=_finite_or_none(moving_average(y, smooth)), name=label,
                          line={"color": color, "width": 2.5}, **common)  # fmt: skip
        fig.add_trace(raw, row=1, col=1)
        fig.add_trace(bold, row=1, col=1)
    for i, (layer, record) in enumerate(sorted(drift.items(), key=lambda kv: int(kv[0]))):
        steps = np.asarray(record["t"], dtype=np.int64)
        color = LAYER_COLORS[i % len(LAYER_COLORS)]
        for name, dash in (("W1", "solid"), ("W2", "dot")):
            fig.add_trace(
                go.Scatter(x=steps / FRAME_RATE, y=_finite_or_none(record[name]), customdata=steps, mode="lines",
                           name=f"layer {layer} {name}", line={"color": color, "dash": dash},
                           hovertemplate="%{y:.4f} at %{x:.2f} s (token %{customdata})"),
                row=1, col=2,
            )  # fmt: skip
    x_range = None if total_tokens is None else [0, max(total_tokens, 1) / FRAME_RATE]
    for col, title in ((1, "cross-entropy (nats)"), (2, "relative drift")):
        fig.update_xaxes(title_text="time (s) · 12.5 tokens per second", range=x_range, row=1, col=col)
        fig.update_yaxes(title_text=title, row=1, col=col)
    fig.update_layout(uirevision=UIREVISION, height=460, margin={"t": 60, "b": 50, "l": 60, "r": 20},
                      legend={"orientation": "h", "y": -0.2})  # fmt: skip
    return fig


def _finite_or_none(values) -> list:
    return [float(v) if v is not None and np.isfinite(v) else None for v in values]
