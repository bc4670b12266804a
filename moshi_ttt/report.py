"""Results of scoring runs: summary statistics, results.json (DESIGN.md contract), results.csv and report.html.

Notation: T steps (tokens at 12.5 Hz), K = 8 audio codebooks, U inner-loop updates.
Everything here takes plain arrays or ScoreResults and returns numbers, dicts or files; nothing is printed.
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import FRAME_RATE
from .scoring import ScoreResult
from .telemetry import Telemetry

RESULTS_VERSION = 1
DEFAULT_BIN_SIZE = 250  # tokens per position bin (20 s)


@dataclass(frozen=True)
class Summary:
    """Summary of one run's per-token losses."""

    mean_loss: float  # nats per valid (token, codebook), NaN if nothing is valid
    perplexity: float  # exp(mean_loss)
    slope_per_1k_tokens: float  # least-squares slope of loss_per_token vs step, per 1,000 steps
    bin_starts: list[int]  # first step of each position bin
    bin_loss: list[float]  # mean loss_per_token inside each bin (NaN where no step is valid)


def _as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def least_squares_slope(loss_per_token, per: float = 1000.0) -> float:
    """Slope of the least-squares line through (step, loss) over the finite values, times `per`.

    Args:
        loss_per_token: [T] with NaN where invalid.
    Returns:
        loss change per `per` steps; NaN with fewer than two finite values.
    """
    y = _as_array(loss_per_token)
    x = np.arange(y.shape[0], dtype=np.float64)
    keep = np.isfinite(y)
    if keep.sum() < 2:
        return float("nan")
    x, y = x[keep], y[keep]
    x_c = x - x.mean()
    return float((x_c * (y - y.mean())).sum() / (x_c * x_c).sum() * per)


def position_bins(loss_per_token, bin_size: int = DEFAULT_BIN_SIZE) -> tuple[list[int], list[float]]:
    """Mean of the finite losses in consecutive bins of `bin_size` steps (the last bin may be shorter).

    Returns:
        (first step of each bin, mean loss of each bin; NaN for a bin without finite values)
    """
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    y = _as_array(loss_per_token)
    starts, means = [], []
    for start in range(0, y.shape[0], bin_size):
        part = y[start : start + bin_size]
        part = part[np.isfinite(part)]
        starts.append(start)
        means.append(float(part.mean()) if part.size else float("nan"))
    return starts, means


def improvement_per_bin(baseline_loss, ttt_loss, bin_size: int = DEFAULT_BIN_SIZE) -> tuple[list[int], list[float]]:
    """Baseline minus TTT mean loss per position bin (positive: TTT predicts better), on the same audio."""
    base, ttt = _as_array(baseline_loss), _as_array(ttt_loss)
    if base.shape != ttt.shape:
        raise ValueError(f"the runs must cover the same steps, got {base.shape[0]} and {ttt.shape[0]}")
    both = np.isfinite(base) & np.isfinite(ttt)
    starts, b = position_bins(np.where(both, base, np.nan), bin_size)
    _, t = position_bins(np.where(both, ttt, np.nan), bin_size)
    return starts, [x - y for x, y in zip(b, t, strict=True)]


def summarize(loss: torch.Tensor | np.ndarray, bin_size: int = DEFAULT_BIN_SIZE) -> Summary:
    """Summary of per-codebook losses [K, T] (NaN where invalid) of one audio."""
    loss = _as_array(loss)
    if loss.ndim != 2:
        raise ValueError(f"expected losses [K, T], got shape {list(loss.shape)}")
    finite = loss[np.isfinite(loss)]
    mean = float(finite.mean()) if finite.size else float("nan")
    per_token = _nanmean(loss, axis=0)
    starts, means = position_bins(per_token, bin_size)
    return Summary(mean, math.exp(mean) if math.isfinite(mean) else float("nan"), least_squares_slope(per_token),
                   starts, means)  # fmt: skip


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    count = np.isfinite(x).sum(axis=axis)
    total = np.where(np.isfinite(x), x, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def telemetry_record(telemetry: Telemetry | None, row: int = 0) -> tuple[dict, dict]:
    """(drift, inner_loss) dicts of one batch row for results.json, keyed by layer index as a string."""
    drift, inner = {}, {}
    if telemetry is None:
        return drift, inner
    for layer, tel in telemetry.layers.items():
        steps = tel.update_step.tolist()
        drift[str(layer)] = {name: values[row].tolist() for name, values in tel.drift.items()}
        drift[str(layer)]["t"] = steps
        drift[str(layer)]["final"] = {name: float(v[row]) for name, v in tel.final_drift.items()}
        inner[str(layer)] = {
            "base": tel.loss_base[row].tolist(),
            "start": tel.loss_start[row].tolist(),
            "after": tel.loss_after[row].tolist(),
            "target_variance": tel.target_variance[row].tolist(),
            "t": steps,
        }
    return drift, inner


def run_record(
    result: ScoreResult,
    *,
    checkpoint: str,
    row: int = 0,
    peak_memory_mb: float | None = None,
    bin_size: int = DEFAULT_BIN_SIZE,
) -> dict:
    """One entry of results.json "runs" for batch row `row` of a complete ScoreResult (DESIGN.md contract)."""
    if not result.complete:
        raise ValueError("run_record needs a complete ScoreResult, got a partial one")
    loss = result.loss[row].float().cpu()  # [K, T]
    summary = summarize(loss, bin_size)
    drift, inner = telemetry_record(result.telemetry, row)
    return {
        "checkpoint": checkpoint,
        "tokens": result.total_tokens,
        "loss_per_token": _nanmean(_as_array(loss), axis=0).tolist(),
        "loss_per_codebook": loss.tolist(),
        "mean_loss": summary.mean_loss,
        "perplexity": summary.perplexity,
        "slope_per_1k_tokens": summary.slope_per_1k_tokens,
        "loss_per_bin": {"bin_size": bin_size, "start": summary.bin_starts, "loss": summary.bin_loss},
        "drift": drift,
        "inner_loss": inner,
        "tokens_per_s": result.tokens_per_s,
        "peak_memory_mb": peak_memory_mb,
    }


def results_document(audio: dict, config: dict, runs: dict[str, dict], bin_size: int = DEFAULT_BIN_SIZE) -> dict:
    """The results.json document; with a "baseline" run and others, adds each one's improvement per bin."""
    doc = {"version": RESULTS_VERSION, "audio": audio, "config": config, "runs": runs}
    if "baseline" in runs:
        comparisons = {}
        for name, run in runs.items():
            if name != "baseline":
                starts, gain = improvement_per_bin(runs["baseline"]["loss_per_token"], run["loss_per_token"], bin_size)
                comparisons[name] = {"bin_size": bin_size, "start": starts, "improvement": gain}
        doc["improvement_over_baseline"] = comparisons
    return doc


def to_json_safe(value):
    """NaN and infinities -> None (JSON null), recursively through dicts, lists, tuples and numpy/torch scalars."""
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return to_json_safe(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, document: dict) -> Path:
    """Writes `document` as strict JSON (NaN written as null)."""
    path = Path(path)
    path.write_text(json.dumps(to_json_safe(document), indent=1, allow_nan=False) + "\n")
    return path


def write_csv(path: str | Path, runs: dict[str, dict], frame_rate: float = FRAME_RATE) -> Path:
    """Per-token CSV, one row per (run, step): run, step, time_s, loss, loss_cb0 ... (empty where invalid)."""
    path = Path(path)
    num_cb = max((len(run["loss_per_codebook"]) for run in runs.values()), default=0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "time_s", "loss", *(f"loss_cb{k}" for k in range(num_cb))])
        for name, run in runs.items():
            per_cb = run["loss_per_codebook"]
            for step, value in enumerate(run["loss_per_token"]):
                cells = [value, *(cb[step] for cb in per_cb)]
                writer.writerow([name, step, f"{step / frame_rate:.3f}", *(_csv_cell(c) for c in cells)])
    return path


def _csv_cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}"


def write_html(path: str | Path, title: str, figures: list, tables: dict[str, list[dict]] | None = None) -> Path:
    """A self-contained report page: Plotly's JavaScript inlined once, so it opens offline.

    Args:
        figures: plotly Figures, shown in order.
        tables: caption -> rows (dicts with the same keys), shown after the figures.
    """
    parts = []
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_height="420px"))
    for caption, rows in (tables or {}).items():
        parts.append(_html_table(caption, rows))
    body = "\n".join(parts)
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _html_table(caption: str, rows: list[dict]) -> str:
    if not rows:
        return f"<p>{html.escape(caption)}: no rows</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def summary_rows(document: dict) -> list[dict]:
    """One row per run of a results document: the table at the top of report.html."""
    rows = []
    for name, run in document["runs"].items():
        rows.append(
            {
                "run": name,
                "checkpoint": run.get("checkpoint"),
                "tokens": run.get("tokens"),
                "mean loss": run.get("mean_loss"),
                "perplexity": run.get("perplexity"),
                "slope / 1k tokens": run.get("slope_per_1k_tokens"),
                "tokens/s": run.get("tokens_per_s"),
                "peak MB": run.get("peak_memory_mb"),
            }
        )
    return rows


def write_report(out_dir: str | Path, document: dict, title: str = "moshi-ttt scoring report") -> dict[str, Path]:
    """Writes results.json, results.csv and a self-contained report.html for one audio into `out_dir`."""
    from . import plots  # plotly is only needed for the HTML page

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = document["runs"]
    figures = [plots.loss_figure({name: run["loss_per_token"] for name, run in runs.items()})]
    bins = {name: (run["loss_per_bin"]["start"], run["loss_per_bin"]["loss"]) for name, run in runs.items()}
    figures.append(plots.bins_figure(bins, "Mean loss per position bin", "cross-entropy (nats)"))
    gains = document.get("improvement_over_baseline", {})
    if gains:
        gain_bins = {name: (g["start"], g["improvement"]) for name, g in gains.items()}
        figures.append(plots.bins_figure(gain_bins, "Improvement over the baseline per bin", "loss reduction (nats)"))
    for name, run in runs.items():
        if run.get("drift"):
            figures.append(plots.drift_figure(run["drift"]).update_layout(title=f"{name}: fast-weight drift"))
            figures.append(plots.inner_loss_figure(run["inner_loss"]).update_layout(title=f"{name}: inner-loop loss"))
    tables = {"Summary": summary_rows(document), **document.get("tables", {})}
    return {
        "json": write_json(out_dir / "results.json", document),
        "csv": write_csv(out_dir / "results.csv", runs),
        "html": write_html(out_dir / "report.html", title, figures, tables),
    }
