"""Legacy mode: the TTT math of the older moshi-finetune TTT fork, reproduced to evaluate its checkpoints.

Notation: B batch, H heads, T tokens, D head dim, L layers of the inner MLP, b mini-batch size, n tokens of one
segment (a piece of one mini-batch), d_l the width of layer l of the inner MLP (d_0 = d_L = D).

What differs from the core math of `ops.py` (ARCHITECTURE.md, "TTT-MLP math"), all as the older fork's active code
does it. It was checked by running the fork (AlufRon/claude-web, `moshi_ttt_try/moshi-finetune/`, the path that
`finetune/ttt_integration.py` `apply_ttt_to_model` builds: `moshi_ttt/hybrid_layer.py` -> `moshi_ttt/models/ssm/
ttt_layer.py` `TTTWrapper` -> `models/ssm/ops/ttt_mlp.py`); paths below are relative to its `moshi_ttt/`:
- the branch reads the self-attention output directly (no norm before it) and is gated by tanh(clamp(alpha, -3, 3))
  (`hybrid_layer.py` `_ttt_forward`, `ssm_gating.py`);
- q and k are L2-normalised per head, then optionally rotated (RoPE) with positions modulo the mini-batch and the
  fork's "audio" frequency scaling (`models/ssm/ttt_layer.py` `process_input`, `models/ssm/utils.py`);
- the reconstruction target normalises v - k with the unbiased std + 1e-5 (`target="legacy"` of
  ops.reconstruction_target, from `models/ssm/ttt_layer.py` `ln_reconstruction_target`);
- every other per-head LayerNorm (in the inner loss, its hand-written gradient and on the output) uses
  sqrt(biased var + 1e-8) (`models/ssm/ops/utils.py` `ln_fwd`, `ln_fused_l2_bwd`), and gelu's derivative is the
  fork's `gelu_bwd` formula;
- lr_s = base_lr * sigmoid(theta_h . x_s + b_h) / (D * b), with no 1/i position factor
  (`models/ssm/ttt_layer.py` `get_eta`, `process_input`);
- the inner MLP has 2 to 10 layers, gelu_tanh between them, the per-head LayerNorm after the last;
- NON-CAUSAL mini-batches: token i of a mini-batch reads with W0 - sum_{s in mini-batch} lr_s grad l_s(W0), so
  it sees the keys and values of the later tokens of its mini-batch (`models/ssm/ops/ttt_mlp.py` `compute_mini_batch`:
  its eta matrix is not masked). `causal=True` gives the same weights the causal reading W0 - sum_{s<=i} lr_s grad;
- 3 or more MLP layers (`models/ssm/ops/ttt_mlp.py` `compute_multi_layer_mini_batch`): each token reads with the
  end-of-mini-batch weights AND still subtracts the per-token correction terms, i.e. with W0 - 2 sum_s lr_s grad
  l_s(W0), an update applied twice (a bug of the fork, but its checkpoints were trained with it); the weights
  carried to the next mini-batch take the step once. Its 2-layer path (`compute_mini_batch`) takes it once;
  `causal=True` keeps the doubled read and drops only the later tokens;
- zero padding: the fork's forward (`hybrid_layer.py` `_apply_ttt_processing_impl`) appends zero hidden states up
  to a multiple of b before q/k/v/lr, so the padded tokens (q, k, v = the projection biases) join the gradient of
  the last, non-causal mini-batch and change the real tokens' outputs. Here a call whose last mini-batch is
  partial adds those zero tokens to it for its outputs (never to the state), so whole-mini-batch chunks still give
  the same numbers as one call. With `causal=True` they come after every real token and change nothing;
- the module's `wo` and `post_norm` are trained parameters of the fork that its forward never applied
  (`TTTWrapper.forward` calls `ttt.ttt`, not `ttt.forward`): they are loaded and deliberately unused here.
Not reproduced: in eval mode the fork's 3+-layer module writes the final fast weights of batch row 0 back into its
parameters after every forward call (`models/ssm/ttt_layer.py` `TTTMLPMultiLayer.ttt`), so its later calls start
from the previous file's state; here every file starts from the checkpoint's weights.

In streaming, a token can only see the tokens read so far: a non-causal mini-batch split over several calls
reads with the gradient of the tokens of its mini-batch read up to the end of the current call (plus the zero
padding above). Full mini-batches always end with the same weight update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import typing as tp
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from moshi.modules.streaming import State, StreamingModule
from torch import nn

from moshi_ttt.compat.moshi import set_attention_context, streaming_state
from moshi_ttt.config import TTTConfig
from moshi_ttt.ttt.inner_math import gelu_tanh, reconstruction_target
from moshi_ttt.ttt.layer import apply_keeping_float32, keep_float32
from moshi_ttt.ttt.session import SessionOptions, SessionOptionsView, periodic_reset, reset_segments

logger = logging.getLogger(__name__)

GATE_CLAMP = 3.0  # |alpha| bound of the fork's gate, tanh(clamp(alpha, -3, 3))
FORK_LN_EPS = 1e-8  # the fork's per-head LayerNorm: sqrt(biased var + 1e-8) (models/ssm/ops/utils.py ln_fwd)
# The fork's gelu_tanh derivative constants (models/ssm/ops/utils.py gelu_bwd): sqrt(2/pi) and 3 * 0.044715 * it.
GELU_C, GELU_C3 = 0.79788456, 0.1070322243
# Parameters of LegacyTTTBlock kept in float32 whatever dtype the model is moved to.
FLOAT32_PARAMS = ("ttt_norm_weight", "ttt_norm_bias", "learnable_ttt_lr_weight", "learnable_ttt_lr_bias")


class LegacyInner(tp.NamedTuple):
    """Where the legacy inner loop stands between two calls (all rows at the same position p)."""

    weights: tuple[torch.Tensor, ...]  # W0 of each MLP layer, [B, H, d_l, d_{l+1}]
    biases: tuple[torch.Tensor, ...]  # [B, H, 1, d_{l+1}]
    keys: torch.Tensor  # [B, H, p, D] keys of the tokens already read of the current mini-batch
    targets: torch.Tensor  # [B, H, p, D] their reconstruction targets
    lrs: torch.Tensor  # [B, H, p] their learning rates


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(|x|_2, 1e-12) over the last dim (torch.nn.functional.normalize, as the fork)."""
    return F.normalize(x, p=2.0, dim=-1)


def fork_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The fork's per-head LayerNorm (models/ssm/ops/utils.py `ln_fwd`): gamma (x - mean) / sqrt(var + 1e-8) + beta
    with the biased variance. x: [B, H, n, D]; weight, bias: [H, D]."""
    x_hat = F.layer_norm(x, x.shape[-1:], eps=FORK_LN_EPS)
    return weight[None, :, None, :] * x_hat + bias[None, :, None, :]


def fork_ln_l2_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """d/dz of 1/2 |LN(z) - target|^2 with the fork's LayerNorm (models/ssm/ops/utils.py `ln_fused_l2_bwd`).

    z, target: [B, H, n, D]; weight, bias: [H, D]. Written out (differentiable for the outer loop).
    """
    D = z.shape[-1]
    mean = z.mean(dim=-1, keepdim=True)
    std = torch.sqrt(z.var(dim=-1, keepdim=True, unbiased=False) + FORK_LN_EPS)
    z_hat = (z - mean) / std
    gamma = weight[None, :, None, :]
    grad_hat = (gamma * z_hat + bias[None, :, None, :] - target) * gamma  # dL/dz_hat
    inner = D * grad_hat - grad_hat.sum(dim=-1, keepdim=True) - z_hat * (grad_hat * z_hat).sum(dim=-1, keepdim=True)
    return inner / (D * std)


def fork_gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad * gelu_tanh'(x) with the fork's formula and constants (models/ssm/ops/utils.py `gelu_bwd`)."""
    tanh_out = torch.tanh(GELU_C * x * (1 + 0.044715 * x * x))
    slope = 0.5 * x * ((1 - tanh_out * tanh_out) * (GELU_C + GELU_C3 * x * x)) + 0.5 * (1 + tanh_out)
    return grad * slope


def rope_modulo(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [B, H, T, D] at positions [B, T]: pairs (x_2j, x_2j+1) turn by pos * f_j.

    f_j = theta^(-2j/D) * (0.5 + 1.5 exp(-j/D)), the fork's `precompute_audio_rope_1d(..., audio_scaling=True)`
    (models/ssm/utils.py), which `process_input` uses with positions modulo the mini-batch.
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got {D}")
    even = torch.arange(0, D, 2, dtype=x.dtype, device=x.device)  # 2j
    freqs = theta ** (-even / D) * (0.5 + 1.5 * torch.exp(-even / (2 * D)))  # [D/2]
    angles = positions.to(x.dtype)[:, None, :, None] * freqs  # [B, 1, T, D/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    pairs = rearrange(x, "b h t (j two) -> b h t j two", two=2)
    even, odd = pairs[..., 0], pairs[..., 1]  # [B, H, T, D/2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rearrange(rotated, "b h t j two -> b h t (j two)")


def legacy_lr(
    h: torch.Tensor, lr_weight: torch.Tensor, lr_bias: torch.Tensor, base_lr: float, mini_batch_size: int
) -> torch.Tensor:
    """lr_s = base_lr * sigmoid(theta_h . h_s + b_h) / (D * b). h: [B, T, dim]; lr_weight [H, 1, dim]; -> [B, H, T]."""
    H, _, dim = lr_weight.shape
    head_dim = dim // H
    gate = torch.einsum("btc,hc->bht", h, lr_weight[:, 0]) + lr_bias.reshape(1, H, 1)  # [B, H, T]
    return base_lr * torch.sigmoid(gate) / (head_dim * mini_batch_size)


def _inner_grads(
    weights: tp.Sequence[torch.Tensor], biases: tp.Sequence[torch.Tensor], xk, target, ln_weight, ln_bias
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward on the keys and hand-written backward of 1/2 |LN(f(k)) - target|^2, all at W0.

    Returns the input X_l [B, H, n, d_l] and the output gradient G_l = dl/dZ_l [B, H, n, d_{l+1}] of every layer.
    """
    inputs, pre_acts = [xk], []
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        z = inputs[-1] @ w + b  # [B, H, n, d_l] @ [B, H, d_l, d_{l+1}] -> [B, H, n, d_{l+1}]
        pre_acts.append(z)
        if i < len(weights) - 1:
            inputs.append(gelu_tanh(z))
    grads = [fork_ln_l2_grad(pre_acts[-1], target, ln_weight, ln_bias)]  # [B, H, n, D]
    for i in range(len(weights) - 1, 0, -1):
        # [B, H, n, d_{i+1}] @ [B, H, d_{i+1}, d_i] -> [B, H, n, d_i], times gelu' of layer i - 1's pre-activation
        back = grads[0] @ weights[i].transpose(-1, -2)
        grads.insert(0, fork_gelu_backward(back, pre_acts[i - 1]))
    return inputs, grads


def legacy_segment(
    weights: tp.Sequence[torch.Tensor],
    biases: tp.Sequence[torch.Tensor],
    xq: torch.Tensor,
    xk: torch.Tensor,
    target: torch.Tensor,
    lr: torch.Tensor,
    query_start: int,
    causal: bool,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Dual form over the n tokens of one (piece of a) mini-batch, every gradient at W0.

    Args:
        xk, target: [B, H, n, D] and lr [B, H, n] of all the tokens of the mini-batch read so far (with the zero
            padding of a non-causal partial mini-batch, if any, at the end).
        xq: [B, H, m, D] queries of the tokens query_start .. query_start + m - 1: the earlier ones were output by
            an earlier call, the later ones (padding) are never output.
        causal: False (the fork) lets query i use the gradients of all n tokens; True only those of tokens <= i.
    Returns:
        out [B, H, m, D], and the weights and biases after the step of all n tokens.
    """
    n, m = xk.shape[2], xq.shape[2]
    inputs, grads = _inner_grads(weights, biases, xk, target, ln_weight, ln_bias)
    eta = lr[..., None, :].expand(*lr.shape[:2], m, n)  # [B, H, m, n]: eta[i, s] = lr_s
    if causal:
        rows = torch.arange(query_start, query_start + m, device=xq.device)[:, None]  # [m, 1]
        eta = eta * (torch.arange(n, device=xq.device)[None, :] <= rows).to(eta.dtype)
    # Layer l reads with W_l - sum_s eta[i, s] X_l[s]^T G_l[s] and b_l - sum_s eta[i, s] G_l[s] (2 layers, the
    # fork's compute_mini_batch). With 3 or more layers the fork's compute_multi_layer_mini_batch
    # (models/ssm/ops/ttt_mlp.py) reads with the end-of-mini-batch weights and subtracts the same terms again.
    steps = 1.0 if len(weights) == 2 else 2.0
    x = xq
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        attn = x @ inputs[i].transpose(-1, -2) + 1.0  # [B, H, m, d_l] @ [B, H, d_l, n] -> [B, H, m, n]
        z = x @ w + b - steps * ((eta * attn) @ grads[i])  # [B, H, m, d_{l+1}]
        x = gelu_tanh(z) if i < len(weights) - 1 else z
    out = xq + fork_layer_norm(x, ln_weight, ln_bias)
    new_weights = tuple(
        w - inputs[i].transpose(-1, -2) @ (lr[..., None] * grads[i])  # [B, H, d_l, n] @ [B, H, n, d_{l+1}]
        for i, w in enumerate(weights)
    )
    new_biases = tuple(b - (lr[..., None] * g).sum(dim=-2, keepdim=True) for b, g in zip(biases, grads, strict=True))
    return out, new_weights, new_biases


class LegacyPad(tp.NamedTuple):
    """Zero-hidden-state tokens that follow the call's last token (the fork's padding), at least b - 1 of them."""

    keys: torch.Tensor  # [B, H, P, D]
    targets: torch.Tensor  # [B, H, P, D]
    lrs: torch.Tensor  # [B, H, P]


def legacy_ttt_chunk(
    state: LegacyInner,
    xq: torch.Tensor,
    xk: torch.Tensor,
    target: torch.Tensor,
    lr: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mini_batch_size: int,
    causal: bool,
    pad: LegacyPad | None = None,
) -> tuple[torch.Tensor, LegacyInner]:
    """Runs T new tokens (xq, xk, target [B, H, T, D], lr [B, H, T]) from `state`, which may be inside a mini-batch.

    `pad`: when given, a trailing partial mini-batch is completed with its first tokens for the outputs (the
    fork's zero padding); they never enter the returned state.
    Returns out [B, H, T, D] in float32 (float64 for float64 inputs) and the new state; full mini-batches update
    the weights, a trailing partial one stays in the state.
    """
    dtype = torch.promote_types(xq.dtype, torch.float32)
    xq, xk, target, lr, ln_weight, ln_bias = (t.to(dtype) for t in (xq, xk, target, lr, ln_weight, ln_bias))
    p = state.keys.shape[2]
    if not 0 <= p < mini_batch_size:
        raise ValueError(f"legacy state holds {p} tokens, expected fewer than the mini-batch size {mini_batch_size}")
    keys = torch.cat([state.keys.to(dtype), xk], dim=2)  # [B, H, p + T, D]
    targets = torch.cat([state.targets.to(dtype), target], dim=2)
    lrs = torch.cat([state.lrs.to(dtype), lr], dim=2)  # [B, H, p + T]
    weights = tuple(w.to(dtype) for w in state.weights)
    biases = tuple(b.to(dtype) for b in state.biases)
    total, outs, start = keys.shape[2], [], 0
    while start < total:
        end = min(start + mini_batch_size, total)
        q0 = max(start, p)  # first token of this segment not output yet
        seg_k, seg_t, seg_lr = keys[:, :, start:end], targets[:, :, start:end], lrs[:, :, start:end]
        missing = mini_batch_size - (end - start)
        if missing and pad is not None:  # a partial mini-batch, padded with zero tokens as the fork's forward
            seg_k = torch.cat([seg_k, pad.keys[:, :, :missing].to(dtype)], dim=2)
            seg_t = torch.cat([seg_t, pad.targets[:, :, :missing].to(dtype)], dim=2)
            seg_lr = torch.cat([seg_lr, pad.lrs[:, :, :missing].to(dtype)], dim=2)
        out, new_weights, new_biases = legacy_segment(
            weights, biases, xq[:, :, q0 - p : end - p], seg_k, seg_t, seg_lr, q0 - start, causal, ln_weight, ln_bias
        )
        outs.append(out)
        if end - start < mini_batch_size:
            break
        weights, biases, start = new_weights, new_biases, end
    rest = slice(start, total)
    new_state = LegacyInner(weights, biases, keys[:, :, rest], targets[:, :, rest], lrs[:, :, rest])
    return torch.cat(outs, dim=2) if outs else xq.new_zeros(xq.shape), new_state


class Float32ParameterList(nn.ParameterList):
    """A ParameterList whose tensors follow the device but never drop below float32 (the fast weights)."""

    def _apply(self, fn, recurse=True):
        for name, param in list(self._parameters.items()):
            self._parameters[name] = keep_float32(param, fn)
        return self


@dataclass
class LegacyTTTState(SessionOptionsView, State):
    """Streaming state of one LegacyTTTBlock; one row per batch element."""

    weights: list[torch.Tensor]  # W0 per MLP layer, [B, H, d_l, d_{l+1}]
    biases: list[torch.Tensor]  # [B, H, 1, d_{l+1}]
    keys: torch.Tensor  # [B, H, b, D]: the first `position` entries of each row are its current mini-batch's keys
    targets: torch.Tensor  # [B, H, b, D]
    lrs: torch.Tensor  # [B, H, b]
    position: torch.Tensor  # [B] long: tokens read of the current mini-batch
    offset: torch.Tensor  # [B] long: tokens read since the last reset
    # W0 of every MLP layer [H, ...]: detached views of the block's parameters (they follow in-place updates).
    base: tuple[list[torch.Tensor], list[torch.Tensor]]
    session: SessionOptions  # this session's mini-batch size, persistence and observer (ttt/session.py)
    fixed_mini_batch_size: tp.ClassVar[bool] = True  # b is part of the fork's math (its lr divides by it)

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        m = reset_mask.view(-1, 1, 1, 1)
        for dst, src in zip(self.weights + self.biases, self.base[0] + self.base[1], strict=True):
            dst.copy_(torch.where(m, src.expand_as(dst), dst))
        self.position.masked_fill_(reset_mask, 0)
        self.offset.masked_fill_(reset_mask, 0)


class LegacyTTTBlock(StreamingModule[LegacyTTTState]):
    """x -> x + tanh(clamp(alpha, -3, 3)) * TTT(x) with the older fork's math (module docstring).

    Parameter names follow the fork's (`learnable_ttt_lr_weight` [H, 1, dim], `weights.i`, `biases.i`, ...) so its
    checkpoints map one to one; a 2-layer MLP's W1, b1, W2, b2 are `weights.0`, `biases.0`, `weights.1`, `biases.1`.
    """

    def __init__(self, dim: int, num_heads: int, cfg: TTTConfig, device=None, dtype=None):
        super().__init__()
        if cfg.legacy is None:
            raise ValueError("LegacyTTTBlock needs a TTTConfig with legacy=LegacyConfig(...)")
        if dim % num_heads != 0:
            raise ValueError(f"model dim {dim} is not divisible by the {num_heads} TTT heads")
        self.cfg = cfg
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        H, D = num_heads, self.head_dim
        factory = {"device": device, "dtype": dtype}
        f32 = {"device": device, "dtype": torch.promote_types(dtype or torch.float32, torch.float32)}
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=True, **factory) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=True, **factory)  # loaded, never applied (as in the fork)
        self.post_norm = nn.LayerNorm(dim, eps=1e-6, **factory)  # loaded, never applied (as in the fork)
        self.gating_alpha = nn.Parameter(torch.full((dim,), cfg.gating_alpha_init, **factory))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, D, **f32))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, D, **f32))
        self.learnable_ttt_lr_weight = nn.Parameter(torch.randn(H, 1, dim, **f32) * cfg.init_std)
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(H, 1, **f32))
        hidden = list(cfg.legacy.mlp_hidden_dims or [4 * D] * (cfg.legacy.mlp_layers - 1))
        widths = [D, *hidden, D]
        self.weights = Float32ParameterList(
            nn.Parameter(torch.randn(H, d_in, d_out, **f32) * cfg.init_std)
            for d_in, d_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.biases = Float32ParameterList(nn.Parameter(torch.zeros(H, 1, d_out, **f32)) for d_out in widths[1:])

    def _apply(self, fn, recurse=True):
        return apply_keeping_float32(self, super()._apply, fn, recurse, FLOAT32_PARAMS)

    def base_weights(self, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """W0 of every layer expanded to [B, H, ...] (views: gradients flow to the parameters)."""
        expand = [p.expand(batch_size, *p.shape) for p in self.weights]
        return expand, [p.expand(batch_size, *p.shape) for p in self.biases]

    def _init_streaming_state(self, batch_size: int) -> LegacyTTTState:
        H, D, b = self.num_heads, self.head_dim, self.cfg.mini_batch_size
        f32 = {"device": self.ttt_norm_weight.device, "dtype": self.ttt_norm_weight.dtype}
        with torch.no_grad():
            base_w, base_b = self.base_weights(batch_size)
        return LegacyTTTState(
            batch_size,
            f32["device"],
            weights=[w.detach().clone() for w in base_w],
            biases=[w.detach().clone() for w in base_b],
            keys=torch.zeros(batch_size, H, b, D, **f32),
            targets=torch.zeros(batch_size, H, b, D, **f32),
            lrs=torch.zeros(batch_size, H, b, **f32),
            position=torch.zeros(batch_size, dtype=torch.long, device=f32["device"]),
            offset=torch.zeros(batch_size, dtype=torch.long, device=f32["device"]),
            base=([p.detach() for p in self.weights], [p.detach() for p in self.biases]),
            session=SessionOptions(b, self.cfg.persistent_states),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] residual stream after self-attention; returns the same shape and dtype."""
        state = streaming_state(self)
        if state is not None and not state.persistent:
            state.reset(state.exec_mask.clone())  # rows frozen by exec_mask keep their state
        if state is None:
            return self._read_part(None, x)
        # A reset period (session.reset_every, a multiple of b) cuts the call at whole mini-batches where rows reach it.
        return torch.cat([self._read_part(state, p) for p in x.split(reset_segments(state, x.shape[1]), dim=1)], 1)

    def _read_part(self, state: LegacyTTTState | None, x: torch.Tensor) -> torch.Tensor:
        """One part of a call: x [B, T, dim] -> x + gate * TTT(x)."""
        B, T, _ = x.shape
        if state is not None:
            periodic_reset(state)
        b = self.cfg.mini_batch_size if state is None else state.mini_batch_size
        dtype = torch.promote_types(x.dtype, torch.float32)
        # The fork's zero padding (hybrid_layer.py _apply_ttt_processing_impl): b - 1 zero hidden states after the
        # call's tokens cover any partial last mini-batch; only non-causal reading can see them.
        n_pad = b - 1 if (not self.cfg.legacy.causal and T > 0) else 0
        h = torch.cat([x, x.new_zeros(B, n_pad, x.shape[-1])], dim=1)  # [B, T + n_pad, dim]
        xq, xk, xv = (
            rearrange(p(h), "b t (h d) -> b h t d", h=self.num_heads).to(dtype) for p in (self.wq, self.wk, self.wv)
        )
        xq, xk = l2_normalize(xq), l2_normalize(xk)
        if self.cfg.legacy.use_rope:
            start = torch.zeros(B, dtype=torch.long, device=x.device) if state is None else state.position
            positions = (start[:, None] + torch.arange(T + n_pad, device=x.device)) % b  # [B, T + n_pad]
            xq = rope_modulo(xq, positions, self.cfg.legacy.rope_theta)
            xk = rope_modulo(xk, positions, self.cfg.legacy.rope_theta)
        ln_w, ln_b = self.ttt_norm_weight, self.ttt_norm_bias
        target = reconstruction_target(xk, xv, ln_w.to(dtype), ln_b.to(dtype), self.cfg.target)
        lr = legacy_lr(
            h.to(dtype),
            self.learnable_ttt_lr_weight.to(dtype),
            self.learnable_ttt_lr_bias.to(dtype),
            self.cfg.base_lr,
            b,
        )
        pad = LegacyPad(xk[:, :, T:], target[:, :, T:], lr[:, :, T:]) if n_pad else None
        xq, xk, target, lr = xq[:, :, :T], xk[:, :, :T], target[:, :, :T], lr[:, :, :T]
        if state is None:
            weights, biases = self.base_weights(B)
            empty = xk[:, :, :0]
            start_state = LegacyInner(tuple(weights), tuple(biases), empty, empty, lr[:, :, :0])
            out, _ = legacy_ttt_chunk(start_state, xq, xk, target, lr, ln_w, ln_b, b, self.cfg.legacy.causal, pad)
        else:
            out = self._forward_streaming(state, xq, xk, target, lr, pad)
        y = rearrange(out, "b h t d -> b t (h d)").to(x.dtype)  # [B, T, dim]; no wo, no post_norm (the fork)
        gate = torch.tanh(self.gating_alpha.clamp(-GATE_CLAMP, GATE_CLAMP)).to(y.dtype)
        return x + gate * y

    def _forward_streaming(self, state: LegacyTTTState, xq, xk, target, lr, pad: LegacyPad | None) -> torch.Tensor:
        """Rows at the same position of their mini-batch run together; the state keeps each partial mini-batch."""
        T = xq.shape[2]
        out = xq.new_empty(xq.shape)
        keep = state.exec_mask
        groups: dict[int, list[int]] = {}
        for row, p in enumerate(state.position.tolist()):
            groups.setdefault(p, []).append(row)
        for p, rows in groups.items():
            idx = torch.tensor(rows, device=xq.device)
            start = LegacyInner(
                tuple(w[idx] for w in state.weights),
                tuple(w[idx] for w in state.biases),
                state.keys[idx, :, :p],
                state.targets[idx, :, :p],
                state.lrs[idx, :, :p],
            )
            o, end = legacy_ttt_chunk(
                start,
                xq[idx],
                xk[idx],
                target[idx],
                lr[idx],
                self.ttt_norm_weight,
                self.ttt_norm_bias,
                state.mini_batch_size,
                self.cfg.legacy.causal,
                None if pad is None else LegacyPad(*(t[idx] for t in pad)),
            )
            out[idx] = o.to(out.dtype)
            run = idx[keep[idx]]  # rows whose exec_mask is set
            sel = keep[idx]
            with torch.no_grad():
                for dst, src in zip(state.weights + state.biases, end.weights + end.biases, strict=True):
                    dst[run] = src[sel].to(dst.dtype)
                n = end.keys.shape[2]
                state.keys[run, :, :n] = end.keys[sel].to(state.keys.dtype)
                state.targets[run, :, :n] = end.targets[sel].to(state.targets.dtype)
                state.lrs[run, :, :n] = end.lrs[sel].to(state.lrs.dtype)
                state.position[run] = n
        state.offset.add_(torch.where(keep, T, 0))
        logger.debug("legacy TTT chunk of %d tokens ran in %d position groups", T, len(groups))
        return out

    def extra_repr(self) -> str:
        return (
            f"LEGACY heads={self.num_heads}, head_dim={self.head_dim}, mlp_layers={len(self.weights)}, "
            f"mini_batch_size={self.cfg.mini_batch_size}, causal={self.cfg.legacy.causal}, "
            f"rope={self.cfg.legacy.use_rope}"
        )


def set_legacy_contexts(model: tp.Any, ttt_layers: list[int], cfg: TTTConfig) -> None:
    """Sets the self-attention window of the TTT layers and of the others (the fork's per-layer contexts)."""
    for i, layer in enumerate(model.transformer.layers):
        context = cfg.legacy.ttt_layer_context if i in ttt_layers else cfg.legacy.non_ttt_layer_context
        if context is not None:
            if context < 1:
                raise ValueError(f"attention context must be >= 1 token, got {context} for layer {i}")
            set_attention_context(layer.self_attn, context)


@contextlib.contextmanager
def causal_reading(model: tp.Any) -> tp.Iterator[int]:
    """Inside the block, the model's non-causal legacy TTT layers read causally (`LegacyConfig.causal=True`: each
    token sees only itself and the earlier tokens of its mini-batch), with the same weights; restored on exit.

    Yields the number of layers switched (0: nothing was non-causal). Not thread-safe: hold the model's lock.
    """
    switched = []
    for module in model.modules():
        if isinstance(module, LegacyTTTBlock) and not module.cfg.legacy.causal:
            switched.append((module, module.cfg))
            module.cfg = dataclasses.replace(module.cfg, legacy=dataclasses.replace(module.cfg.legacy, causal=True))
    try:
        yield len(switched)
    finally:
        for module, cfg in switched:
            module.cfg = cfg
