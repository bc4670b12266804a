"""Token sequences as moshi's LMModel sees them: the full codebook stack, delays and the initial token."""

from __future__ import annotations

import typing as tp

import torch
from moshi.models.lm import LMModel

from moshi_ttt.compat.moshi import delay_sequence, initial_token


def _check_integer(name: str, tensor: tp.Any) -> None:
    """Codes are integer tensors: floats would be truncated and bools read as 0/1 without a word."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor of integers, not {type(tensor).__name__}")
    if tensor.dtype == torch.bool or tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise TypeError(f"{name} must be integers (torch.long), not {tensor.dtype}")


def model_codes(
    model: LMModel,
    audio_codes: torch.Tensor,
    text_tokens: torch.Tensor | None = None,
    user_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stacks Moshi-stream audio codes [B, dep_q, T] into the model's [B, 1 + n_q, T] input.

    Args:
        audio_codes: [B, dep_q, T] long, the Moshi stream (what the model predicts).
        text_tokens: [B, T] long text stream; None: the padding token at every step. moshi's zero token (-1) is
            embedded as zeros and masked out of the text loss.
        user_codes: [B, dep_q, T] long, the second (user) audio stream of a model that has one (n_q = 2 dep_q, as
            moshiko); None: the zero token (no input), which moshi embeds as zeros and masks out of the loss.
    Returns:
        codes [B, 1 + n_q, T] long: text, Moshi stream, user stream (moshi-finetune's layout).
    """
    _check_integer("audio codes", audio_codes)
    if audio_codes.dim() != 3 or audio_codes.shape[0] < 1:
        raise ValueError(f"audio codes must be [B, K, T] with B >= 1, got shape {list(audio_codes.shape)}")
    B, K, T = audio_codes.shape
    if K != model.dep_q:
        raise ValueError(f"the model predicts {model.dep_q} audio codebooks, the codes have {K}")
    _check_range("audio codes", audio_codes, model.card)
    codes = torch.full((B, model.num_codebooks, T), model.zero_token_id, dtype=torch.long, device=audio_codes.device)
    codes[:, 0] = model.text_padding_token_id
    codes[:, model.audio_offset : model.audio_offset + K] = audio_codes
    if text_tokens is not None:
        _check_integer("text tokens", text_tokens)
        if tuple(text_tokens.shape) != (B, T):
            raise ValueError(f"text tokens must be [B, T] = {[B, T]}, got shape {list(text_tokens.shape)}")
        _check_range("text tokens", text_tokens, model.text_card, allow_zero=model.zero_token_id)
        codes[:, 0] = text_tokens
    if user_codes is not None:
        user = model.num_audio_codebooks - model.dep_q  # codebooks of the user stream
        if user != K:
            raise ValueError(
                f"this model has no second (user) audio stream of {K} codebooks (it reads {model.num_audio_codebooks}"
                f" audio codebooks and predicts {model.dep_q}); score the Moshi channel alone"
            )
        _check_integer("user codes", user_codes)
        if tuple(user_codes.shape) != (B, K, T):
            raise ValueError(f"user codes must be [B, K, T] = {[B, K, T]}, got shape {list(user_codes.shape)}")
        _check_range("user codes", user_codes, model.card)
        codes[:, model.audio_offset + K :] = user_codes
    return codes


def _check_range(name: str, tokens: torch.Tensor, card: int, allow_zero: int | None = None) -> None:
    if tokens.numel() == 0:
        return
    values = tokens if allow_zero is None else tokens[tokens != allow_zero]
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= card):
        raise ValueError(f"{name} must lie in [0, {card}), got [{int(values.min())}, {int(values.max())}]")


def delayed_input(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """The [B, K, T] sequence that `LMModel.forward` gives `forward_text` for codes [B, K, T].

    Same steps as moshi 0.2.13's `LMModel.forward`: delay each stream, prepend the initial token, drop the last
    step. Position t of the result is the transformer input that predicts step t of `codes`.
    """
    B = codes.shape[0]
    initial = initial_token(model).expand(B, -1, -1)  # [B, K, 1]
    delayed = delay_sequence(model.delays, codes, initial)  # [B, K, T]
    return torch.cat([initial, delayed], dim=2)[:, :, :-1]


def depformer_targets(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """The [B, K, T] sequence that `LMModel.forward` gives `forward_depformer_training` (delayed, not shifted)."""
    B = codes.shape[0]
    initial = initial_token(model).expand(B, -1, -1)
    return delay_sequence(model.delays, codes, initial)


def delayed_window(
    model: LMModel, codes: torch.Tensor, offset: int, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`delayed_input` and `depformer_targets` of steps [start, stop), from the model codes of a window of steps.

    Args:
        codes: [B, K, w] model codes of steps [offset, offset + w), with offset + w >= stop and either offset = 0 or
            offset <= start - 1 - max(model.delays) (the earliest code a delayed input of the chunk reads).
    Returns:
        (inputs, targets), each [B, K, stop - start]: the same steps of `delayed_input(model, all_codes)` and
        `depformer_targets(model, all_codes)`.
    """
    if not (offset == 0 or offset <= start - 1 - max(model.delays)) or codes.shape[-1] + offset < stop:
        window = f"[{offset}, {offset + codes.shape[-1]})"
        raise ValueError(f"a window of steps {window} cannot give the delayed steps [{start}, {stop})")
    B = codes.shape[0]
    initial = initial_token(model).expand(B, -1, -1)  # [B, K, 1]
    # Right for absolute steps >= offset + max delay (all of them when offset = 0): the delayed steps read here.
    delayed = delay_sequence(model.delays, codes[..., : stop - offset], initial)  # [B, K, stop - offset]
    targets = delayed[..., start - offset :]
    if start == 0:
        inputs = torch.cat([initial, delayed[..., : stop - 1]], dim=2)
    else:
        inputs = delayed[..., start - 1 - offset : stop - 1 - offset]
    return inputs, targets
