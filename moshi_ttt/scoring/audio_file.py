"""One audio file under several models, streamed end to end: read block by block, encoded by moshi's streaming
Mimi, each block of codes scored by every model as it comes (the models advance in lockstep). Memory stays flat in
the length of the file in "chunked" and "stream" mode; "full" mode keeps every code (BlockScorer).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from moshi_ttt.data.audio import AudioInfo, read_blocks
from moshi_ttt.data.stream import encode_blocks
from moshi_ttt.options import RunOptions
from moshi_ttt.scoring.peak_memory import PeakMemory
from moshi_ttt.scoring.teacher_forcing import BlockScorer, ScoreResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileScores:
    """The complete results of one file under each model."""

    results: dict[str, ScoreResult]  # run name -> result; elapsed_s: the time spent in that run's own scoring
    tokens: int  # T, steps of codes
    codes: torch.Tensor | None  # [1, K, T] long, only with keep_codes=True
    peak_memory_mb: float | None  # all runs, the reading and the encoding together (scoring.peak_memory)
    elapsed_s: float  # wall time of the whole file


def score_audio_file(
    info: AudioInfo,
    mimi: MimiModel,
    models: dict[str, LMModel],
    options: RunOptions,
    *,
    device: torch.device | str = "cpu",
    keep_codes: bool = False,
    on_tokens: Callable[[int], None] | None = None,
) -> FileScores:
    """Reads, encodes and scores a checked file (`audio.check_audio`) under every model, block by block.

    Args:
        info: the file, checked.
        mimi: the codec (streaming encode; moshi_ttt.data.stream).
        models: run name -> LMModel in eval mode, each a different object (each gets its own streaming session).
        options: the run's options, the same for every model.
        device: where the models are (the codes go there).
        keep_codes: also return all the codes (sweeps, causal re-scoring of older checkpoints need them).
        on_tokens: called with the number of new steps each time a block of codes has been scored by every model.
    Returns:
        FileScores.
    Raises:
        ValueError: one sentence for a file that turns out damaged or cut off, or codes the models cannot score.
    """
    start = time.perf_counter()
    kept: list[torch.Tensor] = []
    dep_q = {model.dep_q for model in models.values()}
    if len(dep_q) != 1:
        raise ValueError(f"the models read different numbers of audio codebooks {sorted(dep_q)}")
    K = dep_q.pop()
    with PeakMemory(device) as memory, ExitStack() as stack:
        scorers = {
            name: stack.enter_context(BlockScorer(model, options, expected_tokens=info.num_frames, partial=False))
            for name, model in models.items()
        }
        blocks = stack.enter_context(contextlib.closing(encode_blocks(mimi, read_blocks(info))))
        for codes in blocks:  # [1, K', n] as they come
            codes = codes[:, :K].to(device)
            for scorer in scorers.values():
                for _ in scorer.push(codes):
                    pass
            if keep_codes:
                kept.append(codes)
            if on_tokens is not None:
                on_tokens(codes.shape[-1])
        results = {name: scorer.finish() for name, scorer in scorers.items()}  # elapsed_s: each one's own time
    tokens = next(iter(results.values())).total_tokens
    logger.info("%s: %d tokens in %.1f s", info.name, tokens, time.perf_counter() - start)
    return FileScores(results, tokens, torch.cat(kept, dim=-1) if keep_codes else None, memory.peak_mb,
                      time.perf_counter() - start)  # fmt: skip
