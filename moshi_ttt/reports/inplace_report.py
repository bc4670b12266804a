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
results_document adds them to config.notes); `inplace_verdicts` says in one sentence per layer what happened, also
when float32 kept the updates (the app shows them). `CURVES` are the curves of `inplace_figure` and the app's live
figure.
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


def rounding_verdict(layer: str, rec: dict) -> str | None:
    """One sentence when a layer's updates (mostly) rounded away in float32, "layer L: update ... per entry, below
    float32 resolution ..."; None when float32 kept them or there was no nonzero update."""
    if not rec["updates"] or not any(u > 0 for u in rec["update_norm"]):
        return None
    per_entry = max(rec["update_per_entry"])
    detail = _detail(rec)
    if not rec["changed_any"]:
        return (
            f"layer {layer}: update {per_entry:.0e} per entry, below float32 resolution "
            f"({rec['float32_resolution']:.0e}): the fast weight never changed ({detail})."
        )
    error = rec["drift_error_relative"][-1]
    if error is not None and error > LOST:
        return (
            f"layer {layer}: update {per_entry:.0e} per entry, below float32 resolution "
            f"({rec['float32_resolution']:.0e}) for all but {max(rec['changed_fraction']):.2%} of its entries "
            f"(those near 0): the stored drift ({rec['drift'][-1]:.1e}) is {error:.0%} off the "
            f"{rec['drift_intended'][-1]:.1e} its updates add up to ({detail})."
        )
    return None


def _detail(rec: dict) -> str:
    clip = "no clip" if rec["clip"] is None else f"clip tau = {rec['clip']:g}"
    return f"{rec['updates']} chunk updates, lr = {rec['lr']:g}, {clip}"


def inplace_messages(name: str, run: dict) -> list[str]:
    """One sentence per In-Place layer of a run whose updates (mostly) rounded away in float32; [] otherwise."""
    found = (rounding_verdict(layer, rec) for layer, rec in (run.get("inplace") or {}).items())
    return [f"Run '{name}', {verdict}" for verdict in found if verdict]


def inplace_verdicts(inplace: dict) -> list[str]:
    """One sentence per In-Place layer of an "inplace" record, whatever happened: no update yet, updates that
    rounded away (`rounding_verdict`), or updates float32 kept, with the drift they made (the app shows them)."""
    verdicts = []
    for layer, rec in inplace.items():
        verdict = rounding_verdict(layer, rec)
        if verdict is None and not rec["updates"]:
            verdict = f"layer {layer}: no chunk update yet (one every {rec['chunk_size']} tokens)."
        elif verdict is None and not any(u > 0 for u in rec["update_norm"]):
            verdict = f"layer {layer}: every update was 0, the fast weight never changed ({_detail(rec)})."
        elif verdict is None:
            verdict = _kept_verdict(layer, rec)
        verdicts.append(verdict)
    return verdicts


def _kept_verdict(layer: str, rec: dict) -> str:
    """The sentence of a layer whose stored drift is (mostly) what its updates add up to."""
    relative = rec["drift_relative"][-1] if rec["drift_relative"] else None
    moved = f"relative drift {relative:.1e}" if relative is not None else f"drift {rec['drift'][-1]:.1e}"
    per_entry, resolution = max(rec["update_per_entry"]), rec["float32_resolution"]
    tail = f"clip factor {min(rec['clip_factor']):.2g} at its smallest; {_detail(rec)}"
    if per_entry >= resolution:
        return (
            f"layer {layer}: update {per_entry:.0e} per entry, above float32 resolution ({resolution:.0e}): float32 "
            f"kept the updates and the fast weight moved ({moved}, {tail})."
        )
    error = rec["drift_error_relative"][-1]
    off = f"{error:.0%} off" if error is not None else "near"
    return (
        f"layer {layer}: each update ({per_entry:.0e} per entry) is below float32 resolution ({resolution:.0e}), but "
        f"the fast weight is W0 + lr x their sum, rounded once, so float32 keeps more of it as the sum grows: the "
        f"stored drift ({rec['drift'][-1]:.1e}) is {off} the {rec['drift_intended'][-1]:.1e} the updates add up to "
        f"({moved}, {tail})."
    )


def resolution_norm(rec: dict) -> float:
    """The Frobenius norm of an update of half a float32 ulp at every entry of typical size: an update far below it
    rounds away (the reference line of the figures)."""
    return rec["float32_resolution"] * math.sqrt(rec["entries"])


def positive_or_none(values) -> list:
    """Values for a log axis: zeros, negatives, non-finite values and None become gaps."""
    return [v if v is not None and math.isfinite(v) and v > 0 else None for v in values or []]


# The curves of the In-Place figures: (key of the record, label, dash, colour, unitless). Unitless curves (relative
# drift, clip factor, share of entries changed) share one row, the Frobenius norms another.
CURVES = (
    ("drift", "drift ||W - W0||", "solid", "#00a67d", False),
    ("drift_intended", "drift the updates add up to", "longdash", "#7f7f7f", False),
    ("raw_update_norm", "raw update ||dW||", "dot", "#ab63fa", False),
    ("update_norm", "lr * clipped update", "dash", "#ef553b", False),
    ("step_norm", "step kept by float32", "dashdot", "#1f3fbf", False),
    ("drift_relative", "relative drift", "solid", "#00a67d", True),
    ("clip_factor", "clip factor", "dot", "#ff8c1a", True),
    ("changed_fraction", "share of entries changed", "dash", "#1f3fbf", True),
)


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
    for layer, rec in inplace.items():
        x = [t / FRAME_RATE for t in rec["t"]]
        for key, label, dash, _, unitless in CURVES:
            fig.add_trace(
                go.Scatter(x=x, y=positive_or_none(rec.get(key)), mode="lines+markers", name=f"layer {layer} {label}",
                           line={"dash": dash}),
                row=2 if unitless else 1, col=1,
            )  # fmt: skip
        if x:
            fig.add_trace(
                go.Scatter(x=[x[0], x[-1]], y=[resolution_norm(rec)] * 2, mode="lines", line={"color": "#999999"},
                           name=f"layer {layer} float32 resolution x sqrt(entries)"),
                row=1, col=1,
            )  # fmt: skip
    fig.update_yaxes(type="log", exponentformat="e")
    fig.update_xaxes(title_text="time (s)", row=2, col=1)
    fig.update_layout(title="In-Place fast weight w_down per chunk (log axes; gaps are zeros)", height=640)
    return fig
