"""Pure Plotly figure builders: plain lists or results.json run dicts in, go.Figure out (no I/O, no Gradio)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from moshi_ttt.data.audio import FRAME_RATE


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


def bin_spans(starts: list[int], tokens: int | None, bin_size: int | None = None) -> list[tuple[int, int]]:
    """[start, end) of each position bin in tokens: a bin ends where the next starts, the last at the clip's end
    (`tokens`; without it, one `bin_size` after its start)."""
    size = bin_size or (starts[1] - starts[0] if len(starts) > 1 else 1)
    ends = [*starts[1:], tokens if tokens is not None else (starts[-1] + size if starts else 0)]
    return list(zip(starts, ends, strict=True))


def bins_figure(
    bins: dict[str, tuple[list[int], list[float]]],
    title: str,
    yaxis: str,
    bin_size: int | None = None,
    tokens: int | None = None,
) -> go.Figure:
    """Bars per position bin: name -> (bin starts, values); e.g. loss per bin or TTT improvement per bin.

    Each bar spans its bin (`bin_spans`: the last one ends with the clip when `tokens` is given), side by side with
    the other runs' bars of the same bin, and the time axis runs from 0 s to the clip's end, as the loss plot's.
    """
    fig = go.Figure()
    end = 0.0
    for j, (name, (starts, values)) in enumerate(bins.items()):
        spans = bin_spans(starts, tokens, bin_size)
        widths = [(b - a) / FRAME_RATE for a, b in spans]
        share = [0.9 * w / len(bins) for w in widths]  # each run's part of its bin
        fig.add_trace(go.Bar(
            x=[a / FRAME_RATE for a, _ in spans], y=_nullable(values), name=name, width=share,
            offset=[0.05 * w + j * s for w, s in zip(widths, share, strict=True)],
            customdata=[[a / FRAME_RATE, b / FRAME_RATE] for a, b in spans],
            hovertemplate="%{y:.4f} over %{customdata[0]:.1f}-%{customdata[1]:.1f} s",
        ))  # fmt: skip
        end = max([end, *(b / FRAME_RATE for _, b in spans)])
    fig.update_layout(title=title, xaxis_title="position in the clip (s; each bar spans its bin)", yaxis_title=yaxis,
                      barmode="overlay", xaxis={"range": [0, end or 1]})  # fmt: skip
    return fig


def drift_figure(drift: dict[str, dict], weights: tuple[str, ...] = ("W1", "W2")) -> go.Figure:
    """Relative drift ||W - W_base|| / ||W_base|| of each TTT layer at every update (results.json "drift"): the
    `weights` a layer has (TTT-MLP: W1 and W2; TTT-Linear: W1 only)."""
    fig = go.Figure()
    for layer, record in drift.items():
        x = [t / FRAME_RATE for t in record["t"]]
        for name in (w for w in weights if w in record):
            fig.add_trace(go.Scatter(x=x, y=_nullable(record[name]), mode="lines", name=f"layer {layer} {name}"))
    fig.update_layout(title="Fast-weight drift from W_base", xaxis_title="time (s)", yaxis_title="relative drift")
    return fig


INNER_CURVES = {  # results.json inner_loss key -> (legend, dash): the four TTT stats of ttt-lm-jax
    "base": ("at W_base", "dot"),
    "start": ("at the mini-batch start", "dash"),
    "after": ("after the update", "solid"),
    "target_variance": ("target variance ||E[Y] - Y||^2", "dashdot"),
}


def inner_loss_figure(inner: dict[str, dict]) -> go.Figure:
    """Inner-loop reconstruction loss per mini-batch at W_base, at its start and after its update, per layer, and the
    variance of the reconstruction target (the scale of what there is to learn) when the record has it."""
    fig = go.Figure()
    for layer, record in inner.items():
        x = [t / FRAME_RATE for t in record["t"]]
        for key, (label, dash) in INNER_CURVES.items():
            if record.get(key) is None:  # target_variance: only in records that carry it
                continue
            fig.add_trace(
                go.Scatter(
                    x=x, y=_nullable(record[key]), mode="lines", name=f"layer {layer} {label}", line={"dash": dash}
                )  # fmt: skip
            )
    fig.update_layout(title="Inner-loop loss per mini-batch", xaxis_title="time (s)", yaxis_title="reconstruction loss")
    return fig


def _nullable(values) -> list:
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in values]
