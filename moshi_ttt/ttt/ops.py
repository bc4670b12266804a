"""Pure TTT-MLP math (Sun et al. 2024, arXiv 2407.04620, section 2 and appendix A; ttt-lm-pytorch).

Notation: B batch, H heads, T tokens, D head dim, F = 4D hidden size of the inner MLP, b mini-batch size,
n tokens of one segment (a piece of one mini-batch).

Per head, the fast weights W = (W1 [D,F], b1 [1,F], W2 [F,D], b2 [1,D]) define f(x) = gelu_tanh(x W1 + b1) W2 + b2.
The reconstruction loss of token s is l_s(W) = 1/2 |LN(f(k_s)) - target_s|^2 with target_s = LN(v_s - k_s).
Inside a mini-batch every gradient is taken at W0, the weights at its start; token i (1-based) reads with
W_i = W0 - tau_i * sum_{s<=i} lr_s grad l_s(W0) and outputs q_i + LN(f_{W_i}(q_i)). A full mini-batch of b tokens
ends with W0 <- W_b, or with a decay lambda > 0 (TTTConfig.decay) W0 <- W_base + (1 - lambda) (W_b - W_base).

TTT-Linear (the paper's other variant, ttt-lm-pytorch's TTTLinear) is the same loop with f(x) = x W1 + b1,
W1 [D, D], b1 [1, D] (`LinearWeights`); every function here takes either kind of weights.

Two ways compute the same numbers:
- dual form (`_segment`): matrices over the n tokens of a segment, no per-token loop;
- primal form (`ttt_mlp_token`, primal.py): a running gradient sum S, one token per row, every row at its own position.
Nothing here holds state or does I/O; everything is differentiable (training backpropagates through it). The inner
loop runs in float32 (float64 for float64 inputs) also inside a `torch.autocast` region: autocast would round its
matmuls to bfloat16 and mix dtypes inside the fused LayerNorm backward (`float32_inner`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

# Re-exported: the names callers know from this module (ARCHITECTURE.md's contract is `moshi_ttt.ttt.ops.ttt_mlp`).
from moshi_ttt.ttt.inner_math import (  # noqa: F401
    FORK_TARGET_EPS,
    LN_EPS,
    UpdateHook,
    _ln_l2_grad,
    float32_inner,
    gelu_tanh,
    gelu_tanh_backward,
    head_layer_norm,
    inner_forward,
    ln_l2_grad,
    position_factors,
    reconstruction_target,
    weight_drift,
)
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.primal import ttt_mlp_token  # noqa: F401
from moshi_ttt.ttt.state import FastWeightState
from moshi_ttt.ttt.weights import INNER_WEIGHTS, AnyWeights, FastWeights, LinearWeights  # noqa: F401

logger = logging.getLogger(__name__)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """[..., n, C] -> [..., n, C + 1] with a column of ones, so that x_aug @ [W; b] = x @ W + b."""
    return F.pad(x, (0, 1), value=1.0)


def _coefficients(
    tau: torch.Tensor, lr: torch.Tensor, xq_aug: torch.Tensor, xk_aug: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of the dual form that do not depend on the weights, for one or many segments at once.

    Args:
        tau: [n] position factors; lr: [..., n]; xq_aug, xk_aug: [..., n, D + 1].
    Returns:
        eta [..., n, n] with eta[i, s] = tau_i lr_s for s <= i (token i sees the gradients of tokens 1..i only),
        and eta * (q_i . k_s + 1), the matrix that carries W1 and b1 from the keys to the queries.
    """
    eta = torch.tril(tau[:, None] * lr[..., None, :])  # [n, 1] * [..., 1, n] -> [..., n, n]
    return eta, eta * (xq_aug @ xk_aug.transpose(-1, -2))  # [..., n, D+1] @ [..., D+1, n] -> [..., n, n]


def _segment(
    w1: torch.Tensor,
    w2: torch.Tensor,
    sums: tuple[torch.Tensor, torch.Tensor] | None,
    tau_col: torch.Tensor,
    eta: torch.Tensor,
    eta_qk: torch.Tensor,
    xq_aug: torch.Tensor,
    xk_aug: torch.Tensor,
    shift: torch.Tensor,
    lr_col: torch.Tensor,
    ln_w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dual form over n tokens of one mini-batch, every gradient at W0 = (w1, w2).

    Batch and heads are flattened (N = B * H) so that every product is one `bmm`: this loop runs once per
    mini-batch and its cost on small models is the number of ops. Weights are kept augmented with their bias as a
    last row: w1 = [W1; b1] [N, D+1, F], w2 = [W2; b2] [N, F+1, D]; inputs carry a ones column (`_augment`).

    Args:
        sums: augmented gradient sums of the earlier tokens of this mini-batch, or None if the segment starts it.
        tau_col: [n, 1] position factors; eta, eta_qk: [N, n, n] from `_coefficients`.
        xq_aug, xk_aug: [N, n, D+1]; shift: [N, n, D] = beta - target; lr_col: [N, n, 1];
        ln_w: [N, 1, D] gamma of the per-head LayerNorm.
    Returns:
        f_{W_i}(q_i) [N, n, D] (before the output LayerNorm, applied once per call by the caller) and the
        segment's own sums of lr_s grad l_s(W0) for w1 and w2.
    """
    # Inner forward and hand-written backward at W0 on the keys.
    z1 = torch.bmm(xk_aug, w1)  # [N, n, D+1] @ [N, D+1, F] -> [N, n, F]
    act_aug = _augment(gelu_tanh(z1))  # [N, n, F+1]
    z2 = torch.bmm(act_aug, w2)  # [N, n, F+1] @ [N, F+1, D] -> [N, n, D]
    g2 = _ln_l2_grad(z2, ln_w, shift)  # [N, n, D]: dL/dz2 of 1/2 |LN(z2) - target|^2
    g1 = gelu_tanh_backward(torch.bmm(g2, w2[:, :-1].transpose(1, 2)), z1)  # [N, n, D] @ [N, D, F] -> [N, n, F]

    # Token i reads with W_i = W0 - tau_i (S + sum_{s<=i} lr_s grad l_s(W0)), in matrix form.
    z1q = torch.baddbmm(torch.bmm(xq_aug, w1), eta_qk, g1, alpha=-1.0)  # [N, n, F]
    if sums is not None:
        z1q = z1q - tau_col * torch.bmm(xq_aug, sums[0])
    act_q_aug = _augment(gelu_tanh(z1q))  # [N, n, F+1]
    eta_aa = eta * torch.bmm(act_q_aug, act_aug.transpose(1, 2))  # [N, n, n]
    z2q = torch.baddbmm(torch.bmm(act_q_aug, w2), eta_aa, g2, alpha=-1.0)  # [N, n, D]
    if sums is not None:
        z2q = z2q - tau_col * torch.bmm(act_q_aug, sums[1])

    seg1 = torch.bmm(xk_aug.transpose(1, 2), lr_col * g1)  # [N, D+1, n] @ [N, n, F] -> [N, D+1, F]
    seg2 = torch.bmm(act_aug.transpose(1, 2), lr_col * g2)  # [N, F+1, n] @ [N, n, D] -> [N, F+1, D]
    return z2q, seg1, seg2


def _segment_linear(
    w1: torch.Tensor,
    sums: tuple[torch.Tensor] | None,
    tau_col: torch.Tensor,
    eta: torch.Tensor,
    eta_qk: torch.Tensor,
    xq_aug: torch.Tensor,
    xk_aug: torch.Tensor,
    shift: torch.Tensor,
    lr_col: torch.Tensor,
    ln_w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_segment` for TTT-Linear, f(x) = x W1 + b1: w1 = [W1; b1] [N, D+1, D]; `eta` is unused (kept for one
    signature). Returns f_{W_i}(q_i) [N, n, D] and the segment's sum of lr_s grad l_s(W0) [N, D+1, D]."""
    z = torch.bmm(xk_aug, w1)  # [N, n, D+1] @ [N, D+1, D] -> [N, n, D]
    g = _ln_l2_grad(z, ln_w, shift)  # [N, n, D]
    # Token i reads with W_i = W0 - tau_i (S + sum_{s<=i} lr_s grad l_s(W0)); grad l_s = k_s^T g_s.
    zq = torch.baddbmm(torch.bmm(xq_aug, w1), eta_qk, g, alpha=-1.0)  # [N, n, D]
    if sums is not None:
        zq = zq - tau_col * torch.bmm(xq_aug, sums[0])
    seg = torch.bmm(xk_aug.transpose(1, 2), lr_col * g)  # [N, D+1, n] @ [N, n, D] -> [N, D+1, D]
    return zq, seg


def _join(w: AnyWeights) -> tuple[torch.Tensor, ...]:
    """Weights [B, H, ...] -> augmented matrices with N = B * H: [N, D+1, F] and [N, F+1, D] (MLP) or
    [N, D+1, D] (linear)."""
    pairs = [(w.W1, w.b1)] if isinstance(w, LinearWeights) else [(w.W1, w.b1), (w.W2, w.b2)]
    return tuple(torch.cat(pair, dim=-2).flatten(0, 1) for pair in pairs)  # [B, H, in+1, out] -> [N, in+1, out]


def _split(ws: tuple[torch.Tensor, ...], batch: int) -> AnyWeights:
    parts = []
    for w in ws:
        w = w.unflatten(0, (batch, -1))
        parts += [w[..., :-1, :], w[..., -1:, :]]
    return LinearWeights(*parts) if len(ws) == 1 else FastWeights(*parts)


def _check_inputs(weights: AnyWeights, inputs: InnerInputs, params: InnerParams) -> None:
    kinds = (FastWeights, LinearWeights)  # a plain tuple does not say which inner model
    if not isinstance(weights, kinds) or not all(isinstance(w, torch.Tensor) for w in weights):
        raise ValueError(
            f"weights must be FastWeights(W1, b1, W2, b2) or LinearWeights(W1, b1), got {type(weights).__name__}"
        )
    for name, x in zip(InnerInputs._fields, inputs, strict=True):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    xq, xk, xv, lr = inputs
    if xq.dim() != 4 or xq.shape != xk.shape or xq.shape != xv.shape:
        raise ValueError(f"xq, xk, xv must share a shape [B, H, T, D]; got {xq.shape}, {xk.shape}, {xv.shape}")
    B, H, T, D = xq.shape
    if lr.shape != (B, H, T):
        raise ValueError(f"lr must be [B, H, T] = {[B, H, T]}, got {list(lr.shape)}")
    if params.ln_weight.shape != (H, D) or params.ln_bias.shape != (H, D):
        raise ValueError(
            f"ln_weight/ln_bias must be [H, D] = {[H, D]}, got {params.ln_weight.shape}, {params.ln_bias.shape}"
        )
    if isinstance(weights, LinearWeights):
        expected, names = ((B, H, D, D), (B, H, 1, D)), "W1, b1"
    else:
        expected, names = ((B, H, D, 4 * D), (B, H, 1, 4 * D), (B, H, 4 * D, D), (B, H, 1, D)), "W1, b1, W2, b2"
    got = tuple(tuple(w.shape) for w in weights)
    if got != expected:
        raise ValueError(f"fast weights must have shapes {expected} ({names}), got {got}")
    if params.w_base is not None:
        base = tuple(tuple(w.shape) for w in params.w_base)
        if type(params.w_base) is not type(weights) or any(
            g not in (e, e[1:]) for g, e in zip(base, expected, strict=True)
        ):
            raise ValueError(f"w_base must be {type(weights).__name__} of shapes [H, ...] or {expected}, got {base}")


def ttt_mlp_chunk(
    state: FastWeightState, inputs: InnerInputs, params: InnerParams, on_update: UpdateHook | None = None
) -> tuple[torch.Tensor, FastWeightState]:
    """Runs the inner loop over T tokens from `state`, whose rows may sit anywhere inside their mini-batches:
    TTT-MLP for FastWeights, TTT-Linear for LinearWeights.

    Continuing a partial mini-batch, whole mini-batches and a trailing partial one all go through the dual form
    (`_dual_form`), so any chunking of a sequence gives the same numbers as one call over all of it. The rows that
    sit at the same position of their mini-batch run together (one host sync reads the positions).

    Args:
        state: where each row stands; its `history` is passed through unchanged (the caller owns the share_qk
            convolutions).
        inputs: xq, xk, xv [B, H, T, D]; lr [B, H, T] (lr_s before tau).
        params: the layer's LayerNorm, mini-batch size b, token_idx offsets and target mode.
        on_update: called as on_update(w_start, w_end) at every completed mini-batch (telemetry; every row must
            then sit at the same position).
    Returns:
        out [B, H, T, D] in the compute dtype (float32, or float64 for float64 inputs) and the next state (offset
        advanced by T).
    """
    _check_inputs(state.weights, inputs, params)
    B, _, T, _ = inputs.xq.shape
    groups: dict[int, list[int]] = {}
    for row, p in enumerate(state.position.tolist()):
        if not 0 <= p < params.mini_batch_size:
            raise ValueError(f"state position must be in [0, {params.mini_batch_size}), got {p} in row {row}")
        groups.setdefault(p, []).append(row)
    if len(groups) > 1 and on_update is not None:
        raise ValueError("update observers need every batch row at the same inner-loop position")
    offset = state.offset + T
    if len(groups) == 1:
        (p,) = groups
        out, weights, sums, p_end = _dual_form(
            state.weights, state.grad_sums if p > 0 else None, p, inputs, params, on_update
        )
        sums = weights.zeros_like() if sums is None else sums
        return out, FastWeightState(weights, sums, torch.full_like(state.position, p_end), offset, state.history)
    dtype = torch.promote_types(inputs.xq.dtype, torch.float32)
    out = inputs.xq.new_empty(inputs.xq.shape, dtype=dtype)  # [B, H, T, D]
    weights = type(state.weights)(*(w.clone() for w in state.weights))
    sums = type(state.grad_sums)(*(s.clone() for s in state.grad_sums))
    position = state.position.clone()
    for p, rows in groups.items():
        idx = torch.tensor(rows, device=position.device)
        grad_sums = state.grad_sums.rows(idx) if p > 0 else None
        o, w_end, s_end, p_end = _dual_form(state.weights.rows(idx), grad_sums, p, inputs.rows(idx), params)
        out[idx] = o
        for dst, src in zip(weights, w_end, strict=True):
            dst[idx] = src
        for dst, src in zip(sums, w_end.zeros_like() if s_end is None else s_end, strict=True):
            dst[idx] = src
        position[idx] = p_end
    logger.debug("TTT chunk of %d rows ran in %d position groups", B, len(groups))
    return out, FastWeightState(weights, sums, position, offset, state.history)


@float32_inner
def _dual_form(
    w0: AnyWeights,
    grad_sums: AnyWeights | None,
    position: int,
    inputs: InnerInputs,
    params: InnerParams,
    on_update: UpdateHook | None = None,
) -> tuple[torch.Tensor, AnyWeights, AnyWeights | None, int]:
    """The dual form over T tokens, every row at the same `position` of its mini-batch.

    Args:
        w0: the weights at the start of the current mini-batch; grad_sums: the gradient sums of its tokens so far,
            None exactly when `position` is 0.
    Returns:
        out [B, H, T, D] in the compute dtype, then the end's W0, gradient sums (None at a mini-batch start) and
        position.
    """
    b = params.mini_batch_size
    dtype = torch.promote_types(inputs.xq.dtype, torch.float32)
    (xq, xk, xv, lr), params = inputs.to(dtype), params.to(dtype)
    ln_weight, ln_bias = params.ln_weight, params.ln_bias
    B, H, T, D = xq.shape

    def tau(start: int, n: int) -> torch.Tensor:  # [n] factors of positions start .. start + n - 1: O(T), not O(b)
        positions = torch.arange(start, start + n, device=xq.device)
        return position_factors(params.token_idx, b, dtype, xq.device, positions)

    target_all = reconstruction_target(xk, xv, ln_weight, ln_bias, params.target)  # [B, H, T, D]
    # Flatten batch and heads: N = B * H.
    shift_all = (ln_bias[None, :, None, :] - target_all).flatten(0, 1)  # [N, T, D]
    ln_w = ln_weight[None, :, None, :].expand(B, H, 1, D).flatten(0, 1)  # [N, 1, D]
    xq_aug, xk_aug = _augment(xq).flatten(0, 1), _augment(xk).flatten(0, 1)  # [N, T, D+1]
    lr_flat = lr.flatten(0, 1)  # [N, T]
    lr_col_all = lr_flat[..., None]  # [N, T, 1]
    ws = _join(w0.to(dtype))
    sums = None if grad_sums is None else _join(grad_sums.to(dtype))
    segment = _segment_linear if isinstance(w0, LinearWeights) else _segment

    # Segments: the rest of the current mini-batch, whole mini-batches, a trailing partial one.
    first = min((b - position) % b, T)
    n_full = (T - first) // b
    bounds = [(0, first)] if first else []
    bounds += [(first + j * b, b) for j in range(n_full)]
    if first + n_full * b < T:
        bounds.append((first + n_full * b, T - first - n_full * b))
    # The weight-independent coefficients of all whole mini-batches, computed at once.
    if n_full:
        full = slice(first, first + n_full * b)
        tau_full = tau(0, b)  # [b]: T >= b here
        eta_full, eta_qk_full = _coefficients(
            tau_full,
            lr_flat[:, full].unflatten(1, (n_full, b)),  # [N, n_full, b]
            xq_aug[:, full].unflatten(1, (n_full, b)),  # [N, n_full, b, D+1]
            xk_aug[:, full].unflatten(1, (n_full, b)),
        )
        eta_full, eta_qk_full = eta_full.unbind(1), eta_qk_full.unbind(1)  # n_full x [N, b, b]
    outs = []
    for start, n in bounds:
        seg = slice(start, start + n)
        if n == b:
            j = (start - first) // b
            tau_seg, eta, eta_qk = tau_full, eta_full[j], eta_qk_full[j]
        else:
            tau_seg = tau(position, n)  # [n]
            eta, eta_qk = _coefficients(tau_seg, lr_flat[:, seg], xq_aug[:, seg], xk_aug[:, seg])
        f_q, *segs = segment(
            *ws, sums, tau_seg[:, None], eta, eta_qk,
            xq_aug[:, seg], xk_aug[:, seg], shift_all[:, seg], lr_col_all[:, seg], ln_w,
        )  # fmt: skip
        outs.append(f_q)
        sums = tuple(segs) if sums is None else tuple(a + c for a, c in zip(sums, segs, strict=True))
        position += n
        if position == b:  # tau_seg ends at tau_b
            new_ws = tuple(w - tau_seg[-1] * s for w, s in zip(ws, sums, strict=True))
            if params.decay > 0:  # toward W_base (TTTConfig.decay); W_base [H, ...] broadcasts over rows
                new_ws = _join(params.decayed(_split(new_ws, B)))
            if on_update is not None:
                on_update(_split(ws, B), _split(new_ws, B))
            ws, sums, position = new_ws, None, 0
    end = (_split(ws, B), None if sums is None else _split(sums, B), position)
    if not outs:
        return xq.new_zeros(xq.shape), *end
    f_q = torch.cat(outs, dim=1).unflatten(0, (B, H))  # [B, H, T, D]
    return xq + head_layer_norm(f_q, ln_weight, ln_bias), *end


def ttt_mlp(
    weights: FastWeights,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mini_batch_size: int,
    token_idx: torch.Tensor | None = None,
    target: str = "difference",
    decay: float = 0.0,
    w_base: FastWeights | None = None,
) -> tuple[torch.Tensor, FastWeights]:
    """TTT-MLP over a whole sequence starting at a mini-batch boundary (the docs/ARCHITECTURE.md contract).

    Args:
        weights: FastWeights(W1 [B,H,D,4D], b1 [B,H,1,4D], W2 [B,H,4D,D], b2 [B,H,1,D]).
        xq, xk, xv: [B, H, T, D]; T need not be a multiple of b.
        lr: [B, H, T], the per-token rates before the position factor tau.
        ln_weight, ln_bias: [H, D] of the per-head LayerNorm.
        mini_batch_size: b, a whole number >= 1 (bool refused); the call's cost does not grow with b beyond T.
        token_idx: [b] learnable offsets of tau, or None (zeros); any other 1-D length is padded with zeros or cut.
        target: "difference" or "legacy".
        decay: lambda of the decay toward `w_base` after every full mini-batch (TTTConfig.decay); 0: none.
        w_base: the weights decayed toward, [H, ...] or [B, H, ...] like `weights`; needed when decay > 0.
    Returns:
        (out [B, H, T, D], weights after the last full mini-batch). The trailing partial mini-batch gives causal
        outputs and does not update the weights.
    Raises:
        ValueError: naming the argument, for a wrong type (a plain tuple for `weights`, a bool or float
            `mini_batch_size`), shape or value.
    """
    inputs = InnerInputs(xq, xk, xv, lr)
    params = InnerParams(ln_weight, ln_bias, mini_batch_size, token_idx, target, decay, w_base)
    _check_inputs(weights, inputs, params)
    out, new_weights, _, _ = _dual_form(weights, None, 0, inputs, params)
    return out, new_weights


def ttt_linear(
    weights: LinearWeights,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mini_batch_size: int,
    token_idx: torch.Tensor | None = None,
    target: str = "difference",
    decay: float = 0.0,
    w_base: LinearWeights | None = None,
) -> tuple[torch.Tensor, LinearWeights]:
    """TTT-Linear over a whole sequence starting at a mini-batch boundary: `ttt_mlp` with f(x) = x W1 + b1.

    Args:
        weights: LinearWeights(W1 [B, H, D, D], b1 [B, H, 1, D]); the rest as `ttt_mlp`.
    Returns:
        (out [B, H, T, D], weights after the last full mini-batch).
    """
    if not isinstance(weights, LinearWeights):
        raise ValueError(f"ttt_linear needs LinearWeights(W1, b1), got {type(weights).__name__}")
    return ttt_mlp(weights, xq, xk, xv, lr, ln_weight, ln_bias, mini_batch_size, token_idx, target, decay, w_base)
