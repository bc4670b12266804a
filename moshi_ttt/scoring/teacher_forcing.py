"""Teacher-forced scoring of audio codes: per-token cross-entropy in three modes that give the same numbers.

Notation: B batch rows, K = 8 audio codebooks of the Moshi stream, T steps (12.5 Hz), C chunk size, V card.

- "full": one `LMModel.forward` over the whole sequence (moshi's own delays, undelay and masks).
- "chunked": the temporal transformer streams `forward_text` chunks of C tokens; the depth transformer runs
  `forward_depformer_training` on each chunk; only the [B, K, C] losses of a chunk are kept.
- "stream": the temporal transformer (where the KV cache and the TTT fast weights live) steps one token at a time,
  as in real-time use; the depth transformer, stateless across steps, runs over up to DEPTH_GROUP buffered steps.

The text stream is RunOptions.text_stream (`scoring/text_stream.py`): padding, zero, the model's own greedy text
(generated one token at a time first, so that every mode then scores the same text) or given text tokens, which
are then scored too (`ScoreResult.text_loss`); a second (user) audio stream is the zero token or given codes.

All three run inside a fresh streaming session of the temporal transformer (`exact_streaming`, whose KV cache is
wide enough for the largest chunk, so every mode sees exactly the keys of the non-streaming forward, also past the
attention window). A new session per call gives every file fresh TTT state; per-run TTT options are session
options (`set_streaming_options`), never changes to the shared model.
"""

from __future__ import annotations

import logging
import math
import time
import typing as tp
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel

from moshi_ttt.compat.sequence import delayed_input, depformer_targets, model_codes
from moshi_ttt.compat.streaming import exact_streaming
from moshi_ttt.options import RunOptions, run_options
from moshi_ttt.scoring.telemetry import Telemetry, record
from moshi_ttt.scoring.text_stream import text_row
from moshi_ttt.ttt.apply import set_streaming_options, ttt_blocks

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 250  # tokens per chunk in "chunked" mode (20 s of audio), capped at the model's context
# The depth transformer has no state across time steps (each step's 8 codebooks only), so "stream" and "chunked"
# modes run it over up to this many buffered steps at once: the same numbers, without its per-call overhead at every
# token or chunk.
DEPTH_GROUP = 256


@dataclass(frozen=True)
class ScoreResult:
    """Per-token losses of audio codes under a model; partial while `tokens_done < total_tokens` (iter_score)."""

    loss: torch.Tensor  # [B, K, tokens_done] float32 cross-entropy in nats, NaN where invalid
    mask: torch.Tensor  # [B, K, tokens_done] bool: moshi's validity mask (delays, zero token)
    telemetry: Telemetry | None  # TTT drift and inner-loop losses; None without TTT layers or when turned off
    tokens_done: int  # steps of the input whose losses are final
    total_tokens: int  # T of the input
    elapsed_s: float  # wall time since scoring started
    # [B, tokens_done] float32 text-stream cross-entropy where a text was given (text_stream "transcript"), NaN
    # where invalid (moshi's zero token); None when the text stream is not scored.
    text_loss: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None  # [B, T] long: the text stream the model read (-1: moshi's zero token)

    @property
    def complete(self) -> bool:
        return self.tokens_done == self.total_tokens

    @property
    def loss_per_token(self) -> torch.Tensor:
        """[B, tokens_done]: mean over the valid codebooks of each step (NaN where none is valid)."""
        return self.loss.nanmean(dim=1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_done / self.elapsed_s if self.elapsed_s > 0 else float("nan")


def non_causal_mini_batch(model: LMModel) -> int | None:
    """b of the model's non-causal (legacy) TTT layers, which read whole mini-batches at once; None if none."""
    sizes = {
        block.cfg.mini_batch_size
        for block in ttt_blocks(model).values()
        if block.cfg.legacy is not None and not block.cfg.legacy.causal
    }
    if len(sizes) > 1:
        raise ValueError(f"non-causal TTT layers with different mini-batch sizes {sorted(sizes)} cannot be scored")
    return sizes.pop() if sizes else None


def _chunk_size(model: LMModel, options: RunOptions, steps: int) -> int:
    whole = non_causal_mini_batch(model)
    if options.mode == "stream" and whole is not None and whole > 1:
        raise ValueError(
            "this checkpoint's TTT layers are non-causal (every token sees its whole mini-batch), which token-by-token "
            "reading cannot reproduce; score it in 'full' or 'chunked' mode"
        )
    if options.mode == "stream":
        return 1
    if options.mode == "full":
        return max(steps, 1)
    context = model.context
    if options.chunk_size is None:
        chunk = DEFAULT_CHUNK_SIZE if context is None else min(DEFAULT_CHUNK_SIZE, context)
        # Non-causal mini-batches must not be cut: whole mini-batches per chunk reproduce "full".
        if whole is not None:
            return max(whole, chunk - chunk % whole)
        # Causal TTT: any chunk gives the same numbers, whole mini-batches are faster (no partial inner-loop steps).
        sizes = {options.mini_batch_size or block.cfg.mini_batch_size for block in ttt_blocks(model).values()}
        step = math.lcm(*sizes) if sizes else 1
        return chunk - chunk % step if chunk >= step else chunk
    if context is not None and options.chunk_size > context:
        raise ValueError(f"chunk_size {options.chunk_size} exceeds the model's attention context ({context} tokens)")
    if whole is not None and options.chunk_size % whole:
        raise ValueError(
            f"chunk_size {options.chunk_size} cuts the non-causal TTT mini-batches of {whole} tokens; use a multiple "
            f"of {whole} so that chunked scoring reproduces 'full'"
        )
    return options.chunk_size


def _check_model(model: LMModel) -> None:
    if not isinstance(model, LMModel):
        raise TypeError(f"score expects a moshi LMModel, got {type(model).__name__}")
    if model.training:
        raise ValueError("score needs the model in eval mode; call model.eval() first")
    if model.is_streaming or model.transformer.is_streaming:
        raise ValueError("the model is already streaming; scoring opens its own streaming session")
    if model.fuser is not None:
        raise ValueError("conditioned models (with a fuser) are not supported by scoring")
    if model.depformer is None:
        raise ValueError("scoring needs a model with a depth transformer (dep_q > 0)")


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [B, K, n, V], target [B, K, n] long -> [B, K, n] float32.

    Only invalid positions are masked: a target outside [0, V) (moshi's zero token, no prediction) gives NaN. A
    NaN or infinite logit at a valid position gives a NaN loss, so a broken model cannot score as a healthy one
    (no nan_to_num: it turned an all-NaN head into exactly log V).
    """
    V = logits.shape[-1]
    flat = logits.float().reshape(-1, V)  # [B * K * n, V]
    flat_target = target.reshape(-1)
    valid = (flat_target >= 0) & (flat_target < V)
    loss = F.cross_entropy(flat, flat_target.clamp(0, V - 1), reduction="none")
    loss = torch.where(valid & torch.isfinite(flat).all(dim=-1), loss, float("nan"))
    return loss.view(target.shape)


def iter_score(
    model: LMModel,
    audio_codes: torch.Tensor,
    mode: str | None = None,
    chunk_size: int | None = None,
    *,
    options: RunOptions | None = None,
    text_tokens: torch.Tensor | None = None,
    user_codes: torch.Tensor | None = None,
    **shortcuts: tp.Any,
) -> tp.Iterator[ScoreResult]:
    """Scores `audio_codes` step by step, yielding partial results for live plots.

    Args:
        model: a moshi LMModel in eval mode (with or without TTT layers), not streaming.
        audio_codes: [B, K, T] long Moshi-stream audio codes (K = model.dep_q = 8), on the model's device.
        mode, chunk_size, **shortcuts: RunOptions fields by name (mini_batch_size, persistent_states, reset_every,
            telemetry, record_every; None: the default), or
        options: a RunOptions (moshi_ttt/options.py) instead.
        text_tokens: [B, T] long text stream for text_stream "transcript" (scored: ScoreResult.text_loss).
        user_codes: [B, K, T] long second (user) audio stream of a model that has one (n_q = 2 K); None: zero token.
    Yields:
        ScoreResult with the first `tokens_done` steps every `record_every` tokens (at chunk boundaries; the loss
        and mask tensors are views that later steps do not change) and a last one with all T steps: the same
        numbers as `score`.
    Raises:
        ValueError: for a bad mode, chunk size, option, codes or a model that cannot be scored.
    """
    options = run_options(options, mode=mode, chunk_size=chunk_size, **shortcuts)
    return _iter_score(model, audio_codes, options, partial=True, text_tokens=text_tokens, user_codes=user_codes)


def _iter_score(
    model: LMModel,
    audio_codes: torch.Tensor,
    options: RunOptions,
    partial: bool,
    text_tokens: torch.Tensor | None = None,
    user_codes: torch.Tensor | None = None,
) -> tp.Iterator[ScoreResult]:
    """iter_score with the run's options; `partial=False` yields only the final result (`score`)."""
    _check_model(model)
    model_codes(model, audio_codes, user_codes=user_codes)  # checks the codes before any (greedy) text pass
    if audio_codes.shape[-1] == 0:
        raise ValueError("there are no audio codes to score (T = 0)")
    chunk = _chunk_size(model, options, audio_codes.shape[-1])
    text = text_row(model, audio_codes, options, text_tokens, user_codes)  # [B, T] or None (padding)
    codes = model_codes(model, audio_codes, text, user_codes)  # [B, 1 + n_q, T]
    B, _, T = codes.shape
    audio = slice(model.audio_offset, model.audio_offset + model.dep_q)
    delays = model.delays[audio]
    max_delay = max(delays)
    loss = torch.full((B, model.dep_q, T), float("nan"), dtype=torch.float32, device=codes.device)
    valid = codes[:, audio] != model.zero_token_id  # [B, K, T]
    steps = torch.arange(T, device=codes.device)
    mask = valid & torch.stack([steps < T - d for d in delays])[None]  # moshi's _undelay_sequence mask
    start_time = time.perf_counter()
    use_telemetry = options.telemetry and bool(ttt_blocks(model))
    text_loss = None
    if options.text_stream == "transcript":  # a given text is scored; moshi's _undelay_sequence mask for it
        text_loss = torch.full((B, T), float("nan"), dtype=torch.float32, device=codes.device)
        text_mask = (codes[:, 0] != model.zero_token_id) & (steps < T - model.delays[0])[None]  # [B, T]
    streams = _Streams(codes[:, 0], text_loss)

    with ExitStack() as stack:
        stack.enter_context(exact_streaming(model.transformer, B, chunk))
        set_streaming_options(model, options)
        recorder = stack.enter_context(record(model)) if use_telemetry else None
        if options.mode == "full":
            with torch.no_grad():
                out = model(codes)  # LMOutput, logits [B, K, T, V] already undelayed
                loss.copy_(torch.where(mask, _cross_entropy(out.logits, codes[:, audio]), loss))
                if text_loss is not None:  # text_logits [B, 1, T, V_text], undelayed
                    text_loss.copy_(_cross_entropy(out.text_logits, codes[:, :1])[:, 0])
            del out
        else:
            inputs = delayed_input(model, codes)  # [B, 1 + n_q, T]: step s predicts delayed step s
            targets = depformer_targets(model, codes)  # [B, 1 + n_q, T]
            next_record = options.record_every
            group = max(chunk, DEPTH_GROUP)  # delayed steps per depth-transformer call
            pending, scored = [], 0  # temporal outputs of delayed steps [scored, stop) not yet through the depformer
            for start in range(0, T, chunk):
                stop = min(start + chunk, T)
                with torch.no_grad():
                    transformer_out, text_logits = model.forward_text(inputs[:, :, start:stop])  # [B, n, dim]
                    pending.append(transformer_out)
                    if text_loss is not None:
                        _score_text(model, targets, text_logits, text_loss, start, stop)
                if stop - scored < group and stop < T and (not partial or stop - max_delay < next_record):
                    continue
                with torch.no_grad():
                    _score_depth(model, targets, torch.cat(pending, dim=1), loss, scored, stop)
                pending, scored = [], stop
                done = T if stop == T else max(0, stop - max_delay)  # steps whose every codebook is scored
                if partial and next_record <= done < T:
                    next_record = (done // options.record_every + 1) * options.record_every
                    yield _result(loss, mask, recorder, done, T, start_time, streams)
        loss.masked_fill_(~mask, float("nan"))
        if text_loss is not None:
            text_loss.masked_fill_(~text_mask, float("nan"))
        final = _result(loss, mask, recorder, T, T, start_time, streams)
    yield final


@dataclass(frozen=True)
class _Streams:
    text_tokens: torch.Tensor  # [B, T] long: the text stream read
    text_loss: torch.Tensor | None  # [B, T] float32 being filled, None when the text is not scored


def _score_text(model: LMModel, targets, text_logits: torch.Tensor, text_loss: torch.Tensor, start: int, stop: int):
    """Text cross-entropy of delayed steps [start, stop), written undelayed into `text_loss` [B, T].

    Args:
        targets: [B, 1 + n_q, T] delayed codes; text_logits: [B, 1, stop - start, V_text] from forward_text.
    """
    chunk_loss = _cross_entropy(text_logits, targets[:, :1, start:stop])[:, 0]  # [B, n]
    d = model.delays[0]
    lo = max(start, d)
    if lo < stop:
        text_loss[:, lo - d : stop - d] = chunk_loss[:, lo - start :]


def _score_depth(model: LMModel, targets, transformer_out: torch.Tensor, loss: torch.Tensor, start: int, stop: int):
    """Depth transformer and cross-entropy for delayed steps [start, stop); writes them, undelayed, into `loss`.

    Args:
        targets: [B, 1 + n_q, T] depformer targets (delayed codes); transformer_out: [B, stop - start, dim].
        loss: [B, K, T] float32, written in place.
    """
    audio = slice(model.audio_offset, model.audio_offset + model.dep_q)
    logits = model.forward_depformer_training(targets[:, :, start:stop], transformer_out)  # [B, K, n, V]
    chunk_loss = _cross_entropy(logits, targets[:, audio, start:stop])  # [B, K, n]
    # Undelay (moshi's _undelay_sequence): delayed step p of codebook k predicts step p - d_k of the codes.
    for k, d in enumerate(model.delays[audio]):
        lo = max(start, d)
        if lo < stop:
            loss[:, k, lo - d : stop - d] = chunk_loss[:, k, lo - start :]


def _result(loss, mask, recorder, done: int, total: int, start_time: float, streams: _Streams) -> ScoreResult:
    return ScoreResult(
        loss=loss[:, :, :done],
        mask=mask[:, :, :done],
        telemetry=None if recorder is None else recorder.snapshot(),
        tokens_done=done,
        total_tokens=total,
        elapsed_s=time.perf_counter() - start_time,
        text_loss=None if streams.text_loss is None else streams.text_loss[:, :done],
        text_tokens=streams.text_tokens,
    )


def score(
    model: LMModel,
    audio_codes: torch.Tensor,
    mode: str | None = None,
    chunk_size: int | None = None,
    *,
    options: RunOptions | None = None,
    text_tokens: torch.Tensor | None = None,
    user_codes: torch.Tensor | None = None,
    **shortcuts: tp.Any,
) -> ScoreResult:
    """Per-token teacher-forced cross-entropy of audio codes (docs/ARCHITECTURE.md contract), from fresh TTT state.

    `score(model, codes, mode="chunked", chunk_size=..., mini_batch_size=..., persistent_states=...)` and
    `score(model, codes, options=RunOptions(...))` are the same call.

    Args:
        model: a moshi LMModel in eval mode (with or without TTT layers), not streaming.
        audio_codes: [B, K, T] long Moshi-stream audio codes (K = model.dep_q = 8), on the model's device.
        mode: "full", "chunked" or "stream" (same numbers, different speed and memory; None: "chunked").
        chunk_size: tokens per chunk in "chunked" mode (None: min(250, context), in whole TTT mini-batches).
        **shortcuts: the other RunOptions fields by name: mini_batch_size and persistent_states (None: the layers'
            own), reset_every (tokens between resets with persistence off; None: the attention context), telemetry.
        options: a RunOptions instead of the keywords (text_stream picks the text stream; the loss weights only
            change reports).
        text_tokens: [B, T] long text stream for text_stream "transcript" (then scored: ScoreResult.text_loss).
        user_codes: [B, K, T] long second (user) audio stream of a model that has one; None: the zero token.
    Returns:
        ScoreResult with loss [B, K, T] (NaN where moshi's mask is False), mask [B, K, T], telemetry, the text
        stream read and, for a given text, its loss [B, T].
    """
    options = run_options(options, mode=mode, chunk_size=chunk_size, **shortcuts)
    *_, result = _iter_score(model, audio_codes, options, partial=False, text_tokens=text_tokens, user_codes=user_codes)
    return result
