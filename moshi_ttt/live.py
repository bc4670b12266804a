"""Live side-by-side scoring of a baseline and a TTT model: both advance in lockstep, one update per step.

This is the engine of the app: it knows nothing of Gradio. Each run has its own streaming sessions
(`registry.StreamingSession`), so many users can share the cached models.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from . import report
from .registry import ModelCache, StreamingSession
from .scoring import ScoreResult, iter_score, non_causal_mini_batch, score
from .ttt.legacy import causal_reading

logger = logging.getLogger(__name__)

LIVE_MODES = {"live token by token": "stream", "chunked": "chunked"}


@dataclass(frozen=True)
class LiveConfig:
    """Options of one live comparison (the app's controls)."""

    mode: str = "chunked"  # "chunked" or "stream"
    mini_batch_size: int | None = None  # TTT inner mini-batch for this run; None: the checkpoint's
    persistent_states: bool = True  # keep fast weights from chunk to chunk
    update_every: int = 25  # tokens between updates (25 tokens = 2 s of audio)

    def __post_init__(self) -> None:
        if self.mode not in ("chunked", "stream"):
            raise ValueError(f"mode must be 'chunked' or 'stream', got {self.mode!r}")
        if self.update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")


@dataclass
class LiveUpdate:
    """What the UI shows after each step; `document` (results.json) is set on the last update only."""

    tokens_done: int
    total_tokens: int
    loss_per_token: dict[str, list[float]]  # run name -> [tokens_done] mean loss over the codebooks (NaN invalid)
    drift: dict[str, dict]  # TTT layer -> {"W1": [...], "W2": [...], "t": [...]} as in results.json
    tokens_per_s: dict[str, float]
    elapsed_s: float
    document: dict | None = None
    summary: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.document is not None


def compare_live(
    cache: ModelCache,
    baseline_name: str,
    ttt_name: str,
    audio_codes: torch.Tensor,
    cfg: LiveConfig,
    audio_info: dict | None = None,
) -> Iterator[LiveUpdate]:
    """Scores `audio_codes` [1, 8, T] with both models, yielding a LiveUpdate every `cfg.update_every` tokens.

    Raises:
        ValueError: for unknown names or models that cannot be compared (see `check_compatible`).
    """
    names = {"baseline": baseline_name, "ttt": ttt_name}
    loaded = {run: cache.get(name) for run, name in names.items()}
    check_compatible(loaded["baseline"].lm_config, loaded["ttt"].lm_config)
    codecs = {loaded["baseline"].mimi_ref, loaded["ttt"].mimi_ref}
    if len(codecs) > 1:
        raise ValueError(f"the baseline {baseline_name!r} and TTT {ttt_name!r} checkpoints use different codecs")
    chunk = cfg.update_every if cfg.mode == "chunked" else 1
    sessions, sizes = {}, {}
    for run, ckpt in loaded.items():
        context = ckpt.model.context
        size = min(chunk, context) if context is not None else chunk
        whole = non_causal_mini_batch(ckpt.model)
        if whole is not None:  # legacy non-causal layers: whole mini-batches per chunk
            size = max(whole, size - size % whole)
        scores = iter_score(
            ckpt.model,
            audio_codes.to(ckpt.model.device),
            cfg.mode,
            size if cfg.mode == "chunked" else None,
            mini_batch_size=cfg.mini_batch_size,
            persistent_states=cfg.persistent_states,
            record_every=cfg.update_every,
        )
        sessions[run] = StreamingSession(ckpt.model, cache.lock(ckpt.model), scores)
        sizes[run] = size
    start = time.perf_counter()
    latest: dict[str, ScoreResult] = {}
    try:
        while True:
            finished = 0
            for run, session in sessions.items():
                if run in latest and latest[run].complete:
                    finished += 1
                    continue
                latest[run] = next(session)
            if finished == len(sessions):
                break
            yield _update(latest, start)
        causal = {}  # older non-causal TTT checkpoints: the same weights scored causally (report.causal_comparison)
        for run, ckpt in loaded.items():
            b = non_causal_mini_batch(ckpt.model)
            if b is not None:
                with cache.lock(ckpt.model), causal_reading(ckpt.model):
                    chunk = sizes[run] if cfg.mode == "chunked" else None
                    options = {"mini_batch_size": cfg.mini_batch_size, "persistent_states": cfg.persistent_states}
                    result = score(ckpt.model, audio_codes.to(ckpt.model.device), cfg.mode, chunk, **options)
                causal[run] = (result, b)
        yield _final(latest, loaded, names, cfg, audio_info or {}, start, causal)
    finally:
        for session in sessions.values():
            session.close()


def _drift(result: ScoreResult) -> dict[str, dict]:
    drift, _ = report.telemetry_record(result.telemetry, 0)
    return drift


def _update(latest: dict[str, ScoreResult], start: float) -> LiveUpdate:
    done = min(r.tokens_done for r in latest.values())
    return LiveUpdate(
        tokens_done=done,
        total_tokens=next(iter(latest.values())).total_tokens,
        loss_per_token={run: r.loss_per_token[0, :done].tolist() for run, r in latest.items()},
        drift=_drift(latest["ttt"]) if "ttt" in latest else {},
        tokens_per_s={run: r.tokens_per_s for run, r in latest.items()},
        elapsed_s=time.perf_counter() - start,
    )


def _final(latest, loaded, names, cfg: LiveConfig, audio_info: dict, start: float, causal=None) -> LiveUpdate:
    runs = {run: report.run_record(r, checkpoint=names[run]) for run, r in latest.items()}
    for run, (result, b) in (causal or {}).items():
        runs[run]["causal_comparison"] = report.causal_comparison(runs[run], result, b)
    config = {
        "mode": cfg.mode,
        "mini_batch_size": cfg.mini_batch_size,
        "persistent_states": cfg.persistent_states,
        "notes": {run: list(ckpt.notes) for run, ckpt in loaded.items()},
    }
    document = report.results_document(audio_info, config, runs)
    update = _update(latest, start)
    update.document = document
    update.summary = summary_table(document)
    return update


def summary_table(document: dict) -> list[dict]:
    """Rows for the app's table: mean loss, improvement of TTT over the baseline, slope, tokens/s."""
    runs = document["runs"]
    base = runs.get("baseline", {}).get("mean_loss")
    rows = []
    for run, rec in runs.items():
        mean = rec["mean_loss"]
        gain = None
        if run != "baseline" and base is not None and mean is not None and np.isfinite(base) and base > 0:
            gain = 100.0 * (base - mean) / base
        rows.append(
            {
                "run": run,
                "checkpoint": rec["checkpoint"],
                "mean loss": _round(mean, 4),
                "improvement %": _round(gain, 2),
                "slope / 1k tokens": _round(rec["slope_per_1k_tokens"], 4),
                "tokens/s": _round(rec["tokens_per_s"], 1),
            }
        )
    return rows


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def check_compatible(baseline_config: dict, ttt_config: dict) -> None:
    """Both models must read the same codes: same codebooks, cardinality and delays."""
    keys = ("card", "dep_q", "n_q", "delays")
    diffs = [k for k in keys if baseline_config.get(k) != ttt_config.get(k)]
    if diffs:
        detail = ", ".join(f"{k}: {baseline_config.get(k)} vs {ttt_config.get(k)}" for k in diffs)
        raise ValueError(f"the baseline and TTT checkpoints do not read the same audio codes ({detail})")


def compare_file(
    cache: ModelCache, audio_path: str, baseline_name: str, ttt_name: str, cfg: LiveConfig, max_seconds: float
) -> Iterator[LiveUpdate]:
    """Reads and encodes an uploaded file with the baseline's codec, then `compare_live`.

    Only the first `max_seconds` of a longer file are read and scored; the results' "audio" record then holds
    "trimmed_from_s", the file's whole duration (`trim_note` words it for the user).

    Raises:
        ValueError / FileNotFoundError: one readable sentence for bad audio or checkpoints that do not fit.
    """
    from .audio import encode, load_audio

    audio = load_audio(audio_path, max_seconds=max_seconds, trim=True)
    baseline = cache.get(baseline_name)
    if baseline.mimi is None:
        raise ValueError(f"checkpoint {baseline_name!r} names no audio codec, so uploads cannot be encoded")
    codes = encode(baseline.mimi, audio)  # [1, 8, T]
    if codes.shape[-1] < 2:
        raise ValueError(f"{audio.name} is too short to score ({audio.duration_s:.2f} s)")
    info = {"name": audio.name, "duration_s": audio.duration_s, "sample_rate": audio.source_sample_rate,
            "tokens": int(codes.shape[-1])}  # fmt: skip
    if audio.trimmed_from_s is not None:
        info["trimmed_from_s"] = audio.trimmed_from_s
    yield from compare_live(cache, baseline_name, ttt_name, codes, cfg, info)


def threads_per_run(concurrency: int, cpus: int | None = None) -> int:
    """Torch CPU threads for each of `concurrency` simultaneous runs: the cores shared out, at least one.

    More threads than cores (two runs of 2 threads on 2 cores) make OpenMP's threads wait on each other.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return max(1, (cpus if cpus is not None else os.cpu_count() or 1) // concurrency)


def trim_note(audio_info: dict) -> str | None:
    """The note "Scored the first N s of M s." for a trimmed file (see `compare_file`), else None."""
    whole = audio_info.get("trimmed_from_s")
    if whole is None:
        return None
    return f"Scored the first {audio_info['duration_s']:.1f} s of {whole:.1f} s (the duration limit)."
