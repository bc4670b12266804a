"""The text stream a model reads while its audio is scored (RunOptions.text_stream, docs/ARCHITECTURE.md "Scoring").

Notation: B batch rows, K = dep_q audio codebooks of the Moshi stream, T steps (12.5 Hz), V text card.

Moshi reads three streams at every step: its text (the "inner monologue"), its own audio and the user's audio. When
audio is scored teacher-forced, the text stream must be filled with something:

- "padding": the text padding token at every step (what Moshi reads while it has nothing to say in text);
- "zero": moshi's zero token, embedded as zeros (no text input at all): the older TTT fork's minimal-pair convention;
- "greedy": the model's own greedy text while it speaks the given audio: a token at step t is the argmax of the
  text logits of step t and is read back at step t + 1. Being autoregressive, it needs one pass over the audio one
  token at a time before the teacher-forced scoring (which then gives the same numbers in every mode). It is exactly
  what moshi's `LMGen` produces with `use_sampling=False` when the audio is forced (`depformer_replace_tokens`) for
  a model without TTT layers, or whose TTT layers persist (`TTTConfig.persistent_states=True`) and keep the
  checkpoint's options in the run. Not otherwise: with `persistent_states=False`, LMGen resets the fast weights at
  each of its one-token calls (every step is a forward call), so TTT remembers nothing there, while the greedy pass
  resets every `reset_every` tokens (docs/ARCHITECTURE.md, "Persistence"), and the texts differ;
- "transcript": text tokens given by the caller, e.g. a transcript with word timestamps laid out as moshi-finetune
  trains (`moshi_ttt.data.alignments`); only this stream is scored (a text loss).
"""

from __future__ import annotations

import torch
from moshi.models.lm import LMModel

from moshi_ttt.compat.sequence import delayed_input, model_codes
from moshi_ttt.compat.streaming import exact_streaming
from moshi_ttt.options import RunOptions
from moshi_ttt.ttt.apply import set_streaming_options, ttt_blocks


def text_row(
    model: LMModel,
    audio_codes: torch.Tensor,
    options: RunOptions,
    text_tokens: torch.Tensor | None = None,
    user_codes: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The text stream [B, T] of a scoring run, None for the padding token (compat.sequence.model_codes' default).

    Args:
        audio_codes: [B, K, T] Moshi-stream codes; user_codes: [B, K, T] user-stream codes or None.
        options: the run's options; `options.text_stream` picks the stream.
        text_tokens: [B, T] long, required by "transcript" and refused by the others.
    Raises:
        ValueError: text tokens missing for "transcript" or given for another stream.
    """
    stream = options.text_stream
    if stream == "transcript":
        if text_tokens is None:
            raise ValueError("text_stream 'transcript' needs the transcript's text tokens (text_tokens=[B, T])")
        return text_tokens
    if text_tokens is not None:
        raise ValueError(f"text tokens were given but text_stream is {stream!r}; use text_stream='transcript'")
    if stream == "zero":
        B, _, T = audio_codes.shape
        return torch.full((B, T), model.zero_token_id, dtype=torch.long, device=audio_codes.device)
    if stream == "greedy":
        return greedy_text(model, audio_codes, options, user_codes)
    return None


def greedy_text(
    model: LMModel,
    audio_codes: torch.Tensor,
    options: RunOptions | None = None,
    user_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's own greedy text [B, T] while the audio (and user audio) is forced, from fresh TTT state, with the
    run's persistence rule (`options`). It equals moshi's `LMGen` with `use_sampling=False` and
    `depformer_replace_tokens` the delayed audio codes only when LMGen keeps the same TTT state: a model without TTT
    layers, or with `TTTConfig.persistent_states=True` and the checkpoint's options; with `persistent_states=False`
    LMGen resets the fast weights at every one-token call (module docstring).

    Args:
        model: a moshi LMModel in eval mode, not streaming.
        audio_codes: [B, K, T] long Moshi-stream codes; user_codes: [B, K, T] or None (zero token).
        options: the run's TTT options (mini-batch size, persistence); None: RunOptions().
    Returns:
        text tokens [B, T] long: token t is the argmax of the text logits at step t, read back at step t + 1.
    Raises:
        ValueError: a delayed text stream, or non-causal (older) TTT layers that cannot read one token at a time.
    """
    options = options or RunOptions()
    if model.delays[0] != 0:
        raise ValueError(
            f"greedy text needs an undelayed text stream (as moshi's), this model delays it by {model.delays[0]}"
        )
    for block in ttt_blocks(model).values():
        legacy = block.cfg.legacy
        if legacy is not None and not legacy.causal and block.cfg.mini_batch_size > 1:
            raise ValueError(
                "this checkpoint's TTT layers are non-causal (every token sees its whole mini-batch), so it has no "
                "greedy text of its own; use text_stream 'padding' or 'zero'"
            )
    codes = model_codes(model, audio_codes, user_codes=user_codes)  # [B, 1 + n_q, T], text: placeholder
    inputs = delayed_input(model, codes)  # [B, 1 + n_q, T]: position t reads step t - 1 (the initial token at 0)
    B, _, T = codes.shape
    text = torch.empty((B, T), dtype=torch.long, device=codes.device)
    with torch.no_grad(), exact_streaming(model.transformer, B, 1):
        set_streaming_options(model, options)
        for t in range(T):
            _, text_logits = model.forward_text(inputs[:, :, t : t + 1])  # [B, 1, 1, V]
            text[:, t] = text_logits[:, 0, 0].float().argmax(dim=-1)  # moshi's sample_token without sampling
            if t + 1 < T:
                inputs[:, 0, t + 1] = text[:, t]
    return text
