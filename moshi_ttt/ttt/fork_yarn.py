"""The In-Place TTT fork's YaRN rotary embedding, reproduced to evaluate its checkpoints.

Notation: B batch rows, H heads, T tokens, D head dim, s the scale, L the original length.

From the fork's `moshi/moshi/moshi/modules/rope.py` (AlufRon/moshi_in_place, d2e9475), `_compute_yarn_parameters`
and `apply_rope`, which differ from YaRN as published (Peng et al. 2023, arXiv 2309.00071) and from moshi's RoPE:
- inverse frequencies f_j = 1 / max_period^(j / (D/2)) (moshi's own RoPE computes exp(-j ln(max_period) 2/D), a
  few ulps away), wavelengths 2 pi max_period^(j / (D/2));
- ramp r_j = clamp((wavelength_j - beta_slow L) / (beta_fast L - beta_slow L), 0, 1): the bounds are wavelengths
  beta L, where the paper bounds rotations, L / beta, so the roles of beta_fast and beta_slow are reversed; then
  f_j <- (1 - r_j) f_j + r_j f_j / s;
- attention factor 0.1 mscale ln(s) + 1 (over its mscale_all_dim value when that is > 0), 1 at mscale = 1, applied to
  the rotated queries only (the paper scales both queries and keys, i.e. the logits by its square);
- frequencies float32 at inference (its get_moshi_lm), bfloat16 in its training runs (wrapped_model.py casts the
  buffer to the parameter dtype); the angles are then computed in float32 either way;
- at inference its run_inference sets the attention context to the checkpoint's context times s.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moshi_ttt.compat.moshi import rotary, set_model_context, set_rotary
from moshi_ttt.config import YarnConfig


def yarn_frequencies(head_dim: int, max_period: float, cfg: YarnConfig) -> tuple[torch.Tensor, float]:
    """The fork's `_compute_yarn_parameters`: (inverse frequencies [D/2] float32, attention factor)."""
    if head_dim % 2:
        raise ValueError(f"YaRN needs an even head dim, got {head_dim}")
    half = head_dim // 2
    indices = torch.arange(half, dtype=torch.float32)
    inv_freq = 1.0 / (max_period ** (indices / half))
    wavelengths = 2 * math.pi * max_period ** (indices / half)
    low_freq_wavelen = cfg.beta_fast * cfg.original_max_seq_len
    high_freq_wavelen = cfg.beta_slow * cfg.original_max_seq_len
    ramp = ((wavelengths - high_freq_wavelen) / (low_freq_wavelen - high_freq_wavelen)).clamp(0.0, 1.0)
    inv_freq = (1 - ramp) * inv_freq + ramp * (inv_freq / cfg.scale)

    def get_mscale(value: float) -> float:
        return 0.1 * value * math.log(cfg.scale) + 1.0

    factor = 1.0
    if cfg.mscale != 1.0:
        factor = get_mscale(cfg.mscale)
        if cfg.mscale_all_dim > 0:
            factor = factor / get_mscale(cfg.mscale_all_dim)
    return inv_freq, factor


class ForkYarnRotary(nn.Module):
    """Drop-in for moshi's interleaved `RotaryEmbedding` with the fork's YaRN frequencies and query factor.

    The frequencies are a buffer that follows the model's device but keeps the dtype `cfg.frequencies` chose
    (`model.to(torch.bfloat16)` must not round float32 frequencies, nor a float64 model widen bfloat16 ones).
    """

    def __init__(self, head_dim: int, max_period: float, cfg: YarnConfig, device=None):
        super().__init__()
        inv_freq, factor = yarn_frequencies(head_dim, max_period, cfg)
        dtype = torch.bfloat16 if cfg.frequencies == "bfloat16" else torch.float32
        self.register_buffer("inv_freq", inv_freq.to(device=device, dtype=dtype), persistent=False)
        self.attention_factor = factor
        self.max_period = max_period
        self.cfg = cfg

    def _apply(self, fn, recurse=True):
        dtype = self.inv_freq.dtype
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq.to(dtype)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor, time_before_heads: bool = False):
        """q, k: [B, H, T, D] (or [B, T, H, D] with time_before_heads); offset [B]: position of their first token.
        Returns the rotated q (times the attention factor) and k, in their dtype (the fork's apply_rope)."""
        if time_before_heads:
            B, T, H, D = q.shape
        else:
            B, H, T, D = q.shape
        if k.shape != q.shape or D % 2:
            raise ValueError(f"rotary embedding needs q and k of one shape with an even last dim, got {q.shape}")
        freqs = self.inv_freq.to(q.device)  # [D/2], bfloat16 or float32; the products below are float32
        ts = offset.float().view(-1, 1) + torch.arange(T, device=q.device, dtype=torch.float32)  # [B, T]
        ts = ts.view(B, -1, 1, 1) if time_before_heads else ts.view(B, 1, -1, 1)
        dims = q.shape[:-1]
        q, k = q.view(*dims, D // 2, 2), k.view(*dims, D // 2, 2)  # interleaved pairs (real, imaginary)
        qr, qi, kr, ki = q[..., 0].float(), q[..., 1].float(), k[..., 0].float(), k[..., 1].float()
        rotr, roti = torch.cos(freqs * ts), torch.sin(freqs * ts)
        qor, qoi = qr * rotr - qi * roti, qr * roti + qi * rotr
        kor, koi = kr * rotr - ki * roti, kr * roti + ki * rotr
        if self.attention_factor != 1.0:  # queries only, as the fork
            qor, qoi = qor * self.attention_factor, qoi * self.attention_factor
        dtype = q.dtype
        qo = torch.stack([qor.to(dtype), qoi.to(dtype)], dim=-1)
        ko = torch.stack([kor.to(dtype), koi.to(dtype)], dim=-1)
        return qo.view(*dims, D), ko.view(*dims, D)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"fork YaRN scale={c.scale}, original_max_seq_len={c.original_max_seq_len}, beta_fast={c.beta_fast}, "
            f"beta_slow={c.beta_slow}, attention_factor={self.attention_factor:.4g}, frequencies={c.frequencies}"
        )


def apply_fork_yarn(model, cfg: YarnConfig):
    """Puts the fork's YaRN into the temporal transformer of a moshi LMModel (interleaved "rope" or "sin_rope"),
    and with `cfg.extend_context` multiplies its attention context by the scale.

    Returns:
        The same LMModel (its `context` the new attention window).
    Raises:
        ValueError: for a transformer without interleaved rope, or a model that is streaming.
    """
    transformer = model.transformer
    if transformer.positional_embedding not in ("rope", "sin_rope"):
        raise ValueError(
            f"the fork's YaRN replaces interleaved RoPE; this model's positional embedding is "
            f"{transformer.positional_embedding!r}"
        )
    if model.is_streaming:
        raise ValueError("YaRN cannot be put into a model while it is streaming")
    layer = transformer.layers[0].self_attn
    head_dim = layer.embed_dim // layer.num_heads
    device = next(model.parameters()).device
    set_rotary(model, ForkYarnRotary(head_dim, float(transformer.max_period), cfg, device=device))
    if cfg.extend_context and model.context is not None:
        set_model_context(model, int(model.context * cfg.scale))  # the fork's run_inference: int(context * scale)
    return model


def fork_yarn_of(model) -> YarnConfig | None:
    """The YaRN settings `apply_fork_yarn` put into a moshi LMModel's temporal transformer; None without them."""
    rope = rotary(model)
    return rope.cfg if isinstance(rope, ForkYarnRotary) else None
