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

from moshi_ttt.compat.sequence import delayed_window, model_codes
from moshi_ttt.compat.streaming import exact_streaming
from moshi_ttt.options import RunOptions, run_options
from moshi_ttt.scoring.telemetry import Telemetry, record
from moshi_ttt.scoring.text_stream import text_row
from moshi_ttt.ttt.apply import set_streaming_options, ttt_blocks
from moshi_ttt.ttt.inplace import inplace_blocks

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
    elapsed_s: float  # seconds of this scorer's own work so far (its caller's time between results left out)
    # [B, tokens_done] float32 text-stream cross-entropy where a text was given (text_stream "transcript"), NaN
    # where invalid (moshi's zero token); None when the text stream is not scored.
    text_loss: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None  # [B, tokens_done] long: the text stream read (-1: moshi's zero token)

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
        raise ValueError(
            "the model is already streaming; scoring opens its own streaming session (an iter_score generator left "
            "unfinished keeps its session open until it is closed: call its .close())"
        )
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
    return _iter_tensor(model, audio_codes, options, partial=True, text_tokens=text_tokens, user_codes=user_codes)


def iter_score_blocks(
    model: LMModel,
    code_blocks: tp.Iterable[torch.Tensor],
    *,
    options: RunOptions | None = None,
    expected_tokens: int | None = None,
    partial: bool = True,
) -> tp.Iterator[ScoreResult]:
    """Scores audio codes as they arrive, block by block (from moshi_ttt.data.stream, or a live encoder).

    In "chunked" and "stream" mode each block is scored as soon as it completes a chunk, holding only the steps a
    chunk still needs: memory stays flat in the length of the audio (beyond the [B, K, T] losses themselves). The
    numbers are those of `score` on the concatenated codes. "full" mode needs every code at once: it keeps the
    blocks and scores them at the end, so its memory grows with T (and its attention with T^2).

    Args:
        model: a moshi LMModel in eval mode, not streaming.
        code_blocks: [B, K, n] long audio codes (K = model.dep_q), on the model's device; any n, the same B.
        options: the run's options (None: the defaults).
        expected_tokens: the T the blocks are expected to add up to, for the partial results' `total_tokens` (a
            progress bar's total); the last result has the true T.
        partial: yield partial results every `options.record_every` tokens; False: the last result only.
    Yields:
        ScoreResult as `iter_score` (partial ones with `total_tokens` = max(expected_tokens, tokens received,
        tokens_done + 1)), then the complete one.
    Raises:
        ValueError: as `score`, and for blocks of another batch size or codebook count.
    """
    options = run_options(options)
    if options.text_stream in ("greedy", "transcript"):
        raise ValueError(f"text_stream {options.text_stream!r} needs the whole clip's codes: use score or iter_score")
    with BlockScorer(model, options, expected_tokens=expected_tokens, partial=partial) as scorer:
        for block in code_blocks:
            yield from scorer.push(block)
        final = scorer.finish()
    yield final


def _iter_tensor(
    model: LMModel,
    audio_codes: torch.Tensor,
    options: RunOptions,
    partial: bool,
    text_tokens: torch.Tensor | None = None,
    user_codes: torch.Tensor | None = None,
):
    """iter_score of one [B, K, T] tensor; `partial=False` yields only the final result (`score`)."""
    _check_model(model)
    model_codes(model, audio_codes, user_codes=user_codes)  # checks the codes before any (greedy) text pass
    if audio_codes.shape[-1] == 0:
        raise ValueError("there are no audio codes to score (T = 0)")
    text = text_row(model, audio_codes, options, text_tokens, user_codes)  # [B, T] or None (padding)
    scorer = BlockScorer(model, options, total_tokens=audio_codes.shape[-1], partial=partial)
    with scorer:
        yield from scorer.push(audio_codes, text, user_codes)
        final = scorer.finish()
    yield final


class _Growing:
    """A [B, K, n] tensor that grows along its last axis (capacity doubling); views of it stay valid."""

    def __init__(self, like: torch.Tensor, capacity: int, fill: float | bool):
        self.fill = fill
        self.data = torch.full((*like.shape[:2], max(capacity, 1)), fill, dtype=like.dtype, device=like.device)

    def ensure(self, n: int) -> torch.Tensor:
        if n > self.data.shape[-1]:
            grown = torch.full((*self.data.shape[:2], max(n, 2 * self.data.shape[-1])), self.fill,
                               dtype=self.data.dtype, device=self.data.device)  # fmt: skip
            grown[..., : self.data.shape[-1]] = self.data
            self.data = grown
        return self.data


class BlockScorer:
    """Teacher-forced scoring of audio codes pushed in blocks: the one loop behind `score`, `iter_score` and
    `iter_score_blocks`.

        with BlockScorer(model, options) as scorer:
            for block in blocks:                  # [B, K, n] each
                for partial in scorer.push(block):
                    ...
            result = scorer.finish()

    Chunks of the temporal transformer start at multiples of the chunk size whatever the blocks, so the numbers do
    not depend on how the codes were cut. Between pushes it holds the last `chunk + max delay` codes, the temporal
    outputs not yet through the depth transformer (< max(chunk, DEPTH_GROUP) steps) and the [B, K, T] losses and
    masks; "full" mode keeps every block until `finish`.
    """

    def __init__(
        self,
        model: LMModel,
        options: RunOptions,
        *,
        total_tokens: int | None = None,
        expected_tokens: int | None = None,
        partial: bool = True,
    ):
        """
        Args:
            total_tokens: the exact T when known (a whole tensor): its last chunk is then scored as the last one
                inside `push`, as `score` does.
            expected_tokens: the T expected, for partial results' `total_tokens` only.
            partial: yield partial results every `options.record_every` tokens.
        """
        _check_model(model)
        self.model, self.options, self.partial = model, options, partial
        self.total, self.expected = total_tokens, expected_tokens
        self.chunk = _chunk_size(model, options, total_tokens or 1)
        self.audio = slice(model.audio_offset, model.audio_offset + model.dep_q)
        self.max_delay = max(model.delays[self.audio])
        self.history = max(model.delays) + 1  # codes before a chunk that its delayed inputs read
        self.received = 0  # steps pushed so far
        self.forwarded = 0  # steps through the temporal transformer (a multiple of the chunk size until the end)
        self.scored = 0  # steps through the depth transformer
        self.next_record = options.record_every
        self.window: torch.Tensor | None = None  # [B, 1 + n_q, w] model codes of steps [window_start, received)
        self.window_start = 0
        self.blocks: list[torch.Tensor] = []  # "full" mode: every block, scored at `finish`
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (temporal out [B, n, dim], targets [B, K', n])
        self.loss: _Growing | None = None  # [B, K, T] float32, NaN until scored
        self.valid: _Growing | None = None  # [B, K, T] bool: not the zero token
        self.text: _Growing | None = None  # [B, 1, T] long: the text stream read
        self.text_loss: _Growing | None = None  # [B, 1, T] float32: text_stream "transcript" only
        self.recorder = None
        self.stack = ExitStack()
        self.opened = False  # inside the streaming session of model.transformer
        self.busy_s = 0.0  # seconds spent in push and finish so far, the caller's time between results left out
        self.since: float | None = None  # perf_counter at the start of the work under way (None: none)

    def __enter__(self) -> BlockScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Leaves the streaming session (the model is as it was before)."""
        self.stack.close()

    def _open(self, batch: int, chunk: int) -> None:
        self.opened = True
        self.stack.enter_context(exact_streaming(self.model.transformer, batch, chunk))
        set_streaming_options(self.model, self.options)
        use_telemetry = self.options.telemetry and bool(ttt_blocks(self.model) or inplace_blocks(self.model))
        self.recorder = self.stack.enter_context(record(self.model)) if use_telemetry else None

    def push(
        self, audio_codes: torch.Tensor, text_tokens: torch.Tensor | None = None, user_codes: torch.Tensor | None = None
    ) -> tp.Iterator[ScoreResult]:
        """Adds audio codes [B, K, n]; scores every chunk they complete, yielding partial results on the way.

        Args:
            text_tokens: [B, n] the block's text stream (None: as `options.text_stream` says: padding or zero).
            user_codes: [B, K, n] the block's user stream, for a model that has one (None: the zero token).
        Raises:
            ValueError: for codes that do not fit the model or the earlier blocks.
        """
        self._resume()
        try:
            yield from self._push(audio_codes, text_tokens, user_codes)
        finally:
            self._pause()

    def _resume(self) -> None:
        self.since = time.perf_counter()

    def _pause(self) -> None:
        if self.since is not None:
            self.busy_s += time.perf_counter() - self.since
            self.since = None

    def _busy(self) -> float:
        """Seconds of own work so far, the work under way included."""
        return self.busy_s + (time.perf_counter() - self.since if self.since is not None else 0.0)

    def _push(self, audio_codes, text_tokens, user_codes) -> tp.Iterator[ScoreResult]:
        """`push`'s work; the time its caller spends between two results is not counted (`_pause` at each yield)."""
        if text_tokens is None and self.options.text_stream == "zero":
            text_tokens = torch.full(audio_codes.shape[::2], self.model.zero_token_id, dtype=torch.long,
                                     device=audio_codes.device)  # fmt: skip
        codes = model_codes(self.model, audio_codes, text_tokens, user_codes)  # [B, 1 + n_q, n]
        B, _, n = codes.shape
        if self.loss is None:
            capacity = self.total or self.expected or n
            self.loss = _Growing(codes[:, self.audio].float(), capacity, float("nan"))
            self.valid = _Growing(codes[:, self.audio] != 0, capacity, False)
            self.text = _Growing(codes[:, :1], capacity, self.model.zero_token_id)
            if self.options.text_stream == "transcript":
                self.text_loss = _Growing(codes[:, :1].float(), capacity, float("nan"))
        elif B != self.loss.data.shape[0]:
            raise ValueError(f"every block must have batch size {self.loss.data.shape[0]}, got {B}")
        if self.total is not None and self.received + n > self.total:
            raise ValueError(f"more codes than the {self.total} steps announced")
        valid = self.valid.ensure(self.received + n)
        valid[..., self.received : self.received + n] = codes[:, self.audio] != self.model.zero_token_id
        self.loss.ensure(self.received + n)
        self.text.ensure(self.received + n)[..., self.received : self.received + n] = codes[:, :1]
        if self.text_loss is not None:
            self.text_loss.ensure(self.received + n)
        self.received += n
        if self.options.mode == "full":
            self.blocks.append(codes)
            return
        self.window = codes if self.window is None else torch.cat([self.window, codes], dim=2)
        if not self.opened:
            self._open(B, self.chunk)
        while self.forwarded < self.received:
            stop = self.forwarded + self.chunk
            if stop > self.received and self.received != self.total:
                break  # an incomplete chunk: wait for more codes (or `finish`)
            result = self._step(min(stop, self.received), last=min(stop, self.received) == self.total)
            if result is not None:
                self._pause()
                yield result
                self._resume()

    def _step(self, stop: int, last: bool) -> ScoreResult | None:
        """The temporal transformer over steps [forwarded, stop); the depth transformer when enough are pending.
        Returns a partial result when one is due."""
        model, start = self.model, self.forwarded
        inputs, targets = delayed_window(model, self.window, self.window_start, start, stop)  # [B, 1 + n_q, n] x2
        with torch.no_grad():
            transformer_out, text_logits = model.forward_text(inputs)  # [B, n, dim], [B, 1, n, V_text]
            self.pending.append((transformer_out, targets))
            if self.text_loss is not None:
                _score_text(model, targets, text_logits, self.text_loss.data[:, 0], start, stop)
        self.forwarded = stop
        keep = max(0, stop - self.history) - self.window_start  # the next chunk reads from step stop - 1 - delay
        if keep > 0:
            self.window, self.window_start = self.window[..., keep:], self.window_start + keep
        group = max(self.chunk, DEPTH_GROUP)  # delayed steps per depth-transformer call
        record_due = self.partial and stop - self.max_delay >= self.next_record
        if stop - self.scored < group and not last and not record_due:
            return None
        self._flush(stop)
        done = stop if last else max(0, stop - self.max_delay)  # steps whose every codebook is scored
        if self.partial and not last and self.next_record <= done:
            every = self.options.record_every
            self.next_record = (done // every + 1) * every
            total = max(self.expected or 0, self.received, done + 1)
            return self._result(done, total)
        return None

    def _flush(self, stop: int) -> None:
        if not self.pending:
            return
        outs, targets = zip(*self.pending, strict=True)
        with torch.no_grad():
            _score_depth(self.model, torch.cat(targets, dim=2), torch.cat(outs, dim=1), self.loss.data,
                         self.scored, stop)  # fmt: skip
        self.pending, self.scored = [], stop

    def finish(self) -> ScoreResult:
        """Scores what is left and returns the complete result (T = the steps pushed), then leaves the session.

        Raises:
            ValueError: no codes at all, or fewer than `total_tokens`.
        """
        self._resume()
        try:
            return self._finish()
        finally:
            self._pause()

    def _finish(self) -> ScoreResult:
        T = self.received
        if T == 0:
            raise ValueError("there are no audio codes to score (T = 0)")
        if self.total is not None and T != self.total:
            raise ValueError(f"{T} steps of codes were pushed, {self.total} announced")
        if self.options.mode == "full":
            self._score_full(torch.cat(self.blocks, dim=2))
            self.blocks = []
        else:
            while self.forwarded < T:
                self._step(min(self.forwarded + self.chunk, T), last=min(self.forwarded + self.chunk, T) == T)
            self._flush(T)
        steps = torch.arange(T, device=self.loss.data.device)
        delays = self.model.delays[self.audio]
        mask = self.valid.data[..., :T] & torch.stack([steps < T - d for d in delays])[None]  # _undelay_sequence's
        loss = self.loss.data[..., :T]
        loss.masked_fill_(~mask, float("nan"))
        if self.text_loss is not None:  # moshi's _undelay_sequence mask for the text
            text_mask = (self.text.data[:, 0, :T] != self.model.zero_token_id) & (steps < T - self.model.delays[0])
            self.text_loss.data[:, 0, :T].masked_fill_(~text_mask, float("nan"))
        result = self._result(T, T, mask=mask)
        self.close()
        return result

    def _score_full(self, codes: torch.Tensor) -> None:
        """The "full" mode: one LMModel.forward over all T steps (logits [B, K, T, V] already undelayed)."""
        self._open(codes.shape[0], max(codes.shape[-1], 1))
        with torch.no_grad():
            out = self.model(codes)
            self.loss.data[..., : codes.shape[-1]] = _cross_entropy(out.logits, codes[:, self.audio])
            if self.text_loss is not None:  # text_logits [B, 1, T, V_text], undelayed
                self.text_loss.data[..., : codes.shape[-1]] = _cross_entropy(out.text_logits, codes[:, :1])
        del out

    def _result(self, done: int, total: int, mask: torch.Tensor | None = None) -> ScoreResult:
        return ScoreResult(
            loss=self.loss.data[:, :, :done],
            mask=self.valid.data[:, :, :done] if mask is None else mask,
            telemetry=None if self.recorder is None else self.recorder.snapshot(),
            tokens_done=done,
            total_tokens=total,
            elapsed_s=self._busy(),
            text_loss=None if self.text_loss is None else self.text_loss.data[:, 0, :done],
            text_tokens=self.text.data[:, 0, :done],
        )


def _score_text(model: LMModel, targets, text_logits: torch.Tensor, text_loss: torch.Tensor, start: int, stop: int):
    """Text cross-entropy of delayed steps [start, stop), written undelayed into `text_loss` [B, T].

    Args:
        targets: [B, 1 + n_q, stop - start] delayed codes of those steps; text_logits: [B, 1, stop - start, V_text].
    """
    chunk_loss = _cross_entropy(text_logits, targets[:, :1])[:, 0]  # [B, n]
    d = model.delays[0]
    lo = max(start, d)
    if lo < stop:
        text_loss[:, lo - d : stop - d] = chunk_loss[:, lo - start :]


def _score_depth(model: LMModel, targets, transformer_out: torch.Tensor, loss: torch.Tensor, start: int, stop: int):
    """Depth transformer and cross-entropy for delayed steps [start, stop); writes them, undelayed, into `loss`.

    Args:
        targets: [B, 1 + n_q, stop - start] depformer targets (delayed codes) of those steps;
        transformer_out: [B, stop - start, dim].
        loss: [B, K, T] float32, written in place.
    """
    audio = slice(model.audio_offset, model.audio_offset + model.dep_q)
    logits = model.forward_depformer_training(targets, transformer_out)  # [B, K, n, V]
    chunk_loss = _cross_entropy(logits, targets[:, audio])  # [B, K, n]
    # Undelay (moshi's _undelay_sequence): delayed step p of codebook k predicts step p - d_k of the codes.
    for k, d in enumerate(model.delays[audio]):
        lo = max(start, d)
        if lo < stop:
            loss[:, k, lo - d : stop - d] = chunk_loss[:, k, lo - start :]


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
    scores = _iter_tensor(model, audio_codes, options, partial=False, text_tokens=text_tokens, user_codes=user_codes)
    *_, result = scores
    return result
