"""The view across many files (the LibriLight-style evaluation): mean loss by position, with 95% intervals, for each
run and for each run minus the baseline, over files of any lengths.

Input: the CLI's per-file entries (index.json "files", each file's summary.json), whose "bins" hold the file's mean
loss per position bin of `bin_size` tokens for every run. Output: OUT/aggregate.json, OUT/aggregate.csv and
OUT/report.html. Fields of aggregate.json (version 1; NaN written as null):

- `version`, `bin_size` (tokens per bin), `frame_rate` (tokens per second), `runs` (names), `baseline_run` (the run
  the differences are taken against; null without one).
- `files`: {"scored", "failed", "tokens" (all scored files together), "shortest_s", "longest_s", "total_s"};
  `failures`: [{"path", "error"}], the files that could not be scored.
- `start` [N]: first token of each bin; `start_s` [N]: the same in seconds. Bin i covers tokens [i·bin_size,
  (i+1)·bin_size) of every file that reaches it: longer files reach more bins, and a file's last bin may be partial.
- `loss`: {run: {"files" [N], "mean" [N], "ci95_low" [N], "ci95_high" [N]}}: in each bin, the mean over the files
  that reach it of each file's mean loss there (nats per valid token and codebook), every file weighing the same,
  and its 95% Student-t interval over files (null with a single file). `files` counts them.
- `difference`: {run: the same four lists} for every run but the baseline: run − baseline, paired per file (each
  file's bin mean under the run minus under the baseline, over the tokens valid in both); negative: the run
  predicts better there.
- `whole_file`: {run: {"files", "mean", "ci95_low", "ci95_high"}} of the files' mean losses, and
  `whole_file_difference`: {run: the same} of the paired differences of those means.

Nothing is printed; the statistics are plain functions of lists.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from moshi_ttt.data.audio import FRAME_RATE

AGGREGATE_VERSION = 1
_Z = 1.959963984540054  # standard normal 97.5% quantile
# Student t 97.5% quantiles for 1..30 degrees of freedom; above, the Cornish-Fisher expansion (error < 1e-6).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` >= 1 degrees of freedom (two-sided 95% intervals)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z  # Abramowitz & Stegun 26.7.5
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384)
    return z + sum(term / df ** (i + 1) for i, term in enumerate(terms))


def mean_interval(values) -> dict:
    """{"files", "mean", "ci95_low", "ci95_high"} of the finite values: their mean and 95% Student-t interval of the
    mean (NaN bounds for fewer than two values, NaN everything for none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"files": 0, "mean": math.nan, "ci95_low": math.nan, "ci95_high": math.nan}
    mean = float(x.mean())
    if n < 2:
        return {"files": 1, "mean": mean, "ci95_low": math.nan, "ci95_high": math.nan}
    half = t_quantile_975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return {"files": n, "mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}


def _columns(per_bin: list[dict]) -> dict[str, list]:
    return {key: [b[key] for b in per_bin] for key in ("files", "mean", "ci95_low", "ci95_high")}


def _value(values: list, i: int) -> float:
    return math.nan if i >= len(values) or values[i] is None else float(values[i])


def aggregate(entries: list[dict], failures: list[dict] | None = None, baseline_run: str = "baseline") -> dict:
    """The aggregate document (module docstring) of the per-file entries.

    Args:
        entries: per-file entries with "bins" {"bin_size", "start", "loss": {run: [per-bin mean]}, "difference":
            {run: [per-bin run − baseline]}}, "tokens", "duration_s" and "mean_loss" {run: value}.
        failures: the files that failed, [{"path", "error"}].
    Raises:
        ValueError: entries binned with different bin sizes.
    """
    failures = failures or []
    sizes = {e["bins"]["bin_size"] for e in entries}
    if len(sizes) > 1:
        raise ValueError(f"the files were binned with different bin sizes {sorted(sizes)}; score them again")
    bin_size = sizes.pop() if sizes else 0
    runs = list(dict.fromkeys(run for e in entries for run in e["bins"]["loss"]))
    compared = [run for run in runs if run != baseline_run] if baseline_run in runs else []
    n_bins = max((len(e["bins"]["start"]) for e in entries), default=0)
    loss = {run: _columns([mean_interval(_value(e["bins"]["loss"].get(run, []), i) for e in entries)
                           for i in range(n_bins)]) for run in runs}  # fmt: skip
    difference = {run: _columns([mean_interval(_value(e["bins"]["difference"].get(run, []), i) for e in entries)
                                 for i in range(n_bins)]) for run in compared}  # fmt: skip
    whole = {run: mean_interval(e["mean_loss"].get(run) for e in entries) for run in runs}
    whole_diff = {
        run: mean_interval(
            e["mean_loss"][run] - e["mean_loss"][baseline_run]
            for e in entries
            if e["mean_loss"].get(run) is not None and e["mean_loss"].get(baseline_run) is not None
        )
        for run in compared
    }
    durations = [e["duration_s"] for e in entries if e.get("duration_s") is not None]
    return {
        "version": AGGREGATE_VERSION,
        "bin_size": bin_size,
        "frame_rate": FRAME_RATE,
        "runs": runs,
        "baseline_run": baseline_run if compared else None,
        "files": {
            "scored": len(entries),
            "failed": len(failures),
            "tokens": sum(int(e.get("tokens") or 0) for e in entries),
            "shortest_s": min(durations, default=None),
            "longest_s": max(durations, default=None),
            "total_s": sum(durations),
        },
        "failures": [{"path": f.get("path"), "error": f.get("error")} for f in failures],
        "start": [i * bin_size for i in range(n_bins)],
        "start_s": [i * bin_size / FRAME_RATE for i in range(n_bins)],
        "loss": loss,
        "difference": difference,
        "whole_file": whole,
        "whole_file_difference": whole_diff,
    }


def file_bins(runs: dict[str, dict], bin_size: int, baseline_run: str = "baseline") -> dict:
    """A file's "bins" entry from its results.json runs: mean loss per bin of every run, and run − baseline per bin
    over the tokens valid in both (the negated `results.improvement_per_bin`). Bin i is exactly tokens
    [i * bin_size, (i + 1) * bin_size), the last one partial: no tail joins the bin before it (as it does in a
    file's own summary), so that a bin holds the same positions in every file."""
    from moshi_ttt.reports.results import improvement_per_bin, position_bins

    loss = {name: position_bins(run["loss_per_token"], bin_size, merge_tail=False) for name, run in runs.items()}
    starts = next(iter(loss.values()))[0] if loss else []
    difference = {}
    if baseline_run in runs:
        for name, run in runs.items():
            if name != baseline_run:
                base = runs[baseline_run]["loss_per_token"]
                _, gain = improvement_per_bin(base, run["loss_per_token"], bin_size, merge_tail=False)
                difference[name] = [-g for g in gain]
    return {"bin_size": bin_size, "start": starts, "loss": {k: v[1] for k, v in loss.items()}, "difference": difference}


def rows(document: dict) -> list[dict]:
    """One row per (bin, series) for aggregate.csv: series is a run or "<run> - <baseline>"."""
    out = []
    series = [(run, document["loss"][run]) for run in document["runs"]]
    series += [(f"{run} - {document['baseline_run']}", d) for run, d in document["difference"].items()]
    for i, start in enumerate(document["start"]):
        for name, columns in series:
            out.append({"bin_start": start, "bin_start_s": document["start_s"][i], "series": name,
                        **{key: values[i] for key, values in columns.items()}})  # fmt: skip
    return out


def write_csv(path: Path, document: dict) -> Path:
    """aggregate.csv: bin_start, bin_start_s, series, files, mean, ci95_low, ci95_high (empty where undefined)."""
    table = rows(document)
    keys = ["bin_start", "bin_start_s", "series", "files", "mean", "ci95_low", "ci95_high"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for row in table:
            writer.writerow([_cell(row[k]) for k in keys])
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def figures(document: dict) -> list:
    """Plotly figures: loss by position with 95% bands per run, each run − baseline with its band, files per bin."""
    import plotly.graph_objects as go

    minutes = [(s + document["bin_size"] / 2) / document["frame_rate"] / 60 for s in document["start"]]

    def band(fig, name: str, columns: dict, color: str) -> None:
        # The band over the bins that have an interval (two files or more: a prefix, as files reach bins from 0).
        keep = [i for i, (lo, hi) in enumerate(zip(columns["ci95_low"], columns["ci95_high"], strict=True))
                if _finite(lo) and _finite(hi)]  # fmt: skip
        x = [minutes[i] for i in keep]
        low, high = [columns["ci95_low"][i] for i in keep], [columns["ci95_high"][i] for i in keep]
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=high + low[::-1],
                fill="toself",
                fillcolor=color,
                line={"width": 0},
                opacity=0.25,
                hoverinfo="skip",
                name=f"{name} 95% interval",
            )
        )
        fig.add_trace(go.Scatter(x=minutes, y=_nullable(columns["mean"]), mode="lines+markers", name=name,
                                 line={"color": color}, customdata=columns["files"],
                                 hovertemplate="%{y:.4f} nats at %{x:.1f} min (%{customdata} files)"))  # fmt: skip

    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    axis = {"xaxis_title": "position in the file (min, bin centres)"}
    loss = go.Figure()
    for i, run in enumerate(document["runs"]):
        band(loss, run, document["loss"][run], palette[i % len(palette)])
    loss.update_layout(title="Mean loss by position across files (95% interval over files)",
                       yaxis_title="cross-entropy (nats)", **axis)  # fmt: skip
    out = [loss]
    if document["difference"]:
        diff = go.Figure()
        for i, (run, columns) in enumerate(document["difference"].items()):
            band(diff, f"{run} − {document['baseline_run']}", columns, palette[(i + 1) % len(palette)])
        diff.add_hline(y=0, line={"color": "gray", "dash": "dot"})
        diff.update_layout(title=f"Run − {document['baseline_run']} by position, paired per file (below 0: better)",
                           yaxis_title="loss difference (nats)", **axis)  # fmt: skip
        out.append(diff)
    counts = go.Figure(go.Bar(x=minutes, y=_files_per_bin(document), name="files"))
    counts.update_layout(title="Files per bin (files of different lengths reach different bins)",
                         yaxis_title="files", **axis)  # fmt: skip
    out.append(counts)
    return out


def _files_per_bin(document: dict) -> list[int]:
    return [max(document["loss"][run]["files"][i] for run in document["runs"]) for i in range(len(document["start"]))]


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _nullable(values) -> list:
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in values]


def summary_rows(document: dict) -> list[dict]:
    """One row per run (and per run − baseline) of the whole-file means across files."""
    table = []
    for run, stats in document["whole_file"].items():
        table.append({"series": run, **stats})
    for run, stats in document["whole_file_difference"].items():
        table.append({"series": f"{run} − {document['baseline_run']}", **stats})
    return table


def write_aggregate(out: Path, document: dict, title: str = "moshi-ttt: loss by position across files") -> dict:
    """Writes OUT/aggregate.json, OUT/aggregate.csv and OUT/report.html (self-contained)."""
    from moshi_ttt.reports.results import write_html, write_json

    files = document["files"]
    header = {
        "Files": [{"scored": files["scored"], "failed": files["failed"], "tokens": files["tokens"],
                   "shortest (s)": files["shortest_s"], "longest (s)": files["longest_s"],
                   "total (h)": files["total_s"] / 3600, "bin size (tokens)": document["bin_size"]}],
        "Whole-file mean loss across files (95% interval over files)": summary_rows(document),
    }  # fmt: skip
    tables = {"Per position bin": [{k: v for k, v in row.items()} for row in rows(document)]}
    if document["failures"]:
        tables["Files that could not be scored"] = document["failures"]
    return {
        "json": write_json(out / "aggregate.json", document),
        "csv": write_csv(out / "aggregate.csv", document),
        "html": write_html(out / "report.html", title, figures(document), tables, header),
    }
