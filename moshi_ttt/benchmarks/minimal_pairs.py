"""Minimal-pair scoring: each clip scored from fresh state, the pair's two log-likelihoods compared.

Notation: K = 8 audio codebooks, T steps of one clip. A clip's negative log-likelihood is the sum of its valid
per-entry cross-entropies with codebook 0 weighted `first_codebook_weight_multiplier` times (1: the plain sum):

    nll_sum = sum_{k,t valid} w_k * loss[k, t]       nll_mean = nll_sum / sum_{k,t valid} w_k

The summed form is the clip's log-likelihood (what sWUGGY / sBLIMP / StoryCloze compare in the literature); the
length-normalised one does not favour the shorter clip (the older TTT fork compared it, with weight 100 and the
zero text token). A pair counts as right when the good clip has the higher log-likelihood, half on a tie
(ZeroSpeech's scoring); accuracy comes with a 95% Wilson score interval over the pairs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from moshi_ttt.benchmarks.layouts import Benchmark
from moshi_ttt.data import audio as audio_io
from moshi_ttt.options import RunOptions
from moshi_ttt.scoring.teacher_forcing import score

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class ClipScore:
    nll_sum: float  # nats, -log-likelihood of the clip's audio tokens (weighted as the module docstring says)
    nll_mean: float  # nats per (weighted) token entry
    tokens: int  # T


@dataclass(frozen=True)
class Accuracy:
    correct: float  # pairs where the good clip is more likely (ties count half)
    pairs: int
    accuracy: float  # correct / pairs
    ci95: tuple[float, float]  # Wilson score interval


def clip_score(model: LMModel, codes: torch.Tensor, options: RunOptions) -> ClipScore:
    """Scores one clip [1, K, T] from fresh TTT state (every `score` call opens a new streaming session)."""
    result = score(model, codes, options=options.replace(telemetry=False))
    loss, mask = result.loss[0].double(), result.mask[0]  # [K, T]
    weights = mask.double()
    weights[0] *= options.first_codebook_weight_multiplier
    weighted = torch.where(weights > 0, loss * weights, torch.zeros_like(loss))  # a NaN at a valid entry stays
    total = float(weighted.sum())
    return ClipScore(total, total / float(weights.sum()), int(codes.shape[-1]))


def wilson_interval(correct: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / n (NaN, NaN for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(good_nll: list[float], bad_nll: list[float]) -> Accuracy:
    """Pairs where the good clip has the lower negative log-likelihood (ties: half)."""
    if len(good_nll) != len(bad_nll):
        raise ValueError(f"expected as many good as bad clips, got {len(good_nll)} and {len(bad_nll)}")
    correct = sum(1.0 if g < b else 0.5 if g == b else 0.0 for g, b in zip(good_nll, bad_nll, strict=True))
    n = len(good_nll)
    return Accuracy(correct, n, correct / n if n else math.nan, wilson_interval(correct, n))


def encode_clips(benchmark: Benchmark, mimi: MimiModel, dep_q: int, max_pairs: int | None = None) -> dict:
    """Mimi codes [1, K, T] of every clip of the first `max_pairs` pairs (all when None), keyed by path."""
    codes = {}
    for pair in benchmark.pairs[:max_pairs]:
        for clip in (pair.good, pair.bad):
            if clip not in codes:
                codes[clip] = audio_io.encode(mimi, audio_io.load_audio(clip))[:, :dep_q]
    return codes


def run_benchmark(
    benchmark: Benchmark,
    models: dict[str, LMModel],
    mimi: MimiModel,
    options: RunOptions,
    max_pairs: int | None = None,
) -> dict:
    """Scores the pairs of one benchmark under each model (side by side); returns its JSON record.

    Args:
        models: run name ("baseline", "ttt") -> LMModel in eval mode.
        options: the run's options (mode, text stream, TTT options, first_codebook_weight_multiplier).
        max_pairs: score only the first pairs (None: all).
    Returns:
        {"name", "folder", "layout", "pairs", "encode_s", "runs": {run: {"summed", "length_normalised" (each an
        Accuracy as a dict), "by_group" (sBLIMP), "score_s", "s_per_1000_pairs" (wall), "cpu_s_per_1000_pairs"}},
        "per_pair": [...]}.
    Raises:
        ValueError: a transcript text stream (the benchmarks have no transcripts), or a clip that cannot be read.
    """
    if options.text_stream == "transcript":
        raise ValueError("the minimal-pair benchmarks have no transcripts: use text_stream padding, zero or greedy")
    pairs = benchmark.pairs[:max_pairs]
    start = time.perf_counter()
    dep_q = next(iter(models.values())).dep_q
    codes = encode_clips(benchmark, mimi, dep_q, max_pairs)
    record = {
        "name": benchmark.name,
        "folder": str(benchmark.folder),
        "layout": benchmark.layout,
        "pairs": len(pairs),
        "encode_s": time.perf_counter() - start,
        "runs": {},
    }
    per_pair = [{"key": pair.key, "group": pair.group, "good": pair.good.name, "bad": pair.bad.name} for pair in pairs]
    for name, model in models.items():
        device = next(model.parameters()).device
        start, cpu_start = time.perf_counter(), time.process_time()
        scores = [
            (clip_score(model, codes[p.good].to(device), options), clip_score(model, codes[p.bad].to(device), options))
            for p in pairs
        ]
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        for row, (good, bad) in zip(per_pair, scores, strict=True):
            row[name] = {"good": asdict(good), "bad": asdict(bad)}
        record["runs"][name] = {
            "summed": asdict(accuracy([g.nll_sum for g, _ in scores], [b.nll_sum for _, b in scores])),
            "length_normalised": asdict(accuracy([g.nll_mean for g, _ in scores], [b.nll_mean for _, b in scores])),
            "score_s": elapsed,
            "s_per_1000_pairs": 1000 * elapsed / len(pairs) if pairs else math.nan,
            # CPU time of this process: the cost on a shared machine, where wall time also counts the others' work
            "cpu_s_per_1000_pairs": 1000 * cpu / len(pairs) if pairs else math.nan,
        }
        groups = sorted({p.group for p in pairs if p.group is not None})
        if groups:
            record["runs"][name]["by_group"] = {
                group: asdict(
                    accuracy(
                        [g.nll_sum for p, (g, _) in zip(pairs, scores, strict=True) if p.group == group],
                        [b.nll_sum for p, (_, b) in zip(pairs, scores, strict=True) if p.group == group],
                    )
                )
                for group in groups
            }
    record["per_pair"] = per_pair
    return record


def summary_rows(document: dict) -> list[dict]:
    """One row per (benchmark, run) of a benchmarks document: the report's and the CLI's table."""
    rows = []
    for bench in document["benchmarks"].values():
        for run, result in bench["runs"].items():
            summed, normalised = result["summed"], result["length_normalised"]
            rows.append(
                {
                    "benchmark": bench["name"],
                    "run": run,
                    "pairs": bench["pairs"],
                    "accuracy (summed)": summed["accuracy"],
                    "95% CI (summed)": _interval(summed["ci95"]),
                    "accuracy (length-normalised)": normalised["accuracy"],
                    "95% CI (length-normalised)": _interval(normalised["ci95"]),
                    "s / 1000 pairs": result["s_per_1000_pairs"],
                    "CPU s / 1000 pairs": result.get("cpu_s_per_1000_pairs"),
                }
            )
    return rows


def _interval(ci) -> str:
    lo, hi = ci
    return "" if lo is None or hi is None or math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"
