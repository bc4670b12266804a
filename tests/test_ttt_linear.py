"""TTT-Linear (TTTConfig.inner="linear", f(x) = x W1 + b1 per head): the invariants and tests of TTT-MLP."""

import pytest
import torch
from moshi.models.lm import LMGen
from tiny_models import random_audio_codes, tiny_lm, tiny_lm_config

from moshi_ttt import (
    LegacyConfig,
    TTTConfig,
    apply_ttt,
    drift,
    exact_streaming,
    load,
    save,
    score,
    ttt_blocks,
    ttt_states,
)
from moshi_ttt.compat.sequence import delayed_input, model_codes
from moshi_ttt.ttt.ops import LinearWeights, head_layer_norm, ttt_linear, ttt_mlp_chunk, ttt_mlp_token
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.state import FastWeightState


def problem(B=2, H=2, T=11, D=4, b=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    weights = LinearWeights(rnd(B, H, D, D, scale=0.3), rnd(B, H, 1, D, scale=0.1))
    xq, xk, xv = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    lr = torch.rand(B, H, T, generator=g, dtype=dtype) * 0.5
    return weights, xq, xk, xv, lr, 1 + rnd(H, D, scale=0.1), rnd(H, D, scale=0.1), rnd(b, scale=0.2)


def slow_reference(weights, xq, xk, xv, lr, ln_w, ln_b, b, token_idx):
    """Token by token, gradients by autograd, from the definition (ARCHITECTURE.md's math, f(x) = x W1 + b1)."""
    B, H, T, D = xq.shape
    tau = (1.0 / torch.arange(1, b + 1, dtype=xq.dtype) + token_idx).clamp_min(0)
    w0, outs = weights, []
    for start in range(0, T, b):
        grads = None
        for s in range(start, min(start + b, T)):
            i = s - start
            wg = LinearWeights(*(w.detach().clone().requires_grad_(True) for w in w0))
            k, v = xk[:, :, s : s + 1], xv[:, :, s : s + 1]
            loss = 0.5 * ((head_layer_norm(k @ wg.W1 + wg.b1, ln_w, ln_b) - head_layer_norm(v - k, ln_w, ln_b)) ** 2)
            g = torch.autograd.grad(loss.sum(), list(wg))
            scaled = [lr[:, :, s].view(B, H, 1, 1) * gi for gi in g]
            grads = scaled if grads is None else [a + c for a, c in zip(grads, scaled, strict=True)]
            w_i = LinearWeights(*(w - tau[i] * gs for w, gs in zip(w0, grads, strict=True)))
            q = xq[:, :, s : s + 1]
            outs.append(q + head_layer_norm(q @ w_i.W1 + w_i.b1, ln_w, ln_b))
            if i == b - 1:
                w_end = w_i
        if min(start + b, T) - start == b:
            w0 = LinearWeights(*(w.detach() for w in w_end))
    return torch.cat(outs, dim=2), w0


@pytest.mark.parametrize("b", [1, 2, 4, 16], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("T", [11, 37], ids=lambda t: f"T{t}")
def test_ttt_linear_matches_slow_reference(b, T):
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = problem(T=T, b=b, seed=b * 10 + T)
    out, new_w = ttt_linear(weights, xq, xk, xv, lr, ln_w, ln_b, b, token_idx)
    ref_out, ref_w = slow_reference(weights, xq, xk, xv, lr, ln_w, ln_b, b, token_idx)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert isinstance(new_w, LinearWeights)
    for got, want in zip(new_w, ref_w, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunks", [[11], [1] * 11, [3, 1, 5, 2], [4, 4, 3], [2, 9]], ids=str)
def test_chunked_calls_and_primal_steps_equal_one_call(chunks):
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = problem()
    ref_out, _ = ttt_linear(weights, xq, xk, xv, lr, ln_w, ln_b, 4, token_idx)
    params = InnerParams(ln_w, ln_b, 4, token_idx)
    state, outs, start = FastWeightState.fresh(weights), [], 0
    for n in chunks:
        seg = slice(start, start + n)
        out, state = ttt_mlp_chunk(
            state, InnerInputs(xq[:, :, seg], xk[:, :, seg], xv[:, :, seg], lr[:, :, seg]), params
        )
        outs.append(out)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=2), ref_out, rtol=1e-11, atol=1e-11)
    # Primal form, token by token.
    state = FastWeightState.fresh(weights)
    for t in range(11):
        take = [x[:, :, t : t + 1] for x in (xq, xk, xv)]
        out, state = ttt_mlp_token(state, InnerInputs(*take, lr[:, :, t : t + 1]), params)
        torch.testing.assert_close(out, ref_out[:, :, t : t + 1], rtol=1e-11, atol=1e-11)


def test_gradcheck_through_the_linear_inner_loop():
    weights, xq, xk, xv, lr, ln_w, ln_b, token_idx = problem(B=1, H=1, T=6, D=3, b=2)
    leaves = [t.clone().requires_grad_(True) for t in (weights.W1, weights.b1, xq, xk, xv, lr, ln_w, token_idx)]

    def fn(W1, b1, q, k, v, rate, gamma, idx):
        out, new = ttt_linear(LinearWeights(W1, b1), q, k, v, rate, gamma, ln_b, 2, idx)
        return out, new.W1, new.b1

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


def linear_model(b: int, dtype=torch.float64, **cfg):
    f64 = dtype == torch.float64
    norm = "rms_norm" if f64 else "rms_norm_f32"
    model = tiny_lm(0, dtype=dtype, norm=norm, positional_embedding="sin" if f64 else "rope")
    cfg = {"layers": "1,2", "mini_batch_size": b, "gating_alpha_init": 0.5, "norm": norm, "inner": "linear", **cfg}
    return apply_ttt(model, TTTConfig(**cfg))


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
@pytest.mark.parametrize("b", [1, 4], ids=lambda b: f"b{b}")
def test_whole_token_by_token_and_uneven_chunks_agree_in_float64(b, share_qk):
    model = linear_model(b, share_qk=share_qk)
    block = ttt_blocks(model)[1]
    assert block.W1.shape == (4, 8, 8) and not hasattr(block, "W2")
    T = 40
    seq = delayed_input(model, model_codes(model, random_audio_codes(2, T, seed=1)))
    results = {}
    with torch.no_grad():
        reference, _ = model.forward_text(seq)
        for name, chunks in {"whole": [T], "tokens": [1] * T, "uneven": [13, 1, 1, 1, 16, 8]}.items():
            with exact_streaming(model, 2, max(chunks)):
                outs, start = [], 0
                for n in chunks:
                    outs.append(model.forward_text(seq[:, :, start : start + n])[0])
                    start += n
                state = ttt_states(model)[2]
                results[name] = (torch.cat(outs, dim=1), [w.clone() for w in state.fast_weights])
                assert isinstance(state.fast_weights, LinearWeights)
    torch.testing.assert_close(results["whole"][0], reference, rtol=1e-10, atol=1e-10)
    for name, (out, weights) in results.items():
        torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        for w, w_ref in zip(weights, results["whole"][1], strict=True):
            torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(results["whole"][1][0][0], results["whole"][1][0][1])  # rows moved differently


def test_later_tokens_do_not_change_earlier_outputs_and_a_reset_row_starts_fresh():
    model = linear_model(4, dtype=torch.float32)
    block = ttt_blocks(model)[1]
    x = torch.randn(2, 12, model.dim)
    with torch.no_grad():
        full = block(x)
        prefix = block(x[:, :7])
        torch.testing.assert_close(prefix, full[:, :7], rtol=1e-5, atol=1e-5)
        with block.streaming(2):
            block(x[:, :6])
            block._streaming_state.reset(torch.tensor([True, False]))
            after = block(x[:, 6:])
        torch.testing.assert_close(after[0:1], block(x[:1, 6:]), rtol=1e-5, atol=1e-5)  # row 0: a fresh stream
        torch.testing.assert_close(after[1:], full[1:, 6:], rtol=1e-5, atol=1e-5)  # row 1 carried on


def test_lmgen_runs_a_ttt_linear_model_and_the_fast_weights_move():
    model = apply_ttt(tiny_lm(0, n_q=16), TTTConfig(layers="all", mini_batch_size=4, inner="linear")).eval()
    lm_gen = LMGen(model, temp=0.8, temp_text=0.7)
    user = random_audio_codes(2, 30, seed=8)
    with torch.no_grad(), lm_gen.streaming(2):
        for t in range(30):
            lm_gen.step(user[:, :, t : t + 1])
        drifts = [drift(s) for s in ttt_states(model).values()]
    assert all(sorted(d) == ["W1", "b1"] and bool((d["W1"] > 0).all()) for d in drifts)


def test_training_scoring_telemetry_state_and_checkpoints_take_ttt_linear(tmp_path):
    model = linear_model(4, dtype=torch.float32).train()
    codes = model_codes(model, random_audio_codes(2, 16, seed=3))
    model(codes).logits.float().nan_to_num().sum().backward()
    block = ttt_blocks(model)[1]
    assert block.W1.grad.abs().sum() > 0 and block.b1.grad.abs().sum() > 0
    model.eval()
    audio = random_audio_codes(1, 20, seed=4)
    full = score(model, audio, "full")
    for mode in ("chunked", "stream"):
        other = score(model, audio, mode)
        torch.testing.assert_close(other.loss, full.loss, rtol=0, atol=1e-4, equal_nan=True)
    layer = full.telemetry.layers[1]
    assert sorted(layer.drift) == ["W1", "b1"] and layer.loss_after.shape == (1, 5)
    assert layer.loss_after.mean() < layer.loss_start.mean()  # the inner loop learns
    with exact_streaming(model.transformer, 1, 4), torch.no_grad():
        model.forward_text(delayed_input(model, model_codes(model, audio))[:, :, :6])
        saved = ttt_states(model)[1].fast.state_dict()
    back = FastWeightState.from_state_dict(saved)
    assert isinstance(back.weights, LinearWeights) and back.position.tolist() == [2]
    cfg = ttt_blocks(model)[1].cfg
    save(
        tmp_path / "ckpt", model, lm_config=tiny_lm_config(), ttt_config=cfg, mimi_ref="hf://kyutai/x/mimi.safetensors"
    )
    loaded = load(tmp_path / "ckpt", dtype=torch.float32)
    assert loaded.ttt_config.inner == "linear"
    torch.testing.assert_close(score(loaded.model, audio, "full").loss, full.loss, rtol=0, atol=0, equal_nan=True)


def test_bad_inner_options_are_refused():
    with pytest.raises(ValueError, match="inner must be one of"):
        TTTConfig(inner="rnn")
    with pytest.raises(ValueError, match="not inner='linear'"):
        TTTConfig(legacy=LegacyConfig(), inner="linear")
    weights, xq, xk, xv, lr, ln_w, ln_b, _ = problem()
    with pytest.raises(ValueError, match=r"W1, b1\)"):
        ttt_linear(LinearWeights(weights.W1[..., :3], weights.b1), xq, xk, xv, lr, ln_w, ln_b, 4)


def test_ttt_linear_trains_under_bf16_autocast_with_a_float32_inner_loop():
    model = linear_model(4, dtype=torch.float32).train()
    codes = model_codes(model, random_audio_codes(2, 12, seed=5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(codes)
    out.logits.float().nan_to_num().sum().backward()
    block = ttt_blocks(model)[1]
    assert block.W1.grad.dtype == torch.float32 and bool(block.W1.grad.isfinite().all())
    weights, xq, xk, xv, lr, ln_w, ln_b, idx = problem(dtype=torch.float32)
    ref = ttt_linear(weights, xq, xk, xv, lr, ln_w, ln_b, 4, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ttt_linear(weights, xq, xk, xv, lr, ln_w, ln_b, 4, idx)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
