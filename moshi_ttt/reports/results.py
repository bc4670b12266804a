"""Results of scoring runs: summary statistics, results.json (ARCHITECTURE.md, "Results"), results.csv and report.html.

Notation: T steps (tokens at 12.5 Hz), K = 8 audio codebooks, U inner-loop updates.
Everything here takes plain arrays or ScoreResults and returns numbers, dicts or files; nothing is printed.

Fields of a run beyond the contract (ARCHITECTURE.md, "Results"):
- `non_finite_tokens`: [K] counts of valid (moshi-masked-in) tokens whose loss is NaN or infinite (the model's
  logits were NaN or inf there). When any is non-zero, `mean_loss` and `perplexity` are NaN: a broken model never
  reports a healthy mean. `non_finite_message` turns it into one sentence naming the run and the codebooks.
- `causal_comparison` (older, non-causal TTT checkpoints only; `causal_comparison` below): the same weights
  scored causally next to the legacy (leaky) scoring, {"mini_batch_size": b, "mean_loss_leaky": the run's
  mean_loss, "mean_loss_causal": mean loss with every token seeing only its past, "difference": causal - leaky
  (nats; > 0 is the part of the legacy result that came from up to b - 1 future tokens of each mini-batch),
  "loss_per_token_causal": [T]}.
- `inplace` (In-Place TTT checkpoints only): per layer and chunk update, the drift of the fast weight w_down, the
  raw and eta-scaled update norms, the clip factor and what float32 kept of each update (reports/inplace_report.py).
- `loss_views` (when the caller gives them: the CLI does): `reports.loss_views.LossViews` as a dict: the mean loss
  per codebook, of codebook 0 (semantic) and of codebooks 1-7 (acoustic), moshi-finetune's weighted audio loss and,
  when a text is scored, the text loss, its weighted form and moshi-finetune's total; `text_loss_per_token` [T]
  beside them when a text is scored.
`results_document` adds one plain-language note per such finding to `config["notes"][run]` (the list the app shows),
among them one sentence per In-Place layer whose updates rounded away in float32, and report.html shows the notes,
a causal-vs-leaky table and a loss figure per compared run, and the In-Place figure (log axes).
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moshi_ttt.data.audio import FRAME_RATE
from moshi_ttt.reports import headline
from moshi_ttt.reports.codebooks import codebook_rows
from moshi_ttt.reports.inplace_report import inplace_figure, inplace_messages, inplace_record
from moshi_ttt.reports.loss_views import LossViews, view_rows
from moshi_ttt.reports.outdir import atomic_write_text
from moshi_ttt.scoring.teacher_forcing import ScoreResult
from moshi_ttt.scoring.telemetry import Telemetry

RESULTS_VERSION = 2  # 2 adds "mean_loss_past_context", "context_tokens" and "readings" to each run
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


def position_bins(
    loss_per_token, bin_size: int = DEFAULT_BIN_SIZE, merge_tail: bool = True
) -> tuple[list[int], list[float]]:
    """Mean of the finite losses in consecutive bins of `bin_size` steps.

    With `merge_tail` (one file's summary: results.json `loss_per_bin` and `improvement_over_baseline`), a remainder
    shorter than half a bin joins the bin before it (a 0.4 s tail bin is noise, not a finding), so the last bin
    runs from its start to the end of the clip and holds between half a bin and one and a half bins; a clip shorter
    than a bin is one bin. Without it (the bins that aggregate.py pools across files), bin i is exactly steps
    [i * bin_size, (i + 1) * bin_size), the last one partial.

    Returns:
        (first step of each bin, mean loss of each bin; NaN for a bin without finite values)
    """
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    y = _as_array(loss_per_token)
    starts = list(range(0, y.shape[0], bin_size))
    if merge_tail and len(starts) > 1 and y.shape[0] - starts[-1] < bin_size / 2:
        starts.pop()
    means = []
    for i, start in enumerate(starts):
        part = y[start : starts[i + 1] if i + 1 < len(starts) else None]
        part = part[np.isfinite(part)]
        means.append(float(part.mean()) if part.size else float("nan"))
    return starts, means


def improvement_per_bin(
    baseline_loss, ttt_loss, bin_size: int = DEFAULT_BIN_SIZE, merge_tail: bool = True
) -> tuple[list[int], list[float]]:
    """Baseline minus TTT mean loss per position bin (positive: TTT predicts better), on the same audio; bins as
    `position_bins`."""
    base, ttt = _as_array(baseline_loss), _as_array(ttt_loss)
    if base.shape != ttt.shape:
        raise ValueError(f"the runs must cover the same steps, got {base.shape[0]} and {ttt.shape[0]}")
    both = np.isfinite(base) & np.isfinite(ttt)
    starts, b = position_bins(np.where(both, base, np.nan), bin_size, merge_tail)
    _, t = position_bins(np.where(both, ttt, np.nan), bin_size, merge_tail)
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
    context_tokens: int | None = None,
    readings: list | None = None,
    views: LossViews | None = None,
) -> dict:
    """One entry of results.json "runs" for batch row `row` of a complete ScoreResult (ARCHITECTURE.md, "Results").

    Args:
        context_tokens: the model's attention context (`LMModel.context`), for "mean_loss_past_context".
        readings: `headline.Reading`s of a passage the clip repeats, for "readings" (absent when None or empty).
        views: the run's loss views (`loss_views.from_result`), for "loss_views" (absent when None).
    """
    if not result.complete:
        raise ValueError("run_record needs a complete ScoreResult, got a partial one")
    loss = result.loss[row].float().cpu()  # [K, T]
    summary = summarize(loss, bin_size)
    drift, inner = telemetry_record(result.telemetry, row)
    broken = (result.mask[row].cpu() & ~torch.isfinite(loss)).sum(dim=-1).tolist()  # [K] valid but non-finite
    mean = float("nan") if any(broken) else summary.mean_loss
    return {
        "checkpoint": checkpoint,
        "tokens": result.total_tokens,
        "loss_per_token": _nanmean(_as_array(loss), axis=0).tolist(),
        "loss_per_codebook": loss.tolist(),
        "mean_loss": mean,
        "perplexity": math.exp(mean) if math.isfinite(mean) else float("nan"),
        "non_finite_tokens": [int(n) for n in broken],
        "slope_per_1k_tokens": summary.slope_per_1k_tokens,
        "loss_per_bin": {"bin_size": bin_size, "start": summary.bin_starts, "loss": summary.bin_loss},
        "drift": drift,
        "inner_loss": inner,
        **({"inplace": inplace_record(result.telemetry, row)} if result.telemetry and result.telemetry.inplace else {}),
        "tokens_per_s": result.tokens_per_s,
        "peak_memory_mb": peak_memory_mb,
        **past_context_fields(loss, context_tokens, readings),
        **_text_fields(result, row, views),
    }


def _text_fields(result: ScoreResult, row: int, views: LossViews | None) -> dict:
    fields = {} if views is None else {"loss_views": views.as_dict()}
    if result.text_loss is not None:
        fields["text_loss_per_token"] = result.text_loss[row].float().cpu().tolist()
    return fields


def past_context_fields(loss, context_tokens: int | None, readings: list | None = None) -> dict:
    """The version-2 fields of a run record from its losses [K, T]: what only TTT memory can change.

    Returns:
        {"context_tokens", "mean_loss_past_context", and "readings" when `readings` is not empty}.
    """
    loss = _as_array(loss)
    fields = {
        "context_tokens": context_tokens,
        "mean_loss_past_context": headline.mean_loss_past_context(loss, context_tokens),
    }
    if readings:
        fields["readings"] = headline.reading_losses(loss, readings)
    return fields


def non_finite_message(name: str, run: dict) -> str | None:
    """One sentence naming the run and the codebooks whose loss went NaN/inf at valid tokens; None if none did."""
    counts = run.get("non_finite_tokens") or []
    bad = [k for k, n in enumerate(counts) if n]
    if not bad:
        return None
    books = ", ".join(str(k) for k in bad)
    return (
        f"Run '{name}' went non-finite: codebook{'s' if len(bad) > 1 else ''} {books} "
        f"{'have' if len(bad) > 1 else 'has'} NaN or infinite losses at {sum(counts)} valid token(s) (the model's "
        "logits are NaN or inf there), so its mean loss is reported as NaN."
    )


def causal_comparison(leaky_run: dict, causal: ScoreResult, mini_batch_size: int, row: int = 0) -> dict:
    """The `causal_comparison` field (module docstring) of a non-causal legacy run from its causal scoring."""
    causal_run = run_record(causal, checkpoint=leaky_run["checkpoint"], row=row)
    leaky, causal_mean = leaky_run["mean_loss"], causal_run["mean_loss"]
    return {
        "mini_batch_size": int(mini_batch_size),
        "mean_loss_leaky": leaky,
        "mean_loss_causal": causal_mean,
        "difference": causal_mean - leaky,
        "loss_per_token_causal": causal_run["loss_per_token"],
    }


def causal_comparison_message(name: str, comparison: dict) -> str:
    """One sentence on how much of a legacy run's loss came from the future-token leak."""
    b = comparison["mini_batch_size"]
    return (
        f"Run '{name}' (older non-causal TTT checkpoint): scored causally, with the same weights, its mean loss is "
        f"{_fmt(comparison['mean_loss_causal'])} nats instead of {_fmt(comparison['mean_loss_leaky'])} "
        f"(difference {_fmt(comparison['difference'])} nats: the part of the legacy result that came from seeing up "
        f"to {b - 1} future tokens of each {b}-token mini-batch)."
    )


def results_document(audio: dict, config: dict, runs: dict[str, dict], bin_size: int = DEFAULT_BIN_SIZE) -> dict:
    """The results.json document; with a "baseline" run and others, adds each one's improvement per bin.

    Non-finite runs and causal comparisons each add a sentence to `config["notes"][run]` (module docstring).
    """
    config = dict(config)
    notes = {run: list(values) for run, values in (config.get("notes") or {}).items()}
    for name, run in runs.items():
        found = [non_finite_message(name, run)]
        if run.get("causal_comparison"):
            found.append(causal_comparison_message(name, run["causal_comparison"]))
        found.extend(inplace_messages(name, run))
        for note in filter(None, found):
            notes.setdefault(name, []).append(note)
    if notes or "notes" in config:
        config["notes"] = notes
    doc = {"version": RESULTS_VERSION, "audio": audio, "config": config, "versions": versions(), "runs": runs}
    if "baseline" in runs:
        comparisons = {}
        for name, run in runs.items():
            if name != "baseline":
                starts, gain = improvement_per_bin(runs["baseline"]["loss_per_token"], run["loss_per_token"], bin_size)
                comparisons[name] = {"bin_size": bin_size, "start": starts, "improvement": gain}
        doc["improvement_over_baseline"] = comparisons
    return doc


def versions() -> dict[str, str]:
    """Versions of the packages that produced a result: moshi_ttt, moshi, torch."""
    from importlib import metadata

    from moshi_ttt import __version__

    found = {"moshi_ttt": __version__, "torch": torch.__version__}
    try:
        found["moshi"] = metadata.version("moshi")
    except metadata.PackageNotFoundError:
        found["moshi"] = "unknown"
    return found


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
    """Writes `document` as strict JSON (NaN written as null), atomically (a temporary file renamed over `path`)."""
    return atomic_write_text(path, json.dumps(to_json_safe(document), indent=1, allow_nan=False) + "\n")


def write_csv(path: str | Path, runs: dict[str, dict], frame_rate: float = FRAME_RATE) -> Path:
    """Per-token CSV, one row per (run, step): run, step, time_s, loss, loss_cb0 ... and text_loss when a run scored
    a text (empty where invalid)."""
    path = Path(path)
    num_cb = max((len(run["loss_per_codebook"]) for run in runs.values()), default=0)
    text = any(run.get("text_loss_per_token") is not None for run in runs.values())
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        columns = ["run", "step", "time_s", "loss", *(f"loss_cb{k}" for k in range(num_cb))]
        writer.writerow(columns + (["text_loss"] if text else []))
        for name, run in runs.items():
            per_cb = run["loss_per_codebook"]
            text_loss = run.get("text_loss_per_token")
            for step, value in enumerate(run["loss_per_token"]):
                cells = [value, *(cb[step] for cb in per_cb)]
                if text:
                    cells.append(None if text_loss is None else text_loss[step])
                writer.writerow([name, step, f"{step / frame_rate:.3f}", *(_csv_cell(c) for c in cells)])
    return path


def _csv_cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}"


PLOTLY_CDN_NOTE = (
    "The figures load plotly.js from its CDN (cdn.plot.ly), which keeps this page small; offline, the tables still "
    "hold every number and results.json / results.csv the curves."
)


def write_html(
    path: str | Path,
    title: str,
    figures: list,
    tables: dict[str, list[dict]] | None = None,
    header: dict[str, list[dict]] | None = None,
    plotly_js: str = "cdn",
) -> Path:
    """A report page: tables and Plotly figures.

    Args:
        figures: plotly Figures, shown in order.
        tables: caption -> rows (dicts with the same keys), shown after the figures.
        header: tables shown before the figures (what the report is about).
        plotly_js: "cdn" (the default: a page of a few hundred KB whose figures need the network) or "inline"
            (plotly.js, 4.6 MB, inlined once: the page works offline).
    Returns:
        The path written.
    """
    if plotly_js not in ("cdn", "inline"):
        raise ValueError(f"plotly_js must be 'cdn' or 'inline', got {plotly_js!r}")
    parts = [_html_table(caption, rows) for caption, rows in (header or {}).items()]
    if plotly_js == "cdn" and figures:
        parts.append(f"<p><small>{html.escape(PLOTLY_CDN_NOTE)}</small></p>")
    for i, fig in enumerate(figures):
        include = ("cdn" if plotly_js == "cdn" else True) if i == 0 else False
        parts.append(fig.to_html(full_html=False, include_plotlyjs=include, default_height="420px"))
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


def summary_rows(document: dict, baseline_run: str = "baseline") -> list[dict]:
    """One row per run of a results document: the summary table of report.html and of the app (which shows some
    of its columns, rounded). Improvements are TTT's over `baseline_run` in percent (positive: lower loss), None
    for the baseline itself or without one."""
    from moshi_ttt.reports.headline import improvement_pct

    runs = document["runs"]
    base = runs.get(baseline_run)
    rows = []
    for name, run in runs.items():
        compared = base is not None and name != baseline_run
        rows.append(
            {
                "run": name,
                "checkpoint": run.get("checkpoint"),
                "tokens": run.get("tokens"),
                "mean loss": run.get("mean_loss"),
                "improvement %": improvement_pct(base.get("mean_loss"), run.get("mean_loss")) if compared else None,
                "mean loss past context": run.get("mean_loss_past_context"),
                "improvement % past context": (
                    improvement_pct(base.get("mean_loss_past_context"), run.get("mean_loss_past_context"))
                    if compared
                    else None
                ),
                "perplexity": run.get("perplexity"),
                "slope / 1k tokens": run.get("slope_per_1k_tokens"),
                "tokens/s": run.get("tokens_per_s"),
                "peak MB": run.get("peak_memory_mb"),
            }
        )
    return rows


def metadata_rows(document: dict) -> list[dict]:
    """What produced a report: the clip, the settings, the checkpoints and the package versions (one row each)."""
    audio = document.get("audio", {})
    rows = [{"what": "clip", "value": audio.get("name") or audio.get("path")}]
    if audio.get("duration_s") is not None:
        rows.append({"what": "duration", "value": f"{audio['duration_s']:.2f} s, {audio.get('tokens')} tokens"})
    for key, value in document.get("config", {}).items():
        if key != "notes":
            rows.append({"what": f"setting: {key}", "value": json.dumps(to_json_safe(value))})
    for name, run in document["runs"].items():
        rows.append({"what": f"checkpoint: {name}", "value": run.get("checkpoint")})
    for package, version in document.get("versions", {}).items():
        rows.append({"what": f"version: {package}", "value": version})
    return rows


def file_stem(document: dict) -> str:
    """A file-name-safe stem of the clip's name ("audio" when it has none)."""
    audio = document.get("audio", {})
    name = Path(str(audio.get("name") or audio.get("path") or "audio")).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "audio"


def write_report(
    out_dir: str | Path,
    document: dict,
    title: str = "moshi-ttt scoring report",
    prefix: str = "",
    plotly_js: str = "cdn",
) -> dict[str, Path]:
    """Writes PREFIXresults.json, PREFIXresults.csv and PREFIXreport.html for one audio.

    Args:
        prefix: put before each file name (the app uses the clip's stem and "_", so downloads say which clip).
        plotly_js: "cdn" or "inline", as for `write_html`.
    Returns:
        {"json", "csv", "html"}: the paths written.
    """
    from moshi_ttt.reports import figures as plots  # plotly is only needed for the HTML page

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = document["runs"]
    figures = [plots.loss_figure({name: run["loss_per_token"] for name, run in runs.items()})]
    bins = {name: (run["loss_per_bin"]["start"], run["loss_per_bin"]["loss"]) for name, run in runs.items()}
    bin_size = next(iter(runs.values()))["loss_per_bin"]["bin_size"] if runs else None
    tokens = max((len(run["loss_per_token"]) for run in runs.values()), default=0)
    figures.append(plots.bins_figure(bins, "Mean loss per position bin", "cross-entropy (nats)", bin_size, tokens))
    gains = document.get("improvement_over_baseline", {})
    if gains:
        gain_bins = {name: (g["start"], g["improvement"]) for name, g in gains.items()}
        title = "Improvement over the baseline per bin"
        figures.append(plots.bins_figure(gain_bins, title, "loss reduction (nats)", bin_size, tokens))
    for name, run in runs.items():
        if run.get("drift"):
            figures.append(plots.drift_figure(run["drift"]).update_layout(title=f"{name}: fast-weight drift"))
            figures.append(plots.inner_loss_figure(run["inner_loss"]).update_layout(title=f"{name}: inner-loop loss"))
        if run.get("inplace"):
            title = f"{name}: In-Place fast weight per chunk (log axes)"
            figures.append(inplace_figure(run["inplace"]).update_layout(title=title))
    comparisons = {name: run["causal_comparison"] for name, run in runs.items() if run.get("causal_comparison")}
    for name, comp in comparisons.items():
        curves = {f"{name} (legacy, leaky)": runs[name]["loss_per_token"]}
        curves[f"{name} (causal)"] = comp["loss_per_token_causal"]
        figures.append(plots.loss_figure(curves).update_layout(title=f"{name}: legacy (leaky) vs causal scoring"))
    tables = {}
    if comparisons:
        tables["Legacy checkpoints: causal vs leaky scoring"] = [
            {
                "run": name,
                "mini-batch": c["mini_batch_size"],
                "mean loss (leaky)": c["mean_loss_leaky"],
                "mean loss (causal)": c["mean_loss_causal"],
                "difference (causal - leaky)": c["difference"],
            }
            for name, c in comparisons.items()
        ]
    if view_rows(runs):
        tables["Loss views (nats): per codebook, semantic vs acoustic, text, moshi-finetune's weighting"] = view_rows(
            runs
        )
    all_notes = (document["config"].get("notes") or {}).items()
    notes = [{"run": run, "note": note} for run, items in all_notes for note in items]
    if notes:
        tables["Notes"] = notes
    tables.update(document.get("tables", {}))
    header = {"Clip, settings, checkpoints and versions": metadata_rows(document), "Summary": summary_rows(document)}
    comparison = headline.headline(document)
    if comparison is not None:
        header["TTT vs baseline"] = [{"headline": headline.headline_text(comparison)}]
        header["Per position bin"] = headline.bin_rows(document)
        if headline.reading_rows(document):
            header["Per reading of the repeated passage"] = headline.reading_rows(document)
        if codebook_rows(document):
            header["Per codebook (0: semantic, 1-7: acoustic)"] = codebook_rows(document)
    return {
        "json": write_json(out_dir / f"{prefix}results.json", document),
        "csv": write_csv(out_dir / f"{prefix}results.csv", runs),
        "html": write_html(out_dir / f"{prefix}report.html", title, figures, tables, header, plotly_js),
    }
