"""The pieces of the TTT inner loop that both of its forms use (ops.py's dual form, primal.py's one-token form).

Notation: B batch, H heads, n tokens, D head dim, b mini-batch size. See ops.py for the math.
"""

from __future__ import annotations

import functools
import typing as tp

import torch
import torch.nn.functional as F

from moshi_ttt.ttt.weights import AnyWeights, FastWeights, LinearWeights

LN_EPS = 1e-6  # per-head LayerNorm epsilon, as in ttt-lm-pytorch
FORK_TARGET_EPS = 1e-5  # added to the std in the older fork's reconstruction target (`reconstruction_target`)


UpdateHook = tp.Callable[[FastWeights, FastWeights], None]


_F = tp.TypeVar("_F", bound=tp.Callable[..., tp.Any])


def float32_inner(fn: _F) -> _F:
    """Runs `fn` with autocast off on every device type, so that mixed-precision training (moshi-finetune runs
    under CUDA or CPU autocast) keeps the fast weights and their updates in float32; the functions cast their
    inputs to float32 themselves."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return tp.cast(_F, wrapper)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad * gelu_tanh'(x), one fused (and differentiable) ATen op."""
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


def head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over D per head. x: [B, H, n, D]; weight, bias: [H, D]."""
    x_hat = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
    return weight[None, :, None, :] * x_hat + bias[None, :, None, :]


@float32_inner
def ln_l2_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. z of 1/2 |LN(z) - target|^2 (ttt-lm-pytorch's ln_fused_l2_bwd). z, target: [B, H, n, D];
    weight, bias: [H, D]."""
    return _ln_l2_grad(z, weight[None, :, None, :], bias[None, :, None, :] - target)


def _ln_l2_grad(z: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`ln_l2_grad` with gamma broadcast to z and shift = beta - target precomputed (the inner loop's form).

    Uses ATen's fused layer-norm kernels (few ops in the sequential inner loop); both are differentiable, so the
    outer loop still backpropagates through this gradient exactly (checked by gradcheck in the tests).
    """
    d = z.shape[-1]
    z_hat, mean, rstd = torch.native_layer_norm(z, [d], None, None, LN_EPS)
    grad_y = torch.addcmul(shift, weight, z_hat)  # dL/dLN(z) = gamma * z_hat + beta - target
    grad_z, _, _ = torch.ops.aten.native_layer_norm_backward(
        grad_y * weight, z, [d], mean, rstd, None, None, [True, False, False]
    )
    return grad_z


def reconstruction_target(
    xk: torch.Tensor, xv: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, mode: str = "difference"
) -> torch.Tensor:
    """The value the inner MLP learns to produce from k: LN(v - k).

    "legacy" is the older moshi-finetune TTT fork's target, as its active code computes it: its
    `moshi_ttt/models/ssm/ttt_layer.py` `ln_reconstruction_target` normalises the difference d = v - k with the mean
    and torch's *unbiased* std over D, eps added to the std: gamma * (d - mean) / (std + 1e-5) + beta, then adds k
    back, which its inner loss (`models/ssm/ops/ttt_mlp.py`, `reconstruction_target = XV - XK`) subtracts again; both
    roundings are kept.
    """
    if mode == "difference":
        return head_layer_norm(xv - xk, ln_weight, ln_bias)
    if mode == "legacy":
        diff = xv - xk  # [B, H, T, D]
        mean, std = diff.mean(dim=-1, keepdim=True), diff.std(dim=-1, keepdim=True)  # unbiased std, as the fork
        normed = ln_weight[None, :, None, :] * (diff - mean) / (std + FORK_TARGET_EPS) + ln_bias[None, :, None, :]
        return (normed + xk) - xk
    raise ValueError(f"unknown reconstruction target mode {mode!r}; expected 'difference' or 'legacy'")


def position_factors(
    token_idx: torch.Tensor | None,
    mini_batch_size: int,
    dtype: torch.dtype,
    device,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """tau_i = max(0, 1/i + learnable_token_idx[i]) for the 0-based `positions` i - 1 of a mini-batch.

    A `token_idx` shorter than b counts as padded with zeros, a longer one as truncated: a checkpoint trained with
    one mini-batch size can be evaluated with another.

    Args:
        positions: long tensor of any shape, each entry in [0, b); None: all b positions. A call builds the factors
            of the positions it reads only, so its cost does not grow with b (a mini-batch may be far longer than the
            call).
    Returns:
        tau in the shape of `positions` ([b] for None), in `dtype`.
    """
    if positions is None:
        positions = torch.arange(mini_batch_size, device=device)
    tau = 1.0 / (positions + 1).to(dtype)  # the same numbers as 1 / arange(1, b + 1) at those positions
    if token_idx is not None and token_idx.shape[0] > 0:
        offsets = token_idx.to(dtype)  # [len]
        inside = positions < min(offsets.shape[0], mini_batch_size)
        tau = tau + torch.where(inside, offsets[positions.clamp_max(offsets.shape[0] - 1)], 0.0)
    return tau.clamp_min(0.0)


def inner_forward(weights: AnyWeights, x: torch.Tensor) -> torch.Tensor:
    """f_W(x) of the inner model, before the output LayerNorm. x: [B, H, n, D] -> [B, H, n, D]."""
    if isinstance(weights, LinearWeights):
        return x @ weights.W1 + weights.b1  # [B, H, n, D] @ [B, H, D, D]
    return gelu_tanh(x @ weights.W1 + weights.b1) @ weights.W2 + weights.b2  # via [B, H, n, F]


def weight_drift(weights: FastWeights, base: FastWeights) -> dict[str, torch.Tensor]:
    """||W - W_base||_F / ||W_base||_F per batch row for each weight; the absolute norm where W_base is zero.

    Args:
        weights: FastWeights with [B, H, ...] tensors; base: the same shapes (or broadcastable).
    Returns:
        name -> [B] float32 (float64 for float64 weights).
    """
    result = {}
    for name, w, w0 in zip(weights._fields, weights, base, strict=True):
        w0 = w0.expand_as(w)
        diff = (w - w0).flatten(1).norm(dim=1)  # [B]
        ref = w0.flatten(1).norm(dim=1)  # [B]
        result[name] = torch.where(ref > 0, diff / ref.clamp_min(torch.finfo(ref.dtype).tiny), diff)
    return result
