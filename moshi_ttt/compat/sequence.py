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
