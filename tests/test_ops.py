"""ttt_mlp (dual + primal forms) against a slow per-token autograd implementation of the ARCHITECTURE.md definition."""

import pytest
import torch

from moshi_ttt.ttt.ops import (
    FastWeights,
    gelu_tanh,
    head_layer_norm,
    ttt_mlp,
    ttt_mlp_chunk,
    ttt_mlp_token,
)
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.state import FastWeightState


def random_problem(B=2, H=2, T=11, D=4, b=4, dtype=torch.float64, seed=0, learnable=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    F_ = 4 * D
    weights = FastWeights(
        rnd(B, H, D, F_, scale=0.3),
        rnd(B, H, 1, F_, scale=0.1),
        rnd(B, H, F_, D, scale=0.3),
        rnd(B, H, 1, D, scale=0.1),
    )
    xq, xk, xv = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    lr = torch.rand(B, H, T, generator=g, dtype=dtype) * 0.5
    ln_w, ln_b = 1 + rnd(H, D, scale=0.1), rnd(H, D, scale=0.1)
    token_idx = rnd(b, scale=0.2) if learnable else None
    return weights, xq, xk, xv, lr, ln_w, ln_b, token_idx


def fork_target(v, k, ln_w, ln_b):
    """The older fork's target: the difference normalised with the unbiased std + 1e-5 (see test_legacy.py)."""
    d = v - k
    n = d.shape[-1]
    mean = d.sum(-1, keepdim=True) / n
    std = (((d - mean) ** 2).sum(-1, keepdim=True) / (n - 1)).sqrt()
    return ln_w[None, :, None, :] * (d - mean) / (std + 1e-5) + ln_b[None, :, None, :]


def slow_reference(weights, xq, xk, xv, lr, ln_w, ln_b, b, token_idx, target="difference"):
    """Token by token, gradients by autograd, straight from the definition."""
    B, H, T, D = xq.shape
    tau = 1.0 / torch.arange(1, b + 1, dtype=xq.dtype)
    if token_idx is not None:
        tau = tau + token_idx
    tau = tau.clamp_min(0)

    def f(w, x):
        return gelu_tanh(x @ w.W1 + w.b1) @ w.W2 + w.b2

    w0 = weights
    outs = []
    for start in range(0, T, b):
        grads = None
        for s in range(start, min(start + b, T)):
            i = s - start  # 0-based position
            wg = FastWeights(*(w.detach().clone().requires_grad_(True) for w in w0))
            k, v = xk[:, :, s : s + 1], xv[:, :, s : s + 1]
            tgt = head_layer_norm(v - k, ln_w, ln_b) if target == "difference" else fork_target(v, k, ln_w, ln_b)
            loss = 0.5 * ((head_layer_norm(f(wg, k), ln_w, ln_b) - tgt) ** 2).sum()
            g = torch.autograd.grad(loss, list(wg))
            scaled = [lr[:, :, s].view(B, H, 1, 1) * gi for gi in g]
            grads = scaled if grads is None else [a + c for a, c in zip(grads, scaled, strict=True)]
            w_i = FastWeights(*(w - tau[i] * gs for w, gs in zip(w0, grads, strict=True)))
            q = xq[:, :, s : s + 1]
            outs.append(q + head_layer_norm(f(w_i, q), ln_w, ln_b))
            if i == b - 1:
                w_end = w_i
        if min(start + b, T) - start == b:
            w0 = FastWeights(*(w.detach() for w in w_end))
    return torch.cat(outs, dim=2), w0


@pytest.mark.parametrize("b", [1, 2, 4, 16], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("T", [11, 37], ids=lambda t: f"T{t}")
def test_ttt_mlp_matches_slow_reference(b, T):
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = random_problem(T=T, b=b, seed=b * 100 + T)
    out, new_w = ttt_mlp(weights, xq, xk, xv, lr, ln_w, ln_b, b, token_idx)
    ref_out, ref_w = slow_reference(weights, xq, xk, xv, lr, ln_w, ln_b, b, token_idx)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(new_w, ref_w, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_legacy_target_matches_slow_reference():
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = random_problem(T=9, b=4, seed=3)
    out, new_w = ttt_mlp(weights, xq, xk, xv, lr, ln_w, ln_b, 4, token_idx, target="legacy")
    ref_out, ref_w = slow_reference(weights, xq, xk, xv, lr, ln_w, ln_b, 4, token_idx, target="legacy")
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_w.W1, ref_w.W1, rtol=1e-10, atol=1e-10)


def test_no_token_idx_means_zero_offsets():
    weights, xq, xk, xv, lr, ln_w, ln_b, _ = random_problem(T=10, b=4, seed=5, learnable=False)
    a = ttt_mlp(weights, xq, xk, xv, lr, ln_w, ln_b, 4, None)
    b = ttt_mlp(weights, xq, xk, xv, lr, ln_w, ln_b, 4, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("chunks", [[1] * 13, [3, 5, 1, 4], [13], [6, 7], [2, 2, 9]], ids=str)
@pytest.mark.parametrize("b", [1, 4, 16], ids=lambda b: f"b{b}")
def test_chunked_calls_equal_one_call(chunks, b):
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = random_problem(T=13, b=b, seed=7)
    full_out, full_w = ttt_mlp(weights, xq, xk, xv, lr, ln_w, ln_b, b, token_idx)
    state, params = FastWeightState.fresh(weights), InnerParams(ln_w, ln_b, b, token_idx)
    outs, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        out, state = ttt_mlp_chunk(state, InnerInputs(xq[:, :, sl], xk[:, :, sl], xv[:, :, sl], lr[:, :, sl]), params)
        outs.append(out)
        start += n
    torch.testing.assert_close(torch.cat(outs, 2), full_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(state.weights, full_w, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("b", [1, 3, 4], ids=lambda b: f"b{b}")
def test_primal_token_steps_equal_dual_form_with_rows_at_different_positions(b):
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = random_problem(T=10, b=b, seed=11)
    full_out, full_w = ttt_mlp(weights, xq, xk, xv, lr, ln_w, ln_b, b, token_idx)
    # Row 1 starts two tokens later than row 0: the rows sit at different positions of their mini-batches.
    state, params = FastWeightState.fresh(weights), InnerParams(ln_w, ln_b, b, token_idx)
    outs = {0: [], 1: []}
    for step in range(12):
        t = torch.tensor([step, step - 2])
        active = (t >= 0) & (t < 10)
        tt = t.clamp(0, 9)
        take = [xx[torch.arange(2), :, tt][:, :, None] for xx in (xq, xk, xv)]
        lr_t = lr[torch.arange(2), :, tt][:, :, None]
        out, new = ttt_mlp_token(state, InnerInputs(*take, lr_t), params)
        state = new.where(active, state)
        for r in range(2):
            if active[r]:
                outs[r].append(out[r])
    for r in range(2):
        torch.testing.assert_close(torch.cat(outs[r], 1), full_out[r], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state.weights.W2[r], full_w.W2[r], rtol=1e-10, atol=1e-10)


def test_float32_inside_for_low_precision_inputs():
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = random_problem(T=8, b=4, dtype=torch.float32)
    out, new_w = ttt_mlp(weights, xq.bfloat16(), xk.bfloat16(), xv.bfloat16(), lr, ln_w, ln_b, 4, token_idx)
    assert out.dtype == torch.float32 and all(w.dtype == torch.float32 for w in new_w)


def test_gradcheck_through_inner_loop():
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = random_problem(B=1, H=1, T=5, D=2, b=2, seed=13)
    inputs = [*weights, xq, xk, xv, lr, ln_w, ln_b, token_idx]
    inputs = [t.clone().requires_grad_(True) for t in inputs]

    def fn(W1, b1, W2, b2, xq, xk, xv, lr, ln_w, ln_b, token_idx):
        out, w = ttt_mlp(FastWeights(W1, b1, W2, b2), xq, xk, xv, lr, ln_w, ln_b, 2, token_idx)
        return out, w.W1, w.b2

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_bad_shapes_are_named():
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = random_problem(T=8, b=4)
    with pytest.raises(ValueError, match="lr must be"):
        ttt_mlp(weights, xq, xk, xv, lr[:, :, :3], ln_w, ln_b, 4, token_idx)
    with pytest.raises(ValueError, match="fast weights must have shapes"):
        ttt_mlp(weights._replace(W1=weights.W1[..., :3]), xq, xk, xv, lr, ln_w, ln_b, 4, token_idx)
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_mlp(weights, xq, xk, xv, lr, ln_w, ln_b, 0, token_idx)
