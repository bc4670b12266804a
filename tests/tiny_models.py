"""One helper builds every tiny moshi model the tests use (CPU, float32 by default)."""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402

CONTEXT = 16  # attention window of the tiny models, in tokens


def tiny_lm_config(
    *,
    n_q: int = 8,
    dim: int = 32,
    num_layers: int = 3,
    num_heads: int = 4,
    context: int = CONTEXT,
    card: int = 24,
    text_card: int = 12,
    norm: str = "rms_norm_f32",
    positional_embedding: str = "rope",
) -> dict:
    """LMModel kwargs of a Moshi-shaped tiny model (rope, silu gating, rms_norm_f32, depformer with weights per
    step): what a checkpoint's lm_config holds.

    n_q=8: audio only (text + 8 codebooks); n_q=16: moshiko-like with a second (user) audio stream. moshi's rope and
    rms_norm_f32 compute in float32, so float64 tests use norm="rms_norm" and positional_embedding="sin".
    """
    delays = [0] + [0] + [1] * 7
    if n_q == 16:
        delays = delays + [0] + [1] * 7
    return {
        "delays": delays,
        "n_q": n_q,
        "dep_q": 8,
        "card": card,
        "text_card": text_card,
        "existing_text_padding_id": 3,
        "dim": dim,
        "num_heads": num_heads,
        "num_layers": num_layers,
        "hidden_scale": 2,
        "causal": True,
        "context": context,
        "max_period": 10000,
        "gating": "silu",
        "norm": norm,
        "positional_embedding": positional_embedding,
        "depformer_dim": 16,
        "depformer_dim_feedforward": 32,
        "depformer_num_heads": 2,
        "depformer_num_layers": 1,
        "depformer_multi_linear": True,
        "depformer_context": 8,
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "depformer_gating": "silu",
    }


def tiny_lm(seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str = "cpu", **config) -> LMModel:
    """A tiny LMModel on CPU (or `device`, e.g. "meta") in eval mode, seeded; `config` overrides `tiny_lm_config`'s
    arguments."""
    torch.manual_seed(seed)
    return LMModel(**tiny_lm_config(**config), device=device, dtype=dtype).eval()


def random_audio_codes(batch: int, steps: int, card: int = 24, seed: int = 0) -> torch.Tensor:
    """Random audio codes [B, 8, T]; each row different."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, card, (batch, 8, steps), generator=g)
