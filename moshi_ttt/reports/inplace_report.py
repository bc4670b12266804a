"""Reports of In-Place TTT runs: the results.json "inplace" field, its one-sentence notes, and its figure.

Notation: U chunk updates. `inplace_record` turns a run's In-Place telemetry (scoring/inplace_telemetry.py) into
the field `runs.<name>.inplace` of results.json:
    {"<layer>": {"t": [U] tokens read at each update, "drift": [U] ||W - W0||_F, "drift_relative": [U] over ||W0||_F,
     "raw_update_norm": [U] ||Delta W||_F, "clip_factor": [U], "update_norm": [U] ||eta * clipped Delta W||_F,
     "update_per_entry": [U] update_norm / sqrt(entries), "step_norm": [U] the step float32 kept,
     "changed_fraction": [U] of w_down's entries, "drift_intended": [U] ||eta S||_F (the drift the updates add up
     to, S their float32 sum), "drift_error_relative": [U] ||(W - W0) - eta S||_F / ||eta S||_F (0: float32 kept
     the updates; about 1: they rounded away), "w0_norm", "entries", "float32_resolution" (half an ulp at a typical
     entry), "lr", "clip", "chunk_size", "updates", "changed_any" (some update changed some entry)}}
`inplace_messages` says in one sentence per layer when the updates rounded away (the CLI prints them, and
results_document adds them to config.notes).
"""

from __future__ import annotations

import math

from moshi_ttt.scoring.telemetry import Telemetry

LOST = 0.5  # relative error of the stored drift above which float32 lost most of the updates


def _ratio(num, den) -> list:
    return [float(n / d) if d > 0 else None for n, d in zip(num.tolist(), den.tolist(), strict=True)]


def inplace_record(telemetry: Telemetry | None, row: int = 0) -> dict:
    """The "inplace" field of one batch row (module docstring); {} without In-Place layers."""
    if telemetry is None:
        return {}
    record = {}
    for layer, tel in telemetry.inplace.items():
        update = tel.update_norm[row]
        record[str(layer)] = {
            "t": tel.update_step.tolist(),
            "drift": tel.drift[row].tolist(),
            "drift_relative": (tel.drift[row] / tel.w0_norm).tolist() if tel.w0_norm > 0 else None,
            "drift_intended": tel.intended[row].tolist(),
            "drift_error_relative": _ratio(tel.error[row], tel.intended[row]),
            "raw_update_norm": tel.raw_norm[row].tolist(),
            "clip_factor": tel.clip_factor[row].tolist(),
            "update_norm": update.tolist(),
            "update_per_entry": (update / math.sqrt(tel.entries)).tolist(),
            "step_norm": tel.step_norm[row].tolist(),
            "changed_fraction": tel.changed[row].tolist(),
            "w0_norm": tel.w0_norm,
            "entries": tel.entries,
            "float32_resolution": tel.resolution,
            "lr": tel.lr,
            "clip": tel.clip,
            "chunk_size": tel.chunk_size,
            "updates": int(update.numel()),
            "changed_any": bool((tel.changed[row] > 0).any()),
        }
    return record


def inplace_messages(name: str, run: dict) -> list[str]:
    """One sentence per In-Place layer of a run whose updates (mostly) rounded away in float32; [] otherwise."""
    messages = []
    for layer, rec in (run.get("inplace") or {}).items():
        if not rec["updates"] or not any(u > 0 for u in rec["update_norm"]):
            continue
        per_entry = max(rec["update_per_entry"])
        clip = "no clip" if rec["clip"] is None else f"clip tau = {rec['clip']:g}"
        detail = f"{rec['updates']} chunk updates, lr = {rec['lr']:g}, {clip}"
        if not rec["changed_any"]:
            messages.append(
                f"Run '{name}', layer {layer}: update {per_entry:.0e} per entry, below float32 resolution "
                f"({rec['float32_resolution']:.0e}): the fast weight never changed ({detail})."
            )
            continue
        error = rec["drift_error_relative"][-1]
        if error is not None and error > LOST:
            messages.append(
                f"Run '{name}', layer {layer}: update {per_entry:.0e} per entry, below float32 resolution "
                f"({rec['float32_resolution']:.0e}) for all but {max(rec['changed_fraction']):.2%} of its entries "
                f"(those near 0): the stored drift ({rec['drift'][-1]:.1e}) is {error:.0%} off the "
                f"{rec['drift_intended'][-1]:.1e} its updates add up to ({detail})."
            )
    return messages


def inplace_figure(inplace: dict):
    """Norms per chunk update on a log axis, per layer: the drift ||W - W0|| (absolute, and relative on the second
    row), the raw ||Delta W||, the eta-scaled update, the step float32 kept, the clip factor and the share of entries
    changed. Zeros (updates that rounded away) leave gaps: a log axis has no 0."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from moshi_ttt.data.audio import FRAME_RATE

    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
        subplot_titles=("Frobenius norms per chunk update", "relative drift, clip factor, share of entries changed"),
    )  # fmt: skip
    curves = (
        ("drift", "drift ||W - W0||", "solid", 1),
        ("drift_intended", "drift the updates add up to", "longdash", 1),
        ("raw_update_norm", "raw update ||dW||", "dot", 1),
        ("update_norm", "lr * clipped update", "dash", 1),
        ("step_norm", "step kept by float32", "dashdot", 1),
        ("drift_relative", "relative drift", "solid", 2),
        ("clip_factor", "clip factor", "dot", 2),
        ("changed_fraction", "share of entries changed", "dash", 2),
    )
    for layer, rec in inplace.items():
        x = [t / FRAME_RATE for t in rec["t"]]
        for key, label, dash, row in curves:
            values = rec.get(key) or []
            y = [v if v is not None and math.isfinite(v) and v > 0 else None for v in values]
            fig.add_trace(
                go.Scatter(x=x, y=y, mode="lines+markers", name=f"layer {layer} {label}", line={"dash": dash}),
                row=row, col=1,
            )  # fmt: skip
    fig.update_yaxes(type="log", exponentformat="e")
    fig.update_xaxes(title_text="time (s)", row=2, col=1)
    fig.update_layout(title="In-Place fast weight w_down per chunk (log axes; gaps are zeros)", height=640)
    return fig
