"""Runs the benchmarks a command line names and writes their document: OUT/benchmarks/results.json, results.csv
(one row per pair and run) and report.html (accuracies of every run side by side).

results.json (version 1): {"version", "config" (the run's options and max_pairs), "benchmarks": {"<name>": the
record of `minimal_pairs.run_benchmark`}, "versions"}; NaN written as null.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from moshi_ttt.benchmarks.layouts import parse_spec, read_benchmark
from moshi_ttt.benchmarks.minimal_pairs import run_benchmark, summary_rows
from moshi_ttt.options import RunOptions
from moshi_ttt.reports.results import versions, write_html, write_json

DOCUMENT_VERSION = 1


def run_benchmarks(
    specs: list[str],
    models: dict[str, LMModel],
    mimi: MimiModel,
    options: RunOptions,
    out_dir: str | Path,
    max_pairs: int | None = None,
) -> dict:
    """Reads every `NAME=PATH` first (a bad layout fails before any scoring), scores them, writes the document.

    Args:
        specs: the command line's `--benchmark` values, e.g. ["swuggy=/data/zr2021", "sblimp=/data/zr2021"].
        models: run name -> LMModel; mimi: the codec; options: the run's options.
        out_dir: the run's output folder (the files go to OUT/benchmarks/).
        max_pairs: score only the first pairs of each benchmark.
    Returns:
        the document (module docstring).
    Raises:
        ValueError, FileNotFoundError: one sentence for a bad spec, layout or clip.
    """
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    parsed = [parse_spec(spec) for spec in specs]
    names = [name for name, _ in parsed]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"benchmark(s) {twice} given more than once; give each NAME=PATH once")
    benchmarks = [read_benchmark(name, path) for name, path in parsed]
    document = {
        "version": DOCUMENT_VERSION,
        "config": {**dataclasses.asdict(options), "max_pairs": max_pairs},
        "benchmarks": {b.name: run_benchmark(b, models, mimi, options, max_pairs) for b in benchmarks},
        "versions": versions(),
    }
    write_benchmark_report(Path(out_dir) / "benchmarks", document)
    return document


def write_benchmark_report(out_dir: Path, document: dict) -> dict[str, Path]:
    """results.json, results.csv and report.html of a benchmarks document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    caption = "Accuracy per benchmark and run (pairs where the right clip is more likely; ties count half)"
    tables = {caption: summary_rows(document)}
    for bench in document["benchmarks"].values():
        groups = [
            {"run": run, "group": group, "pairs": acc["pairs"], "accuracy (summed)": acc["accuracy"]}
            for run, result in bench["runs"].items()
            for group, acc in (result.get("by_group") or {}).items()
        ]
        if groups:
            tables[f"{bench['name']}: accuracy per type"] = groups
    settings = [{"setting": key, "value": str(value)} for key, value in document["config"].items()]
    return {
        "json": write_json(out_dir / "results.json", document),
        "csv": _write_pairs_csv(out_dir / "results.csv", document),
        "html": write_html(
            out_dir / "report.html", "moshi-ttt: minimal-pair benchmarks", [], tables, {"Settings": settings}
        ),  # fmt: skip
    }


def _write_pairs_csv(path: Path, document: dict) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "pair", "group", "run", "good_nll_sum", "bad_nll_sum", "good_nll_mean",
                         "bad_nll_mean", "good_tokens", "bad_tokens"])  # fmt: skip
        for bench in document["benchmarks"].values():
            for row in bench["per_pair"]:
                for run in bench["runs"]:
                    good, bad = row[run]["good"], row[run]["bad"]
                    writer.writerow([bench["name"], row["key"], row["group"] or "", run, f"{good['nll_sum']:.6g}",
                                     f"{bad['nll_sum']:.6g}", f"{good['nll_mean']:.6g}", f"{bad['nll_mean']:.6g}",
                                     good["tokens"], bad["tokens"]])  # fmt: skip
    return path


def summary_lines(document: dict) -> list[str]:
    """Plain lines for the command line, one per benchmark and run."""
    lines = []
    for row in summary_rows(document):
        lines.append(
            f"{row['benchmark']} ({row['pairs']} pairs) {row['run']}: accuracy {row['accuracy (summed)']:.3f} "
            f"{row['95% CI (summed)']} summed, {row['accuracy (length-normalised)']:.3f} "
            f"{row['95% CI (length-normalised)']} length-normalised; {row['s / 1000 pairs']:.1f} s per 1,000 pairs "
            f"({row['CPU s / 1000 pairs']:.1f} s CPU)"
        )
    return lines
