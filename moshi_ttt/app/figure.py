"""The app's live figure: four rows stacked on one shared time axis, one legend per row, one hover readout across
the rows.

1. per-token loss of both models: thin raw lines and bold smoothed ones, the baseline dashed and drawn on top, so
   both stay visible where they coincide;
2. TTT - baseline: the smoothed per-token difference (below 0: TTT predicts better), a zero line and the running
   (cumulative) mean of the difference since the start of the clip;
3. fast-weight drift ||W - W_base|| / ||W_base|| per TTT layer (a colour per weight, a dash per layer);
4. the inner loop per TTT layer: the reconstruction loss at W_base, at the mini-batch start and after its update,
   divided by the variance of the target ||E[Y] - Y||^2 (both 1/2 ||.||^2 per token, so the ratio has no unit: 1 is
   no better than predicting the mini-batch's mean target; the four TTT stats of ttt-lm-jax). Records without the
   target variance are drawn raw.

A TTT model with In-Place layers (the In-Place fork's checkpoints: no TTT blocks of ours, no inner-loop loss) fills
rows 3 and 4 with its fast weight w_down per chunk update, on log axes (`INPLACE_ROWS`, the curves of
reports/inplace_report.CURVES): row 3 the unitless ones (drift relative to ||W0||, clip factor, share of entries
the step changed), row 4 the Frobenius norms (drift, the drift the updates add up to, the raw update, the lr-scaled
clipped update, the step float32 kept) with the float32 resolution line: an update far below it rounds away, and a
gap (a zero on a log axis) in "step kept by float32" says it did.

The spans of the readings of a repeated passage are shaded across the rows and the end of the first attention
window is marked: where the demo's story happens. Every trace sits on the one x axis ("x"), the rows on their own y
axes, so that plotly's "x unified" hover with `hoversubplots="axis"` reads all four rows at once.

The figure is built as a plain Plotly dict (`figure_dict`): the app sends it as JSON (`figure_json`) at every live
update, which costs about a millisecond, where building it through plotly's validated objects cost ~100 ms per
update. Evenly spaced curves are sent as `x0`/`dx` with no x array, which halves the JSON. `live_figure` wraps the
same dict in a `go.Figure`.
"""

from __future__ import annotations

import functools
import html
import json
import math
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from moshi_ttt.app.inplace_view import INPLACE_ROW_TITLES, inplace_traces, layers_title
from moshi_ttt.reports.figures import FRAME_RATE, moving_average

RUN_COLORS = {"baseline": "#1f3fbf", "ttt": "#ef553b"}
RUN_LABELS = {"baseline": "baseline", "ttt": "TTT"}
RUN_DASH = {"baseline": "dash", "ttt": "solid"}
WEIGHT_COLORS = {"W1": "#00a67d", "W2": "#ab63fa"}  # drift row: a colour per weight
INNER_COLORS = {"base": "#8c8c8c", "start": "#ff8c1a", "after": "#0f7ea8"}  # inner row: a colour per curve
INNER_LABELS = {"base": "at W_base", "start": "at the mini-batch start", "after": "after the update"}
LAYER_DASH = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")  # rows 3 and 4: a dash per layer
DIFF_COLOR, CUMULATIVE_COLOR = "#444444", "#b8860b"
READING_FILL, CONTEXT_COLOR = "rgba(255, 190, 0, 0.16)", "#7f7f7f"
PLOT_BACKGROUND, GRID_COLOR = "#ffffff", "#e6e9ef"  # white rows: the shaded readings stay a light yellow
UIREVISION = "moshi-ttt-live"  # the default revision: zoom and pan survive the updates that share it
ROWS = (  # (title, y-axis title), top to bottom
    ("Per-token loss (thin: raw, bold: 2 s moving average)", "nats"),
    ("TTT − baseline (below 0: TTT better)", "Δ nats"),
    ("Fast-weight drift ||W − W_base|| / ||W_base||", "relative drift"),
    ("Inner loop per mini-batch: reconstruction loss ÷ target variance (1 = no better than the mean)", "× target var."),
)
INPLACE_ROWS = ROWS[:2] + INPLACE_ROW_TITLES  # rows 3 and 4 for a TTT model with In-Place layers (inplace_view.py)
RAW_INNER_AXIS = "½‖f(k) − y‖² per token"  # row 4's axis for records without the target variance
ROW_GAP = 0.06  # fraction of the plot height between rows (room for the row titles)
DECIMALS = 5  # values are rounded in the JSON (losses of ~5 nats: 1e-5 is far below what a plot shows)
LEGEND_WIDTH_PX = 200  # the right margin, where each row's legend sits


@dataclass(frozen=True)
class Span:
    """A shaded span of the time axis: one reading of a repeated passage."""

    start_s: float
    end_s: float
    label: str  # "reading 2", "reading 3 (partial)"


@dataclass(frozen=True)
class FigureInfo:
    """What a figure shows beside its curves; the same for every update of one run."""

    clip: str = "moshi_ttt"  # the clip's file stem: names the figure's PNG download
    spans: tuple[Span, ...] = ()  # readings of a repeated passage, shaded across the rows
    context_tokens: int | None = None  # the TTT model's attention context: marks where its first window ends
    mini_batch_size: int | None = None  # tokens per fast-weight update: says why rows 3 and 4 are still empty
    # (the chunk size of an In-Place model)
    revision: str = UIREVISION  # plotly's uirevision: zoom survives the updates of a run, not the next run


def _row_domains(rows: int = len(ROWS), gap: float = ROW_GAP) -> list[list[float]]:
    """Vertical [bottom, top] of each row, top row first."""
    height = (1.0 - gap * (rows - 1)) / rows
    bounds = [[1.0 - (i + 1) * height - i * gap, 1.0 - i * height - i * gap] for i in range(rows)]
    return [[max(0.0, round(lo, 6)), min(1.0, round(hi, 6))] for lo, hi in bounds]


def _suffix(row: int) -> str:
    """The axis and legend suffix of a row: "" for the first, "2", "3", ... for the others."""
    return "" if row == 0 else str(row + 1)


def _on_row(trace: dict, row: int) -> dict:
    """`trace` on the shared x axis, row `row`'s y axis and legend."""
    return {**trace, "xaxis": "x", "yaxis": f"y{_suffix(row)}", "legend": f"legend{_suffix(row)}"}


def _series(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def figure_dict(
    loss_per_token: dict[str, list[float]],
    drift: dict[str, dict],
    smooth: int = 25,
    total_tokens: int | None = None,
    inner_loss: dict[str, dict] | None = None,
    info: FigureInfo | None = None,
    difference_range: list[float] | None = None,
    inplace: dict[str, dict] | None = None,
) -> dict:
    """The four rows sharing the time axis (seconds), as a Plotly figure dict.

    Args:
        loss_per_token: run ("baseline", "ttt") -> per-token loss so far (NaN or None where invalid).
        drift: TTT layer -> {"W1": [...], "W2": [...] (TTT-MLP only), "t": [token of each update]} (results.json
            "drift").
        smooth: moving-average window in tokens (rows 1 and 2).
        total_tokens: fixes the x range to the whole clip, so the curves grow into a stable frame.
        inner_loss: TTT layer -> {"base", "start", "after", optional "target_variance", "t"} (results.json).
        info: the clip's name, readings, attention context and mini-batch size (`FigureInfo`).
        difference_range: row 2's y range; None: from the curves (`difference_range` of the data).
        inplace: In-Place layer -> results.json "inplace" record: rows 3 and 4 show it (module docstring).
    Returns:
        {"data": [...], "layout": {...}} of JSON types (no template: plotly's default applies).
    """
    info = info or FigureInfo()
    data = []
    step = 1.0 / FRAME_RATE
    for run in sorted(loss_per_token, key=lambda r: r == "baseline"):  # the baseline last: drawn on top
        y = _series(loss_per_token[run])
        # Plotly renders tags in trace names (<a href>, <b>): a run's name from a user's results.json is text.
        label = RUN_LABELS.get(run) or html.escape(run, quote=False)
        color, dash = RUN_COLORS.get(run, "#7f7f7f"), RUN_DASH.get(run, "solid")
        common = {"type": "scatter", "x0": 0.0, "dx": step, "mode": "lines", "legendgroup": run}
        data.append(_on_row({**common, "y": _finite_or_none(y), "name": f"{label} per token", "opacity": 0.3,
                             "line": {"color": color, "width": 1}, "showlegend": False,
                             "hovertemplate": "%{y:.3f} nats"}, 0))  # fmt: skip
        data.append(_on_row({**common, "y": _finite_or_none(moving_average(y, smooth)), "name": label,
                             "line": {"color": color, "width": 2.5, "dash": dash},
                             "hovertemplate": "%{y:.3f} nats (2 s average)"}, 0))  # fmt: skip
    difference = _difference_traces(loss_per_token, smooth, step)
    data += [_on_row(trace, 1) for trace in difference]
    layers = sorted((layer for layer in drift if drift[layer].get("t")), key=int)  # layers with an update so far
    for i, layer in enumerate(layers):
        record = drift[layer]
        x = (np.asarray(record["t"], dtype=np.float64) / FRAME_RATE).tolist()
        for name in (w for w in WEIGHT_COLORS if w in record):  # TTT-Linear layers have no W2
            data.append(_on_row({
                "type": "scatter", "x": x, "y": _finite_or_none(record[name]), "mode": "lines",
                "name": f"layer {layer} {name}", "hovertemplate": "%{y:.4f}",
                "line": {"color": WEIGHT_COLORS[name], "dash": LAYER_DASH[i % len(LAYER_DASH)]},
            }, 2))  # fmt: skip
    inner_layers = sorted((layer for layer in inner_loss or {} if inner_loss[layer].get("t")), key=int)
    normalised = bool(inner_layers) and all(inner_loss[k].get("target_variance") for k in inner_layers)
    for i, layer in enumerate(inner_layers):
        data += [_on_row(trace, 3) for trace in _inner_traces(layer, inner_loss[layer], i, normalised)]
    inplace_layers = sorted((layer for layer in inplace or {} if inplace[layer].get("t")), key=int)
    dashes = {layer: LAYER_DASH[i % len(LAYER_DASH)] for i, layer in enumerate(inplace_layers)}
    for i, layer in enumerate(inplace_layers):
        traces = inplace_traces(layer, inplace[layer], dashes[layer], legend=i == 0)
        data += [_on_row(trace, 2 + row) for row, trace in traces]
    in_place = bool(inplace) and not layers
    if in_place:
        (title, axis), norms = INPLACE_ROWS[2], INPLACE_ROWS[3]
        layout = stacked_layout((*INPLACE_ROWS[:2], (layers_title(title, dashes), axis), norms), total_tokens, info)
    else:
        layout = _layout(total_tokens, info)
    if in_place:
        for axis in ("yaxis3", "yaxis4"):
            layout[axis].update(type="log", exponentformat="e")
    if not normalised and inner_layers:
        layout["yaxis4"]["title"]["text"] = RAW_INNER_AXIS
    if difference:
        # The smoothed curve after its first window, the running mean after four (it settles more slowly).
        curves = [difference[0]["y"][smooth:], difference[1]["y"][4 * smooth :]]
        if not any(v is not None for curve in curves for v in curve):  # a clip shorter than one window: all of it
            curves = [difference[0]["y"], difference[1]["y"]]
        layout["yaxis2"]["range"] = list(difference_range) if difference_range else data_difference_range(curves)
    if not any(v is not None for trace in data[: 2 * len(loss_per_token)] for v in trace["y"]):
        _note_row(layout, 0, "No valid token yet: moshi's delays leave the first tokens of each codebook unscored.")
    if not layers and not inner_layers and not inplace_layers:
        reason = _ttt_empty_reason(total_tokens, info.mini_batch_size, in_place)
        for row in (2, 3):
            _note_row(layout, row, reason)
    return {"data": data + placeholders(data, len(ROWS)), "layout": layout}


def empty_figure(message: str) -> dict:
    """The live figure's frame without curves: the four rows with their titles and `message` in the first. Shown
    before a run (so that the page loads plotly.js at once, not at the first update) and while a run starts."""
    layout = _layout(None, FigureInfo())
    layout["xaxis"].update(range=[0, 10], showticklabels=False)
    for row in range(len(ROWS)):
        layout[f"yaxis{_suffix(row)}"]["showticklabels"] = False  # no numbers where there is nothing yet
    _note_row(layout, 0, message)
    return {"data": placeholders([], len(ROWS)), "layout": layout}


def placeholders(data: list[dict], rows: int) -> list[dict]:
    """An empty trace on each row that has none: plotly draws only the rows that hold a trace, so without them a
    short clip's figure would lose its lower rows and move its time axis under the first."""
    used = {trace.get("yaxis", "y") for trace in data}
    return [
        {"type": "scatter", "x": [], "y": [], "mode": "lines", "xaxis": "x", "yaxis": f"y{_suffix(row)}",
         "showlegend": False, "hoverinfo": "skip"}
        for row in range(rows)
        if f"y{_suffix(row)}" not in used
    ]  # fmt: skip


def _inner_traces(layer: str, record: dict, index: int, normalised: bool) -> list[dict]:
    """Row 4's curves of one layer: each inner loss, divided by the target variance when `normalised`."""
    x = (np.asarray(record["t"], dtype=np.float64) / FRAME_RATE).tolist()
    scale = _series(record["target_variance"]) if normalised else 1.0
    traces = []
    for key, label in INNER_LABELS.items():
        y = _series(record[key]) / scale
        traces.append({
            "type": "scatter", "x": x, "y": _finite_or_none(y), "mode": "lines", "name": f"layer {layer} {label}",
            "line": {"color": INNER_COLORS[key], "dash": LAYER_DASH[index % len(LAYER_DASH)], "width": 1.5},
            "hovertemplate": "%{y:.3f}" + (" × target var." if normalised else ""),
        })  # fmt: skip
    return traces


def _ttt_empty_reason(total_tokens: int | None, mini_batch_size: int | None, in_place: bool = False) -> str:
    """Why rows 3 and 4 have no curve: a clip shorter than one mini-batch (an In-Place chunk), or no update yet."""
    if mini_batch_size is None:
        return "No TTT layer has reported an update (the TTT checkpoint may have no TTT layer)."
    every = f"{mini_batch_size} tokens ({mini_batch_size / FRAME_RATE:.2f} s)"
    unit = "In-Place chunk" if in_place else "mini-batch"
    if total_tokens is not None and total_tokens < mini_batch_size:
        return f"No fast-weight update: the clip has {total_tokens} tokens, fewer than one {unit} of {every}."
    return f"No update yet: the fast weights update after every {unit} of {every}."


def _note_row(layout: dict, row: int, text: str) -> None:
    """A grey sentence in the middle of an empty row."""
    layout["annotations"].append({
        "text": text, "showarrow": False, "x": 0.5, "xanchor": "center", "xref": "paper", "yref": "paper",
        "y": sum(_row_domains()[row]) / 2, "font": {"color": "#777777", "size": 12},
    })  # fmt: skip


def data_difference_range(curves: list[list]) -> list[float]:
    """Row 2's y range from the curves: 1st to 99th percentile of their values (0 included), padded by 15%.

    The first tokens' differences (a window of a few tokens, often several nats) would otherwise flatten the rest
    of the row (zooming out on the axis still shows them).
    """
    values = np.asarray([v for curve in curves for v in curve if v is not None], dtype=np.float64)
    if values.size == 0:
        return [-0.1, 0.1]
    lo, hi = min(float(np.quantile(values, 0.01)), 0.0), max(float(np.quantile(values, 0.99)), 0.0)
    pad = max(0.15 * (hi - lo), 0.01)
    return [round(lo - pad, DECIMALS), round(hi + pad, DECIMALS)]


def grown_range(previous: list[float] | None, current: list[float]) -> list[float]:
    """A y range that only grows, in coarse steps: a live run's row 2 keeps its scale from one update to the next
    instead of jumping with every new percentile.

    The first range is `current` widened outward to a quarter of its order of magnitude. Later, a side moves only
    when `current` passes it, and then a quarter of the range beyond, so a curve that creeps outward moves it
    seldom.

    Args:
        previous: the range shown so far (None at the first update).
        current: the range the curves ask for now (`data_difference_range`).
    Returns:
        [low, high] containing both.
    """
    lo, hi = current
    if previous is not None:
        margin = 0.25 * (previous[1] - previous[0])
        lo = previous[0] if lo >= previous[0] else lo - margin
        hi = previous[1] if hi <= previous[1] else hi + margin
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-6))) / 4
    return [round(math.floor(lo / step + 1e-9) * step, DECIMALS), round(math.ceil(hi / step - 1e-9) * step, DECIMALS)]


def _difference_traces(loss_per_token: dict[str, list[float]], smooth: int, step: float) -> list[dict]:
    """Row 2: TTT - baseline, smoothed, with its running mean and a zero line; [] without both runs."""
    if "baseline" not in loss_per_token or "ttt" not in loss_per_token:
        return []
    base, ttt = _series(loss_per_token["baseline"]), _series(loss_per_token["ttt"])
    n = min(base.size, ttt.size)
    diff = ttt[:n] - base[:n]  # [n] NaN where either is invalid
    finite = np.isfinite(diff)
    count = np.cumsum(finite)
    cumulative = np.where(count > 0, np.cumsum(np.where(finite, diff, 0.0)) / np.maximum(count, 1), np.nan)
    common = {"type": "scatter", "x0": 0.0, "dx": step, "mode": "lines"}
    return [
        {**common, "y": _finite_or_none(moving_average(diff, smooth)), "name": "TTT − baseline (2 s average)",
         "line": {"color": DIFF_COLOR, "width": 2}, "fill": "tozeroy", "fillcolor": "rgba(68,68,68,0.12)",
         "hovertemplate": "%{y:+.4f} nats"},
        {**common, "y": _finite_or_none(cumulative), "name": "running mean since 0 s",
         "line": {"color": CUMULATIVE_COLOR, "width": 2.5}, "hovertemplate": "%{y:+.4f} nats"},
        {"type": "scatter", "x": [0.0, max(n, 1) * step], "y": [0.0, 0.0], "mode": "lines", "name": "zero",
         "line": {"color": "#999999", "width": 1}, "showlegend": False, "hoverinfo": "skip"},
    ]  # fmt: skip


def stacked_layout(
    rows: tuple[tuple[str, str], ...], total_tokens: int | None, info: FigureInfo, height: int = 900
) -> dict:
    """The layout of rows stacked on one time axis: a title, a y axis and a legend per row, one hover readout
    across the rows ("x unified", `hoversubplots="axis"`), the readings shaded, the first attention window's end
    marked, and the PNG download named after the clip.

    Args:
        rows: (title, y-axis title) of each row, top to bottom.
        total_tokens: fixes the x range to the whole clip (None: plotly's autorange).
        info: the clip's name, readings and attention context.
        height: in pixels.
    Returns:
        The layout dict (traces go on x and y, y2, ...; their "legend" on legend, legend2, ...).
    """
    domains = _row_domains(len(rows))
    layout: dict = {
        "uirevision": info.revision, "height": height, "annotations": [],
        "margin": {"t": 30, "b": 50, "l": 60, "r": LEGEND_WIDTH_PX},
        "hovermode": "x unified", "hoversubplots": "axis", "hoverlabel": {"font": {"size": 11}},
        "plot_bgcolor": PLOT_BACKGROUND,
        "xaxis": {"anchor": f"y{_suffix(len(rows) - 1)}", "domain": [0.0, 1.0], "hoverformat": ".2f",
                  "title": {"text": "time (s) · 12.5 tokens per second"}, "showspikes": True, "spikemode": "across",
                  "spikethickness": 1, "spikecolor": "#999999", "spikedash": "solid", "gridcolor": GRID_COLOR,
                  "linecolor": GRID_COLOR},
    }  # fmt: skip
    if total_tokens is not None:
        layout["xaxis"]["range"] = [0, max(total_tokens, 1) / FRAME_RATE]
    for row, (domain, (title, y_title)) in enumerate(zip(domains, rows, strict=True)):
        suffix = _suffix(row)
        layout[f"yaxis{suffix}"] = {"anchor": "x", "domain": domain, "title": {"text": y_title},
                                    "gridcolor": GRID_COLOR, "zerolinecolor": "#c8ccd4"}  # fmt: skip
        layout[f"legend{suffix}"] = {"x": 1.01, "xanchor": "left", "xref": "paper", "y": domain[1], "yanchor": "top",
                                     "yref": "paper", "font": {"size": 11}, "bgcolor": "rgba(255,255,255,0)",
                                     "tracegroupgap": 2}  # fmt: skip
        layout["annotations"].append({
            "text": title, "font": {"size": 14}, "showarrow": False, "x": 0.0, "xanchor": "left",
            "xref": "paper", "y": domain[1], "yanchor": "bottom", "yref": "paper",
        })  # fmt: skip
    shapes = []
    for span in info.spans:
        for row in range(len(rows)):  # a rect per row, so that the gaps between the rows stay clear
            shapes.append({"type": "rect", "xref": "x", "yref": f"y{_suffix(row)} domain", "y0": 0, "y1": 1,
                           "x0": span.start_s, "x1": span.end_s, "fillcolor": READING_FILL, "line": {"width": 0},
                           "layer": "below"})  # fmt: skip
        layout["annotations"].append({"text": span.label, "showarrow": False, "xref": "x", "x": span.start_s,
                                      "xanchor": "left", "yref": "paper", "y": domains[0][1], "yanchor": "top",
                                      "font": {"size": 11, "color": "#8a6d00"}})  # fmt: skip
    if info.context_tokens is not None and (total_tokens is None or info.context_tokens < total_tokens):
        x = info.context_tokens / FRAME_RATE
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
                       "line": {"color": CONTEXT_COLOR, "width": 1, "dash": "dot"}})  # fmt: skip
        layout["annotations"].append({"text": f"attention window ({x:.1f} s)", "showarrow": False, "xref": "x",
                                      "x": x, "xanchor": "left", "yref": "paper", "y": domains[0][0],
                                      "yanchor": "bottom", "font": {"size": 10, "color": CONTEXT_COLOR}})  # fmt: skip
    if shapes:  # (plotly leaves an empty list out of its JSON)
        layout["shapes"] = shapes
    return layout


def _layout(total_tokens: int | None, info: FigureInfo) -> dict:
    return stacked_layout(ROWS, total_tokens, info)


def live_figure(
    loss_per_token: dict[str, list[float]],
    drift: dict[str, dict],
    smooth: int = 25,
    total_tokens: int | None = None,
    inner_loss: dict[str, dict] | None = None,
    info: FigureInfo | None = None,
    inplace: dict[str, dict] | None = None,
) -> go.Figure:
    """`figure_dict` as a plotly Figure (validated; for notebooks and reports)."""
    return go.Figure(figure_dict(loss_per_token, drift, smooth, total_tokens, inner_loss, info, inplace=inplace))


def figure_json(
    loss_per_token: dict[str, list[float]],
    drift: dict[str, dict],
    smooth: int = 25,
    total_tokens: int | None = None,
    inner_loss: dict[str, dict] | None = None,
    info: FigureInfo | None = None,
    difference_range: list[float] | None = None,
    inplace: dict[str, dict] | None = None,
) -> str:
    """`figure_dict` as the JSON a browser's Plotly reads: what `live_figure(...).to_json()` gives (plotly's default
    template, built without the validated objects), plus the plot's config (`plot_config`)."""
    fig = figure_dict(loss_per_token, drift, smooth, total_tokens, inner_loss, info, difference_range, inplace)
    return to_json(fig, (info or FigureInfo()).clip)


def to_json(fig: dict, clip: str) -> str:
    """A figure dict as the JSON the app's gr.Plot draws: plotly's default template and `plot_config(clip)`."""
    fig["layout"]["template"] = _default_template()
    fig["config"] = plot_config(clip)
    return json.dumps(fig, allow_nan=False)


def plot_config(clip: str) -> dict:
    """Plotly's config: the camera button of the modebar saves a PNG named after the clip (at twice the size)."""
    return {"toImageButtonOptions": {"format": "png", "filename": f"{clip}_moshi_ttt", "scale": 2},
            "displaylogo": False}  # fmt: skip


@functools.cache
def _default_template() -> dict:
    """The template plotly puts into every figure's JSON (pio.templates.default, "plotly" unless changed)."""
    return json.loads(go.Figure().to_json())["layout"]["template"]


def _finite_or_none(values) -> list:
    return [round(float(v), DECIMALS) if v is not None and np.isfinite(v) else None for v in values]
