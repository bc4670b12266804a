"""Pure Plotly figure builders: plain lists or results.json run dicts in, go.Figure out (no I/O, no Gradio)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from .audio import FRAME_RATE


def moving_average(values, window: int) -> np.ndarray:
    """Mean over the finite values of a trailing window of `window` steps (NaN where the window has none)."""
    y = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    if window <= 1 or y.size == 0:
        return y
    finite = np.isfinite(y)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, y, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    count = ccount[idx] - ccount[lo]
    return np.where(count > 0, (csum[idx] - csum[lo]) / np.maximum(count, 1), np.nan)


def loss_figure(runs: dict[str, list[float]], smooth: int = 25, frame_rate: float = FRAME_RATE) -> go.Figure:
    """Per-token loss against time for each run (trailing moving average of `smooth` tokens)."""
    fig = go.Figure()
    for name, loss in runs.items():
        y = moving_average(loss, smooth)
        x = np.arange(y.size) / frame_rate
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name))
    fig.update_layout(
        title=f"Loss per token (moving average over {smooth} tokens)",
        xaxis_title="time (s)",
        yaxis_title="cross-entropy (nats)",
        legend_title="run",
    )
    return fig


def bins_figure(bins: dict[str, tuple[list[int], list[float]]], title: str, yaxis: str) -> go.Figure:
    """Bars per position bin: name -> (bin starts, values); e.g. loss per bin or TTT improvement per bin."""
    fig = go.Figure()
    for name, (starts, values) in bins.items():
        fig.add_trace(go.Bar(x=[s / FRAME_RATE for s in starts], y=_nullable(values), name=name))
    fig.update_layout(title=title, xaxis_title="bin start (s)", yaxis_title=yaxis, barmode="group")
    return fig


def drift_figure(drift: dict[str, dict], weights: tuple[str, ...] = ("W1", "W2")) -> go.Figure:
    """Relative drift ||W - W_base|| / ||W_base|| of each TTT layer at every update (results.json "drift")."""
    fig = go.Figure()
    for layer, record in drift.items():
        x = [t / FRAME_RATE for t in record["t"]]
        for name in weights:
            fig.add_trace(go.Scatter(x=x, y=_nullable(record[name]), mode="lines", name=f"layer {layer} {name}"))
    fig.update_layout(title="Fast-weight drift from W_base", xaxis_title="time (s)", yaxis_title="relative drift")
    return fig


def inner_loss_figure(inner: dict[str, dict]) -> go.Figure:
    """Inner-loop reconstruction loss per mini-batch at W_base, at its start and after its update, per layer."""
    fig = go.Figure()
    dash = {"base": "dot", "start": "dash", "after": "solid"}
    for layer, record in inner.items():
        x = [t / FRAME_RATE for t in record["t"]]
        for key in ("base", "start", "after"):
            fig.add_trace(
                go.Scatter(
                    x=x, y=_nullable(record[key]), mode="lines", name=f"layer {layer} {key}", line={"dash": dash[key]}
                )
            )
    fig.update_layout(title="Inner-loop loss per mini-batch", xaxis_title="time (s)", yaxis_title="reconstruction loss")
    return fig


def _nullable(values) -> list:
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in values]
