"""The figure and table of a settings comparison (`compare.compare_settings`): every setting overlaid on the live
figure's time axis (`figure.stacked_layout`), against the one baseline. Gradio-free.

Rows: the loss of the baseline and of each setting (2 s moving average); TTT − baseline of each setting (2 s moving
average); the drift of W1 in the first TTT layer of each setting (of w_down in the first In-Place layer for a checkpoint
of the In-Place fork, whose drift spans 1e-12 to 1: the row is then logarithmic).
"""

from __future__ import annotations

import html

import numpy as np

from moshi_ttt.app.compare import Setting
from moshi_ttt.app.figure import RUN_COLORS, FigureInfo, stacked_layout
from moshi_ttt.reports import headline
from moshi_ttt.reports.figures import FRAME_RATE, moving_average

SETTING_COLORS = ("#ef553b", "#00a67d", "#ab63fa", "#ff8c1a", "#19b3e3", "#ff6692", "#7cae3b", "#d65fd6",
                  "#c9a000", "#8c564b", "#17becf", "#e377c2")  # fmt: skip
ROWS = (
    ("Loss, 2 s moving average: the baseline (dashed) and each setting", "nats"),
    ("TTT − baseline of each setting, 2 s moving average (below 0: TTT better)", "Δ nats"),
    ("Fast-weight drift of W1 (first TTT layer) per setting", "relative drift"),
)
INPLACE_DRIFT_ROW = ("Fast-weight drift per setting: W1 (first TTT layer) or w_down (first In-Place layer), log",
                     "relative drift (log)")  # fmt: skip
COLUMNS = ["setting", "checkpoint", "tokens per update", "persistent_states", "mean loss", "TTT vs baseline",
           "past 1st window", "per reading"]  # fmt: skip


def compare_figure(document: dict, settings: list[Setting], info: FigureInfo | None = None, smooth: int = 25) -> dict:
    """The comparison figure as a Plotly figure dict.

    Args:
        document: `CompareUpdate.document` ("baseline" and a run per setting, named `Setting.name`).
        settings: the settings scored, in order (their colours follow it).
        info: the clip's name, readings and the TTT model's attention context.
        smooth: moving-average window in tokens.
    """
    runs = document.get("runs", {})
    tokens = max((len(run["loss_per_token"]) for run in runs.values()), default=0)
    in_place = any(runs.get(setting.name, {}).get("inplace") for setting in settings)
    rows = (*ROWS[:2], INPLACE_DRIFT_ROW) if in_place else ROWS
    layout = stacked_layout(rows, tokens or None, info or FigureInfo(), height=760)
    if in_place:
        layout["yaxis3"].update(type="log", exponentformat="e")
    data = []
    common = {"type": "scatter", "x0": 0.0, "dx": 1.0 / FRAME_RATE, "mode": "lines", "xaxis": "x"}
    base = _series(runs["baseline"]["loss_per_token"]) if "baseline" in runs else None
    for i, setting in enumerate(settings):
        run = runs.get(setting.name)
        if run is None:
            continue
        color = SETTING_COLORS[i % len(SETTING_COLORS)]
        name = html.escape(setting.name, quote=False)  # Plotly renders tags in trace names: a checkpoint's is text
        loss = _series(run["loss_per_token"])
        data.append({**common, "y": _rounded(moving_average(loss, smooth)), "yaxis": "y", "legend": "legend",
                     "name": name, "legendgroup": setting.name, "line": {"color": color, "width": 2},
                     "hovertemplate": "%{y:.3f} nats"})  # fmt: skip
        if base is not None:
            data.append({**common, "y": _rounded(moving_average(loss - base, smooth)), "yaxis": "y2",
                         "legend": "legend2", "name": name, "legendgroup": setting.name, "showlegend": False,
                         "line": {"color": color, "width": 1.5}, "hovertemplate": "%{y:+.4f} nats"})  # fmt: skip
        drift = run.get("drift") or {}
        curve = _drift_curve(drift, run.get("inplace") or {})
        if curve is not None:
            steps, values = curve
            data.append({"type": "scatter", "x": [t / FRAME_RATE for t in steps], "y": values,
                         "mode": "lines", "xaxis": "x", "yaxis": "y3", "legend": "legend3", "name": name,
                         "legendgroup": setting.name, "showlegend": False, "line": {"color": color, "width": 1.5},
                         "hovertemplate": "%{y:.4f}"})  # fmt: skip
    if base is not None:
        data.append({**common, "y": _rounded(moving_average(base, smooth)), "yaxis": "y", "legend": "legend",
                     "name": "baseline", "line": {"color": RUN_COLORS["baseline"], "width": 2.5, "dash": "dash"},
                     "hovertemplate": "%{y:.3f} nats"})  # fmt: skip
        data.append({"type": "scatter", "x": [0.0, tokens / FRAME_RATE], "y": [0.0, 0.0], "mode": "lines",
                     "xaxis": "x", "yaxis": "y2", "showlegend": False, "hoverinfo": "skip",
                     "line": {"color": "#999999", "width": 1}})  # fmt: skip
    return {"data": data, "layout": layout}


def compare_rows(document: dict, settings: list[Setting], partial: bool = False) -> list[list]:
    """One table row per setting scored (columns: `COLUMNS`), TTT against the baseline in words."""
    runs = document.get("runs", {})
    base = runs.get("baseline")
    rows = []
    for setting in settings:
        run = runs.get(setting.name)
        if run is None or base is None:
            continue
        gains = headline.reading_gains({"runs": {"baseline": base, "ttt": run}})
        per_reading = "; ".join(f"{g.number}: {headline.change_words(g.improvement_pct)}" for g in gains) or None
        mean = run.get("mean_loss")
        rows.append([
            setting.name + (" (partial)" if partial else ""),
            setting.checkpoint,
            setting.size,  # b=8 (TTT mini-batch) or chunk=8 (In-Place)
            "on" if setting.persistent_states else "off",
            None if mean is None or not np.isfinite(mean) else round(mean, 4),
            headline.change_words(headline.improvement_pct(base.get("mean_loss"), mean)),
            headline.change_words(
                headline.improvement_pct(base.get("mean_loss_past_context"), run.get("mean_loss_past_context"))
            ),
            per_reading,
        ])  # fmt: skip
    return rows


def _drift_curve(drift: dict, inplace: dict) -> tuple[list, list] | None:
    """(tokens, relative drift) of a setting's first TTT layer (W1), else of its first In-Place layer (w_down, zeros
    as gaps for the log row); None without either."""
    if drift:
        record = drift[min(drift, key=int)]
        return record["t"], record["W1"]
    if inplace:
        record = inplace[min(inplace, key=int)]
        values = record.get("drift_relative") or []
        return record["t"], [v if v is not None and v > 0 else None for v in values]
    return None


def _series(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _rounded(values) -> list:
    return [round(float(v), 5) if np.isfinite(v) else None for v in values]
