"""The per-codebook view of a results document: Mimi's semantic codebook 0 against its acoustic codebooks 1-7, for
both models, on the live figure's time axis (`figure.stacked_layout`), and a table per group and per codebook.

Built from results.json's "loss_per_codebook" only, so a finished run, a stopped one and a reopened results.json
give the same view. Gradio-free.
"""

from __future__ import annotations

import numpy as np

from moshi_ttt.app.figure import RUN_COLORS, RUN_DASH, RUN_LABELS, FigureInfo, stacked_layout
from moshi_ttt.reports.codebooks import codebook_rows, group_losses
from moshi_ttt.reports.figures import FRAME_RATE, moving_average

GROUP_COLORS = ("#7b2cbf", "#00a67d")  # row 3: semantic, acoustic
COLUMNS = {  # table column -> codebook_rows key
    "codebooks": "codebooks",
    "baseline loss": "baseline loss",
    "TTT loss": "TTT loss",
    "TTT vs baseline": "improvement %",
    "past 1st window": "improvement % past context",
}


def codebook_figure(document: dict, info: FigureInfo | None = None, smooth: int = 25) -> dict | None:
    """Three rows on one time axis: each group's loss (baseline and TTT, `smooth`-token moving average), then TTT
    − baseline per group.

    Args:
        document: a results document with a "baseline" and a "ttt" run holding "loss_per_codebook".
        info: the clip's name and readings (shaded as in the live figure).
        smooth: moving-average window in tokens.
    Returns:
        A Plotly figure dict, or None when the document lacks the two runs' per-codebook losses.
    """
    runs = document.get("runs", {})
    if not all(runs.get(r, {}).get("loss_per_codebook") for r in ("baseline", "ttt")):
        return None
    groups = {run: group_losses(runs[run]["loss_per_codebook"]) for run in ("ttt", "baseline")}
    names = list(groups["ttt"])
    rows = tuple((f"{name}: loss, 2 s average", "nats") for name in names)
    rows += (("TTT − baseline per group, 2 s average (below 0: TTT better)", "Δ nats"),)
    tokens = max(len(v) for v in groups["ttt"].values())
    layout = stacked_layout(rows, tokens, info or FigureInfo(), height=180 * len(rows) + 120)
    data = []
    common = {"type": "scatter", "x0": 0.0, "dx": 1.0 / FRAME_RATE, "mode": "lines", "xaxis": "x"}
    for row, name in enumerate(names):
        for run in ("ttt", "baseline"):  # the baseline last: drawn on top
            data.append({**common, "y": _rounded(moving_average(groups[run][name], smooth)), "yaxis": _axis(row),
                         "legend": _legend(row), "name": RUN_LABELS[run], "hovertemplate": "%{y:.3f} nats",
                         "showlegend": row == 0,
                         "line": {"color": RUN_COLORS[run], "width": 2, "dash": RUN_DASH[run]}})  # fmt: skip
    last = len(names)
    for name, color in zip(names, GROUP_COLORS[: len(names)], strict=True):  # one or two groups
        diff = groups["ttt"][name] - groups["baseline"][name]
        data.append({**common, "y": _rounded(moving_average(diff, smooth)), "yaxis": _axis(last),
                     "legend": _legend(last), "name": name.split(" (")[0], "hovertemplate": "%{y:+.4f} nats",
                     "line": {"color": color, "width": 2}})  # fmt: skip
    data.append({"type": "scatter", "x": [0.0, tokens / FRAME_RATE], "y": [0.0, 0.0], "mode": "lines", "xaxis": "x",
                 "yaxis": _axis(last), "showlegend": False, "hoverinfo": "skip",
                 "line": {"color": "#999999", "width": 1}})  # fmt: skip
    return {"data": data, "layout": layout}


def codebook_table(document: dict, partial: bool = False) -> list[list]:
    """The table rows (columns: `COLUMNS`): losses to 4 decimals, TTT against the baseline in words.

    Args:
        document: a results document.
        partial: the run was stopped: the group rows say "(partial)".
    """
    from moshi_ttt.reports.headline import change_words

    out = []
    for row in codebook_rows(document):
        cells = []
        for key in COLUMNS.values():
            value = row[key]
            if "%" in key:
                value = change_words(value)
            elif isinstance(value, float):
                value = round(value, 4) if np.isfinite(value) else None
            cells.append(value)
        if partial:
            cells[0] = f"{cells[0]} (partial)"
        out.append(cells)
    return out


def _axis(row: int) -> str:
    return "y" if row == 0 else f"y{row + 1}"


def _legend(row: int) -> str:
    return "legend" if row == 0 else f"legend{row + 1}"


def _rounded(values) -> list:
    return [round(float(v), 5) if np.isfinite(v) else None for v in values]
