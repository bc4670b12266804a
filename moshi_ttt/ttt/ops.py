"""Pure TTT-MLP math (Sun et al. 2024, arXiv 2407.04620, section 2 and appendix A; ttt-lm-pytorch).

Notation: B batch, H heads, T tokens, D head dim, F = 4D hidden size of the inner MLP, b mini-batch size,
n tokens of one segment (a piece of one mini-batch).

Per head, the fast weights W = (W1 [D,F], b1 [1,F], W2 [F,D], b2 [1,D]) define f(x) = gelu_tanh(x W1 + b1) W2 + b2.
The reconstruction loss of token s is l_s(W) = 1/2 |LN(f(k_s)) - target_s|^2 with target_s = LN(v_s - k_s).
Inside a mini-batch every gradient is taken at W0, the weights at its start; token i (1-based) reads with
W_i = W0 - tau_i * sum_{s<=i} lr_s grad l_s(W0) and outputs q_i + LN(f_{W_i}(q_i)). A full mini-batch of b tokens
ends with W0 <- W_b.

Two ways compute the same numbers:
- dual form (`_segment`): matrices over the n tokens of a segment, no per-token loop;
- primal form (`ttt_mlp_token`): a running gradient sum S, one token per row, every row at its own position.
Nothing here holds state or does I/O; everything is differentiable (training backpropagates through it).
"""

from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F

LN_EPS = 1e-6  # per-head LayerNorm epsilon, as in ttt-lm-pytorch


class FastWeights(tp.NamedTuple):
    """Fast weights of the inner MLP, one set per batch row and head."""

    W1: torch.Tensor  # [B, H, D, F]
    b1: torch.Tensor  # [B, H, 1, F]
    W2: torch.Tensor  # [B, H, F, D]
    b2: torch.Tensor  # [B, H, 1, D]

    def to(self, dtype: torch.dtype) -> FastWeights:
        return FastWeights(*(w.to(dtype) for w in self))

    def minus_scaled(self, scale: torch.Tensor | float, other: FastWeights) -> FastWeights:
        """self - scale * other; `scale` broadcasts against [B, H, ., .]."""
        return FastWeights(*(w - scale * o for w, o in zip(self, other, strict=True)))

    def plus(self, other: FastWeights) -> FastWeights:
        return FastWeights(*(w + o for w, o in zip(self, other, strict=True)))

    def where(self, mask: torch.Tensor, other: FastWeights) -> FastWeights:
        """Rows where `mask` [B] is True from self, the others from `other`."""
        m = mask.view(-1, 1, 1, 1)
        return FastWeights(*(torch.where(m, w, o) for w, o in zip(self, other, strict=True)))

    def zeros_like(self) -> FastWeights:
        return FastWeights(*(torch.zeros_like(w) for w in self))

    def rows(self, index: torch.Tensor) -> FastWeights:
        return FastWeights(*(w[index] for w in self))


class InnerState(tp.NamedTuple):
    """Where the inner loop stands between two calls (all rows at the same position)."""

    weights: FastWeights  # W0, the weights at the start of the current mini-batch
    grad_sums: FastWeights | None  # sum_s lr_s grad l_s(W0) over the tokens already seen of this mini-batch
    position: int  # tokens already seen of the current mini-batch, 0 <= position < b


UpdateHook = tp.Callable[[FastWeights, FastWeights], None]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of gelu_tanh(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)."""
    c = 0.7978845608028654  # sqrt(2 / pi)
    tanh_u = torch.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * c * (1.0 + 3 * 0.044715 * x**2)


def head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over D per head. x: [B, H, n, D]; weight, bias: [H, D]."""
    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    x_hat = (x - mu) / torch.sqrt(var + LN_EPS)
    return weight[None, :, None, :] * x_hat + bias[None, :, None, :]


def ln_l2_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. z of 1/2 |LN(z) - target|^2 (ttt-lm-pytorch's ln_fused_l2_bwd). All [B, H, n, D]."""
    d = z.shape[-1]
    mu = z.mean(dim=-1, keepdim=True)
    std = torch.sqrt(z.var(dim=-1, keepdim=True, unbiased=False) + LN_EPS)
    z_hat = (z - mu) / std
    w = weight[None, :, None, :]
    grad_y = w * z_hat + bias[None, :, None, :] - target  # dL/dLN(z)
    grad_hat = grad_y * w
    # Backward of the normalisation: (d * g - sum(g) - z_hat * sum(g * z_hat)) / (d * std)
    return (
        d * grad_hat - grad_hat.sum(dim=-1, keepdim=True) - z_hat * (grad_hat * z_hat).sum(dim=-1, keepdim=True)
    ) / (d * std)


def reconstruction_target(
    xk: torch.Tensor, xv: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, mode: str = "difference"
) -> torch.Tensor:
    """The value the inner MLP learns to produce from k: LN(v - k); "legacy" reproduces the older LN(v) - k."""
    if mode == "difference":
        return head_layer_norm(xv - xk, ln_weight, ln_bias)
    if mode == "legacy":
        return head_layer_norm(xv, ln_weight, ln_bias) - xk
    raise ValueError(f"unknown reconstruction target mode {mode!r}; expected 'difference' or 'legacy'")


def position_factors(token_idx: torch.Tensor | None, mini_batch_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """tau_i = max(0, 1/i + learnable_token_idx[i]) for i = 1..b, shape [b].

    A `token_idx` shorter than b is padded with zeros, a longer one truncated: a checkpoint trained with one
    mini-batch size can be evaluated with another.
    """
    tau = 1.0 / torch.arange(1, mini_batch_size + 1, dtype=dtype, device=device)
    if token_idx is not None:
        offsets = token_idx.to(dtype)[:mini_batch_size]
        tau = tau + F.pad(offsets, (0, mini_batch_size - offsets.shape[0]))
    return tau.clamp_min(0.0)


def _segment(
    w0: FastWeights,
    grad_sums: FastWeights | None,
    tau: torch.Tensor,
    xq: torch.Tensor,
    xk: torch.Tensor,
    target: torch.Tensor,
    lr: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
) -> tuple[torch.Tensor, FastWeights]:
    """Dual form over n tokens of one mini-batch, every gradient at w0.

    Args:
        tau: [n] position factors of these tokens inside their mini-batch.
        grad_sums: gradient sums of the earlier tokens of the same mini-batch (None if this segment starts it).
        xq, xk, target: [B, H, n, D]; lr: [B, H, n].
    Returns:
        out [B, H, n, D] and the segment's own sum_s lr_s grad l_s(w0).
    """
    # Inner forward and hand-written backward at W0 on the keys.
    z1 = xk @ w0.W1 + w0.b1  # [B, H, n, D] @ [B, H, D, F] -> [B, H, n, F]
    act = gelu_tanh(z1)
    z2 = act @ w0.W2 + w0.b2  # [B, H, n, F] @ [B, H, F, D] -> [B, H, n, D]
    g2 = ln_l2_grad(z2, target, ln_weight, ln_bias)  # [B, H, n, D]
    g1 = (g2 @ w0.W2.transpose(-1, -2)) * gelu_tanh_grad(z1)  # [B, H, n, D] @ [B, H, D, F] -> [B, H, n, F]

    # eta[i, s] = tau_i * lr_s for s <= i: token i sees the gradients of tokens 1..i only (causal).
    eta = torch.tril(tau[:, None] * lr[..., None, :])  # [n, 1] * [B, H, 1, n] -> [B, H, n, n]
    tau_col = tau[:, None]  # [n, 1]

    # z1q_i = q_i W1_i + b1_i with W1_i = W1_0 - tau_i (S_W1 + sum_{s<=i} lr_s k_s^T g1_s), likewise b1_i.
    z1q = xq @ w0.W1 + w0.b1 - (eta * (xq @ xk.transpose(-1, -2) + 1.0)) @ g1  # [B, H, n, F]
    if grad_sums is not None:
        z1q = z1q - tau_col * (xq @ grad_sums.W1 + grad_sums.b1)
    act_q = gelu_tanh(z1q)
    z2q = act_q @ w0.W2 + w0.b2 - (eta * (act_q @ act.transpose(-1, -2) + 1.0)) @ g2  # [B, H, n, D]
    if grad_sums is not None:
        z2q = z2q - tau_col * (act_q @ grad_sums.W2 + grad_sums.b2)
    out = xq + head_layer_norm(z2q, ln_weight, ln_bias)

    lr_g1 = lr[..., None] * g1  # [B, H, n, F]
    lr_g2 = lr[..., None] * g2  # [B, H, n, D]
    seg_sums = FastWeights(
        xk.transpose(-1, -2) @ lr_g1,  # [B, H, D, n] @ [B, H, n, F] -> [B, H, D, F]
        lr_g1.sum(dim=-2, keepdim=True),  # [B, H, 1, F]
        act.transpose(-1, -2) @ lr_g2,  # [B, H, F, n] @ [B, H, n, D] -> [B, H, F, D]
        lr_g2.sum(dim=-2, keepdim=True),  # [B, H, 1, D]
    )
    return out, seg_sums


def _check_inputs(weights: FastWeights, xq, xk, xv, lr, ln_weight, ln_bias, mini_batch_size: int) -> None:
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    if xq.dim() != 4 or xq.shape != xk.shape or xq.shape != xv.shape:
        raise ValueError(f"xq, xk, xv must share a shape [B, H, T, D]; got {xq.shape}, {xk.shape}, {xv.shape}")
    B, H, T, D = xq.shape
    if lr.shape != (B, H, T):
        raise ValueError(f"lr must be [B, H, T] = {[B, H, T]}, got {list(lr.shape)}")
    if ln_weight.shape != (H, D) or ln_bias.shape != (H, D):
        raise ValueError(f"ln_weight/ln_bias must be [H, D] = {[H, D]}, got {ln_weight.shape}, {ln_bias.shape}")
    expected = ((B, H, D, 4 * D), (B, H, 1, 4 * D), (B, H, 4 * D, D), (B, H, 1, D))
    got = tuple(tuple(w.shape) for w in weights)
    if got != expected:
        raise ValueError(f"fast weights must have shapes {expected} (W1, b1, W2, b2), got {got}")


def ttt_mlp_chunk(
    state: InnerState,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mini_batch_size: int,
    token_idx: torch.Tensor | None = None,
    target: str = "difference",
    on_update: UpdateHook | None = None,
) -> tuple[torch.Tensor, InnerState]:
    """Runs the inner loop over T tokens starting from `state`, which may be inside a mini-batch.

    Continuing a partial mini-batch, whole mini-batches and a trailing partial one all go through the dual form
    (`_segment`), so any chunking of a sequence gives the same numbers as one call over all of it.

    Args:
        state: weights at the start of the current mini-batch, the gradient sums of its tokens so far, its position.
        xq, xk, xv: [B, H, T, D]; lr: [B, H, T] (lr_s before tau); ln_weight, ln_bias: [H, D].
        token_idx: [b] learnable offsets of the position factors, or None.
        target: "difference" (correct) or "legacy" (see `reconstruction_target`).
        on_update: called as on_update(w_start, w_end) at every completed mini-batch.
    Returns:
        out [B, H, T, D] in the compute dtype (float32, or float64 for float64 inputs) and the new state.
    """
    w0, grad_sums, position = state
    _check_inputs(w0, xq, xk, xv, lr, ln_weight, ln_bias, mini_batch_size)
    if not 0 <= position < mini_batch_size:
        raise ValueError(f"state position must be in [0, {mini_batch_size}), got {position}")
    if (position > 0) != (grad_sums is not None):
        raise ValueError("grad_sums must be given exactly when the state is inside a mini-batch (position > 0)")
    dtype = torch.promote_types(xq.dtype, torch.float32)
    xq, xk, xv, lr, ln_weight, ln_bias = (t.to(dtype) for t in (xq, xk, xv, lr, ln_weight, ln_bias))
    w0 = w0.to(dtype)
    grad_sums = None if grad_sums is None else grad_sums.to(dtype)
    tau_all = position_factors(token_idx, mini_batch_size, dtype, xq.device)  # [b]
    target_all = reconstruction_target(xk, xv, ln_weight, ln_bias, target)  # [B, H, T, D]

    T = xq.shape[2]
    outs = []
    start = 0
    while start < T:
        n = min(mini_batch_size - position, T - start)
        seg = slice(start, start + n)
        out, seg_sums = _segment(
            w0,
            grad_sums,
            tau_all[position : position + n],
            xq[:, :, seg],
            xk[:, :, seg],
            target_all[:, :, seg],
            lr[:, :, seg],
            ln_weight,
            ln_bias,
        )
        outs.append(out)
        grad_sums = seg_sums if grad_sums is None else grad_sums.plus(seg_sums)
        position += n
        start += n
        if position == mini_batch_size:
            w_end = w0.minus_scaled(tau_all[-1], grad_sums)
            if on_update is not None:
                on_update(w0, w_end)
            w0, grad_sums, position = w_end, None, 0
    if not outs:
        return xq.new_zeros(xq.shape), InnerState(w0, grad_sums, position)
    return torch.cat(outs, dim=2), InnerState(w0, grad_sums, position)


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
) -> tuple[torch.Tensor, FastWeights]:
    """TTT-MLP over a whole sequence starting at a mini-batch boundary (the DESIGN.md contract).

    Args:
        weights: FastWeights(W1 [B,H,D,4D], b1 [B,H,1,4D], W2 [B,H,4D,D], b2 [B,H,1,D]).
        xq, xk, xv: [B, H, T, D]; T need not be a multiple of b.
        lr: [B, H, T], the per-token rates before the position factor tau.
        ln_weight, ln_bias: [H, D] of the per-head LayerNorm.
        mini_batch_size: b.
        token_idx: [b] learnable offsets of tau, or None (zeros).
        target: "difference" or "legacy".
    Returns:
        (out [B, H, T, D], weights after the last full mini-batch). The trailing partial mini-batch gives causal
        outputs and does not update the weights.
    """
    out, state = ttt_mlp_chunk(
        InnerState(weights, None, 0), xq, xk, xv, lr, ln_weight, ln_bias, mini_batch_size, token_idx, target
    )
    return out, state.weights


def ttt_mlp_token(
    weights: FastWeights,
    grad_sums: FastWeights,
    position: torch.Tensor,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mini_batch_size: int,
    token_idx: torch.Tensor | None = None,
    target: str = "difference",
) -> tuple[torch.Tensor, FastWeights, FastWeights, torch.Tensor]:
    """Primal form for one token per row, each row at its own position in its mini-batch.

    No data-dependent Python branch (rows finish their mini-batches through `torch.where`), so this step can be
    captured in a CUDA graph, as moshi's LMGen does on GPU.

    Args:
        weights: W0 per row; grad_sums: running sums per row (zeros at a mini-batch start); position: [B] long.
        xq, xk, xv: [B, H, 1, D]; lr: [B, H, 1].
    Returns:
        out [B, H, 1, D], new W0, new grad sums, new positions.
    """
    dtype = torch.promote_types(xq.dtype, torch.float32)
    xq, xk, xv, lr, ln_weight, ln_bias = (t.to(dtype) for t in (xq, xk, xv, lr, ln_weight, ln_bias))
    weights, grad_sums = weights.to(dtype), grad_sums.to(dtype)
    B = xq.shape[0]
    tau_all = position_factors(token_idx, mini_batch_size, dtype, xq.device)  # [b]
    tau = tau_all[position].view(B, 1, 1, 1)  # [B, 1, 1, 1]
    target_k = reconstruction_target(xk, xv, ln_weight, ln_bias, target)  # [B, H, 1, D]

    z1 = xk @ weights.W1 + weights.b1  # [B, H, 1, D] @ [B, H, D, F] -> [B, H, 1, F]
    act = gelu_tanh(z1)
    z2 = act @ weights.W2 + weights.b2  # [B, H, 1, F] @ [B, H, F, D] -> [B, H, 1, D]
    g2 = ln_l2_grad(z2, target_k, ln_weight, ln_bias)
    g1 = (g2 @ weights.W2.transpose(-1, -2)) * gelu_tanh_grad(z1)  # [B, H, 1, F]
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

    done = position + 1 == mini_batch_size  # [B]: the row completes its mini-batch with this token
    new_weights = w_i.where(done, weights)  # tau_i = tau_b on those rows, so W_i is the updated W0
    new_sums = sums.zeros_like().where(done, sums)
    new_position = torch.where(done, torch.zeros_like(position), position + 1)
    return out, new_weights, new_sums, new_position
