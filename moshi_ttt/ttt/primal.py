"""Primal form of the TTT inner loop: one token per row, every row at its own position of its mini-batch.

Notation: B batch rows, H heads, D head dim, F = 4D, b mini-batch size. The math is ops.py's; the dual form there
gives the same numbers for a chunk of tokens.
"""

from __future__ import annotations

import torch

from moshi_ttt.ttt.inner_math import (
    float32_inner,
    gelu_tanh,
    gelu_tanh_backward,
    head_layer_norm,
    ln_l2_grad,
    position_factors,
    reconstruction_target,
)
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.state import FastWeightState
from moshi_ttt.ttt.weights import FastWeights, LinearWeights


@float32_inner
def ttt_mlp_token(
    state: FastWeightState, inputs: InnerInputs, params: InnerParams
) -> tuple[torch.Tensor, FastWeightState]:
    """Primal form for one token per row, each row at its own position in its mini-batch (TTT-MLP or TTT-Linear by
    the weights' type).

    No data-dependent Python branch (rows finish their mini-batches through `torch.where`), so this step can be
    captured in a CUDA graph, as moshi's LMGen does on GPU.

    Args:
        state: W0, the running gradient sums (zeros at a mini-batch start) and the position of each row; its
            `history` is passed through unchanged.
        inputs: xq, xk, xv [B, H, 1, D]; lr [B, H, 1].
    Returns:
        out [B, H, 1, D] (float32, float64 for float64 inputs) and the next state (offset advanced by 1).
    """
    dtype = torch.promote_types(inputs.xq.dtype, torch.float32)
    (xq, xk, xv, lr), params = inputs.to(dtype), params.to(dtype)
    weights, grad_sums, position = state.weights.to(dtype), state.grad_sums.to(dtype), state.position
    ln_weight, ln_bias = params.ln_weight, params.ln_bias
    B = xq.shape[0]
    # [B] -> [B, 1, 1, 1]: each row's own factor only (a gather, branch-free), whatever b.
    tau = position_factors(params.token_idx, params.mini_batch_size, dtype, xq.device, position).view(B, 1, 1, 1)
    target_k = reconstruction_target(xk, xv, ln_weight, ln_bias, params.target)  # [B, H, 1, D]

    if isinstance(weights, LinearWeights):
        z = xk @ weights.W1 + weights.b1  # [B, H, 1, D] @ [B, H, D, D] -> [B, H, 1, D]
        lr_g = lr[..., None] * ln_l2_grad(z, target_k, ln_weight, ln_bias)  # [B, H, 1, D]
        sums = grad_sums.plus(LinearWeights(xk.transpose(-1, -2) @ lr_g, lr_g))  # [B, H, D, 1] @ [B, H, 1, D]
        w_i = weights.minus_scaled(tau, sums)
        out = xq + head_layer_norm(xq @ w_i.W1 + w_i.b1, ln_weight, ln_bias)
    else:
        z1 = xk @ weights.W1 + weights.b1  # [B, H, 1, D] @ [B, H, D, F] -> [B, H, 1, F]
        act = gelu_tanh(z1)
        z2 = act @ weights.W2 + weights.b2  # [B, H, 1, F] @ [B, H, F, D] -> [B, H, 1, D]
        g2 = ln_l2_grad(z2, target_k, ln_weight, ln_bias)
        g1 = gelu_tanh_backward(g2 @ weights.W2.transpose(-1, -2), z1)  # [B, H, 1, F]
        lr_g1 = lr[..., None] * g1
        lr_g2 = lr[..., None] * g2
        sums = grad_sums.plus(
            FastWeights(
                xk.transpose(-1, -2) @ lr_g1,  # [B, H, D, 1] @ [B, H, 1, F] -> [B, H, D, F]
                lr_g1,
                act.transpose(-1, -2) @ lr_g2,  # [B, H, F, 1] @ [B, H, 1, D] -> [B, H, F, D]
                lr_g2,
            )
        )
        w_i = weights.minus_scaled(tau, sums)
        act_q = gelu_tanh(xq @ w_i.W1 + w_i.b1)  # [B, H, 1, F]
        out = xq + head_layer_norm(act_q @ w_i.W2 + w_i.b2, ln_weight, ln_bias)

    done = position + 1 == params.mini_batch_size  # [B]: the row completes its mini-batch with this token
    # tau_i = tau_b on those rows, so W_i is the updated W0 (then the decay toward W_base, TTTConfig.decay).
    new_weights = params.decayed(w_i).where(done, weights)
    new_sums = sums.zeros_like().where(done, sums)
    new_position = torch.where(done, torch.zeros_like(position), position + 1)
    return out, FastWeightState(new_weights, new_sums, new_position, state.offset + 1, state.history)
