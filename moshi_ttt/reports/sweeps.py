"""Sweeps the researchers asked for, each returned as a table (a list of row dicts, one per setting).

- mini-batch size of the inner loop (1, 4, 8, 16, 32 by default), per run, without changing the model;
- persistent_states on and off (off: reset every `reset_every` tokens, docs/ARCHITECTURE.md "Persistence");
- context length: the mean loss over the first L tokens of one run (scoring is causal, so this equals scoring the
  L-token prefix, without running the model again).
"""

from __future__ import annotations

import math

import torch
from moshi.models.lm import LMModel

from moshi_ttt.data.audio import FRAME_RATE
from moshi_ttt.options import RunOptions
from moshi_ttt.reports.results import least_squares_slope, summarize
from moshi_ttt.scoring.teacher_forcing import ScoreResult, score

DEFAULT_MINI_BATCH_SIZES = (1, 4, 8, 16, 32)
DEFAULT_OPTIONS = RunOptions()


def _row(result: ScoreResult, **setting) -> dict:
    summary = summarize(result.loss[0])
    return {
        **setting,
        "mean_loss": summary.mean_loss,
        "perplexity": summary.perplexity,
        "slope_per_1k_tokens": summary.slope_per_1k_tokens,
        "tokens_per_s": result.tokens_per_s,
    }


def sweep_mini_batch_size(
    model: LMModel,
    audio_codes: torch.Tensor,
    options: RunOptions = DEFAULT_OPTIONS,
    sizes: tuple[int, ...] = DEFAULT_MINI_BATCH_SIZES,
    *,
    inputs: dict | None = None,
) -> list[dict]:
    """One row per inner-loop mini-batch size (batch row 0 of `audio_codes` [B, 8, T]), the run's other options
    unchanged (`inputs`: the other `score` keywords of the run: text_tokens, user_codes)."""
    inputs = inputs or {}
    return [
        _row(
            score(model, audio_codes, options=options.replace(mini_batch_size=b, telemetry=False), **inputs),
            mini_batch_size=b,
        )  # fmt: skip
        for b in sizes
    ]


def sweep_persistent_states(
    model: LMModel, audio_codes: torch.Tensor, options: RunOptions = DEFAULT_OPTIONS, *, inputs: dict | None = None
) -> list[dict]:
    """Rows for persistent_states on (the fast weights carry through the file) and off (back to W_base every
    `options.reset_every` tokens; None: every attention context), the run's other options unchanged (`inputs`: the
    other `score` keywords of the run)."""
    rows = []
    for persistent in (True, False):
        run = options.replace(persistent_states=persistent, reset_every=None if persistent else options.reset_every)
        period = run.resets(persistent, model.context)
        result = score(model, audio_codes, options=run.replace(telemetry=False), **(inputs or {}))
        rows.append(_row(result, persistent_states=persistent, reset_every=period))
    return rows


def sweep_context_length(result: ScoreResult, lengths: tuple[int, ...] | None = None, window: int = 250) -> list[dict]:
    """Mean loss over the first L tokens, and over the last `window` of them, for each L (batch row 0).

    Args:
        result: a complete ScoreResult.
        lengths: prefix lengths in tokens (None: 250, 500, 1000, 2000, ... up to T, and T).
    """
    loss = result.loss[0].float()  # [K, T]
    T = loss.shape[-1]
    if lengths is None:
        lengths, length = [], 250
        while length < T:
            lengths.append(length)
            length *= 2
        lengths.append(T)
    per_token = loss.nanmean(dim=0)  # [T]
    rows = []
    for length in lengths:
        if not 0 < length <= T:
            raise ValueError(f"context lengths must lie in [1, {T}], got {length}")
        prefix = loss[:, :length]
        tail = per_token[max(0, length - window) : length]
        rows.append(
            {
                "context_tokens": length,
                "context_s": length / FRAME_RATE,
                "mean_loss": _nanmean(prefix),
                "mean_loss_last_window": _nanmean(tail),
                "slope_per_1k_tokens": least_squares_slope(per_token[:length]),
            }
        )
    return rows


def _nanmean(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return float(finite.mean()) if finite.numel() else math.nan
