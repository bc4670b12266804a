"""What the app shows of an In-Place TTT model (the In-Place fork's checkpoints): the live figure's rows 3 and 4
and the one-sentence verdicts per layer. Gradio-free; the curves and sentences are reports/inplace_report.py's.

The record is results.json's "inplace" field of the TTT run (`inplace_report.inplace_record`), from a partial
`iter_score` result while the run goes and from the whole run at its end.
"""

from __future__ import annotations

import math

from moshi_ttt.reports.figures import FRAME_RATE
from moshi_ttt.reports.inplace_report import CURVES, inplace_verdicts, positive_or_none, resolution_norm

INPLACE_ROW_TITLES = (  # (title, y-axis title) of the live figure's rows 3 and 4 for an In-Place model
    ("In-Place fast weight per chunk (log): drift ÷ ||W0||, clip factor, share of entries changed", "ratio (log)"),
    ("In-Place updates per chunk (log): Frobenius norms; grey: float32 resolution", "‖·‖_F (log)"),
)
RESOLUTION_COLOR = "#999999"
SIGNIFICANT = 6  # digits kept in the JSON: the values span 1e-12 to 1e2, so decimals would not do


def _significant(values) -> list:
    return [None if v is None else float(f"{v:.{SIGNIFICANT}g}") for v in positive_or_none(values)]


def inplace_traces(layer: str, record: dict, dash: str, legend: bool = True) -> list[tuple[int, dict]]:
    """The curves of one In-Place layer as (row, trace): row 0 the unitless ones (relative drift, clip factor, share
    of entries changed), row 1 the Frobenius norms and the float32 resolution line. A colour per curve, `dash` per
    layer (`layers_title` says which), one legend entry per curve for all layers (Moshi's runs have 3 to 5 layers);
    zeros are gaps (the axes are logarithmic), so an update that rounded away leaves a gap in "step kept by float32".

    Args:
        layer: the layer index as results.json names it.
        record: its "inplace" record (`inplace_report.inplace_record`).
        dash: the layer's line dash.
        legend: list its curves in the legend (the first layer's; the others share their entries).
    """
    x = [round(t / FRAME_RATE, 4) for t in record["t"]]
    traces = []
    for key, label, _, color, unitless in CURVES:
        traces.append((0 if unitless else 1, {
            "type": "scatter", "x": x, "y": _significant(record.get(key)), "mode": "lines+markers", "name": label,
            "legendgroup": f"inplace {key}", "showlegend": legend, "marker": {"size": 4},
            "line": {"color": color, "dash": dash, "width": 1.5}, "hovertemplate": f"layer {layer}: %{{y:.3e}}",
        }))  # fmt: skip
    resolution = resolution_norm(record)
    if x and math.isfinite(resolution) and resolution > 0:
        traces.append((1, {
            "type": "scatter", "x": [x[0], x[-1]], "y": [resolution, resolution], "mode": "lines",
            "name": "float32 resolution x √entries", "legendgroup": "inplace resolution", "showlegend": legend,
            "line": {"color": RESOLUTION_COLOR, "dash": dash, "width": 1},
            "hovertemplate": f"layer {layer}: %{{y:.1e}}",
        }))  # fmt: skip
    return traces


def layers_title(title: str, dashes: dict[str, str]) -> str:
    """A row title with the dash of each layer: "... · layer 10 solid, layer 20 dash"."""
    return title + " · " + ", ".join(f"layer {layer} {dash}" for layer, dash in dashes.items()) if dashes else title


def inplace_markdown(inplace: dict, done: bool) -> str:
    """The verdicts of a TTT run's In-Place layers under a caption ("" without In-Place layers): shown above the
    figure while the run goes and when it ends.

    Args:
        inplace: the TTT run's "inplace" record.
        done: the run has ended (the caption says "so far" otherwise).
    """
    if not inplace:
        return ""
    caption = "**In-Place fast weight w_down**" + ("" if done else " (so far)")
    return caption + "\n\n" + "\n".join(f"- {verdict}" for verdict in inplace_verdicts(inplace))
