"""Token sequences as moshi's LMModel sees them: the full codebook stack, delays and the initial token."""

from __future__ import annotations

import torch
from moshi.models.lm import LMModel

from moshi_ttt.compat.moshi import delay_sequence, initial_token


def model_codes(model: LMModel, audio_codes: torch.Tensor) -> torch.Tensor:
    """Stacks Moshi-stream audio codes [B, dep_q, T] into the model's [B, 1 + n_q, T] input.

    The text stream gets the padding token; for models with a second (user) audio stream, that stream gets the
    zero token (no input), which moshi embeds as zeros and masks out of the loss.
    """
    if audio_codes.dim() != 3:
        raise ValueError(f"audio codes must be [B, K, T], got shape {list(audio_codes.shape)}")
    B, K, T = audio_codes.shape
    if K != model.dep_q:
        raise ValueError(f"the model predicts {model.dep_q} audio codebooks, the codes have {K}")
    if T > 0 and (int(audio_codes.min()) < 0 or int(audio_codes.max()) >= model.card):
        raise ValueError(f"audio codes must lie in [0, {model.card}), got [{audio_codes.min()}, {audio_codes.max()}]")
    codes = torch.full((B, model.num_codebooks, T), model.zero_token_id, dtype=torch.long, device=audio_codes.device)
    codes[:, 0] = model.text_padding_token_id
    codes[:, model.audio_offset : model.audio_offset + K] = audio_codes
    return codes


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
