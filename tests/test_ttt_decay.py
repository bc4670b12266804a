"""TTTConfig.decay (issue 21): after every full mini-batch the fast weights move back toward W_base,
W0 <- W_base + (1 - lambda) (W0 - tau_b S - W_base), with the guarantees of the core loop: a float64 per-token slow
reference, any chunking and the one-token form equal, the three scoring modes equal, per-row resets, telemetry,
checkpoints (decay 0, the default, is exactly the loop without it)."""

import json

import pytest
import torch
from tiny_models import CONTEXT, random_audio_codes, tiny_lm, tiny_lm_config
from tolerances import FLOAT64, FLOAT64_STORED

from moshi_ttt import TTTConfig, apply_ttt, exact_streaming, load, save, score, ttt_blocks, ttt_states
from moshi_ttt.compat.sequence import delayed_input, model_codes
from moshi_ttt.config import LegacyConfig
from moshi_ttt.ttt.ops import FastWeights, LinearWeights, gelu_tanh, head_layer_norm, ttt_mlp, ttt_mlp_chunk
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.primal import ttt_mlp_token
from moshi_ttt.ttt.state import FastWeightState

T = 45  # past the 16-token attention window of the tiny models


def problem(kind, B=2, H=2, T=11, D=4, b=4, seed=0):
    """Random float64 inputs, weights [B, H, ...] and a distinct W_base [H, ...]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def weights(*lead):
        if kind == "linear":
            return LinearWeights(rnd(*lead, D, D, scale=0.3), rnd(*lead, 1, D, scale=0.1))
        return FastWeights(
            rnd(*lead, D, 4 * D, scale=0.3), rnd(*lead, 1, 4 * D, scale=0.1),
            rnd(*lead, 4 * D, D, scale=0.3), rnd(*lead, 1, D, scale=0.1),
        )  # fmt: skip

    w, w_base = weights(B, H), weights(H)
    xq, xk, xv = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    lr = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5
    return w, w_base, (xq, xk, xv, lr), (1 + rnd(H, D, scale=0.1), rnd(H, D, scale=0.1)), rnd(b, scale=0.2)


def slow_reference(w0, w_base, inputs, ln, b, token_idx, decay):
    """Token by token, gradients by autograd, from the definition; the decay after each full mini-batch."""
    xq, xk, xv, lr = inputs
    ln_w, ln_b = ln
    B, H, T, D = xq.shape
    kind = type(w0)
    tau = (1.0 / torch.arange(1, b + 1, dtype=xq.dtype) + token_idx).clamp_min(0)

    def f(w, x):
        if kind is LinearWeights:
            return x @ w.W1 + w.b1
        return gelu_tanh(x @ w.W1 + w.b1) @ w.W2 + w.b2

    outs = []
    for start in range(0, T, b):
        grads = None
        for s in range(start, min(start + b, T)):
            i = s - start
            wg = kind(*(w.detach().clone().requires_grad_(True) for w in w0))
            k, v = xk[:, :, s : s + 1], xv[:, :, s : s + 1]
            loss = 0.5 * ((head_layer_norm(f(wg, k), ln_w, ln_b) - head_layer_norm(v - k, ln_w, ln_b)) ** 2).sum()
            scaled = [lr[:, :, s].view(B, H, 1, 1) * g for g in torch.autograd.grad(loss, list(wg))]
            grads = scaled if grads is None else [a + c for a, c in zip(grads, scaled, strict=True)]
            w_i = kind(*(w - tau[i] * gs for w, gs in zip(w0, grads, strict=True)))
            q = xq[:, :, s : s + 1]
            outs.append(q + head_layer_norm(f(w_i, q), ln_w, ln_b))
        if min(start + b, T) - start == b:
            w0 = kind(*(wb + (1 - decay) * (w.detach() - wb) for w, wb in zip(w_i, w_base, strict=True)))
    return torch.cat(outs, dim=2), w0


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("decay", [0.1, 0.5, 1.0], ids=lambda d: f"decay{d}")
@pytest.mark.parametrize("b,T", [(1, 11), (4, 11), (4, 37), (16, 37)], ids=lambda x: str(x))
def test_decay_matches_the_slow_float64_reference(kind, decay, b, T):
    w, w_base, inputs, ln, token_idx = problem(kind, T=T, b=b, seed=b * 10 + T)
    out, new_w = ttt_mlp(w, *inputs, *ln, b, token_idx, decay=decay, w_base=w_base)
    ref_out, ref_w = slow_reference(w, w_base, inputs, ln, b, token_idx, decay)
    torch.testing.assert_close(out, ref_out, **FLOAT64)
    for got, want in zip(new_w, ref_w, strict=True):
        torch.testing.assert_close(got, want, **FLOAT64)


def test_decay_zero_is_bit_identical_to_no_decay_and_decay_changes_the_numbers():
    w, w_base, inputs, ln, token_idx = problem("mlp", T=37, b=4, seed=1)
    plain = ttt_mlp(w, *inputs, *ln, 4, token_idx)
    zero = ttt_mlp(w, *inputs, *ln, 4, token_idx, decay=0.0, w_base=w_base)
    torch.testing.assert_close(zero[0], plain[0], rtol=0, atol=0)
    decayed = ttt_mlp(w, *inputs, *ln, 4, token_idx, decay=0.2, w_base=w_base)
    torch.testing.assert_close(decayed[0][:, :, :4], plain[0][:, :, :4], rtol=0, atol=0)  # the first mini-batch
    assert (decayed[0][:, :, 4:] - plain[0][:, :, 4:]).abs().max() > 1e-3  # later ones read the decayed weights


def test_decay_needs_w_base_and_a_value_in_range():
    _, _, _, ln, _ = problem("mlp")
    with pytest.raises(ValueError, match="needs w_base"):
        InnerParams(*ln, 4, decay=0.1)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        InnerParams(*ln, 4, decay=1.5, w_base=FastWeights(*[torch.zeros(1)] * 4))
    for bad in (-0.1, 2.0, True, "0.1"):
        with pytest.raises(ValueError, match="decay must be a number"):
            TTTConfig(decay=bad)
    with pytest.raises(ValueError, match="not part of the legacy"):
        TTTConfig(decay=0.1, legacy=LegacyConfig())


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("chunks", [[1] * 13, [3, 5, 1, 4], [6, 7]], ids=str)
def test_any_chunking_and_the_one_token_form_equal_one_call(kind, chunks):
    b = 4
    w, w_base, inputs, ln, token_idx = problem(kind, T=13, b=b, seed=7)
    full_out, full_w = ttt_mlp(w, *inputs, *ln, b, token_idx, decay=0.3, w_base=w_base)
    params = InnerParams(*ln, b, token_idx, decay=0.3, w_base=w_base)
    for form in (ttt_mlp_chunk, ttt_mlp_token):
        if form is ttt_mlp_token and chunks != [1] * 13:
            continue
        state, outs, start = FastWeightState.fresh(w), [], 0
        for n in chunks:
            out, state = form(state, InnerInputs(*(x[:, :, start : start + n] for x in inputs)), params)
            outs.append(out)
            start += n
        torch.testing.assert_close(torch.cat(outs, 2), full_out, **FLOAT64)
        for got, want in zip(state.weights, full_w, strict=True):
            torch.testing.assert_close(got, want, **FLOAT64)


def test_gradients_flow_through_the_decay_to_w_base():
    w, w_base, inputs, ln, token_idx = problem("mlp", B=1, H=1, T=9, D=2, b=4, seed=3)
    w_base = FastWeights(*(t.clone().requires_grad_(True) for t in w_base))

    def loss(*base):
        out, new = ttt_mlp(w, *inputs, *ln, 4, token_idx, decay=0.25, w_base=FastWeights(*base))
        return out.sum() + sum(t.sum() for t in new)

    assert torch.autograd.gradcheck(loss, tuple(w_base))


def _model(decay, dtype=torch.float64, **cfg):
    norm = "rms_norm" if dtype == torch.float64 else "rms_norm_f32"
    cfg = {"layers": "1,2", "mini_batch_size": 4, "gating_alpha_init": 0.5, "base_lr": 4.0, "norm": norm, **cfg}
    model = apply_ttt(tiny_lm(0, dtype=dtype, norm=norm), TTTConfig(decay=decay, **cfg)).eval()
    with torch.no_grad():  # W_base far from the initial state's zeros in the biases: the decay has a place to go
        for name, p in model.named_parameters():
            if name.endswith((".b1", ".b2")):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype))
    return model


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
@pytest.mark.parametrize("reset_every", [None, 6], ids=["persistent", "reset6"])
def test_three_scoring_modes_give_the_same_losses_with_decay(share_qk, reset_every):
    model = _model(0.2, share_qk=share_qk)
    codes = random_audio_codes(2, T, seed=11)
    full = score(model, codes, "full", reset_every=reset_every).loss
    for mode, chunk in (("stream", None), ("chunked", 5), ("chunked", CONTEXT)):
        other = score(model, codes, mode, chunk, reset_every=reset_every).loss
        torch.testing.assert_close(other, full, **FLOAT64_STORED, equal_nan=True, msg=f"{mode} {chunk}")
    without = score(_model(0.0, share_qk=share_qk), codes, "full", reset_every=reset_every).loss
    assert not torch.allclose(full.nan_to_num(), without.nan_to_num())  # the decay changes the numbers


def test_resetting_one_row_mid_stream_gives_it_a_fresh_stream_with_decay():
    model = _model(0.2)
    seq_a = delayed_input(model, model_codes(model, random_audio_codes(2, 30, seed=5)))
    seq_new = delayed_input(model, model_codes(model, random_audio_codes(1, 20, seed=6)))
    with torch.no_grad():
        with exact_streaming(model, 2, 10):
            full = torch.cat([model.forward_text(seq_a[:, :, s : s + 10])[0] for s in (0, 10, 20)], 1)
        with exact_streaming(model, 1, 10):
            fresh = torch.cat([model.forward_text(seq_new[:, :, s : s + 10])[0] for s in (0, 10)], 1)
        outs = []
        with exact_streaming(model, 2, 7):
            for start, n in ((0, 3), (3, 7)):
                model.forward_text(seq_a[:, :, start : start + n])
            model.reset_streaming(torch.tensor([True, False]))
            mixed = torch.cat([seq_new[:, :, :20], seq_a[1:, :, 10:30]], dim=0)
            for start, n in ((0, 5), (5, 1), (6, 7), (13, 7)):
                outs.append(model.forward_text(mixed[:, :, start : start + n])[0])
    after = torch.cat(outs, 1)
    torch.testing.assert_close(after[0], fresh[0], **FLOAT64)
    torch.testing.assert_close(after[1], full[1, 10:], **FLOAT64)


def test_telemetry_drift_is_bounded_by_the_decay():
    codes = random_audio_codes(1, T, seed=2)
    drifts = {}
    for decay in (0.0, 0.5, 1.0):
        layer = score(_model(decay, torch.float32), codes, "chunked").telemetry.layers[1]
        drifts[decay] = layer.drift["W1"][0]
    assert drifts[1.0].abs().max() == 0  # every mini-batch ends back at W_base
    assert drifts[0.5][-1] < 0.6 * drifts[0.0][-1]
    assert drifts[0.0][-1] > 0


def test_checkpoints_keep_the_decay_and_older_configs_load_without_it(tmp_path):
    model = _model(0.05, torch.float32)
    codes = random_audio_codes(1, 20, seed=4)
    cfg = next(iter(ttt_blocks(model).values())).cfg
    save(tmp_path / "ckpt", model, lm_config=tiny_lm_config(norm="rms_norm_f32"), ttt_config=cfg)
    loaded = load(tmp_path / "ckpt")
    assert loaded.ttt_config.decay == 0.05
    torch.testing.assert_close(score(loaded.model, codes).loss, score(model, codes).loss, equal_nan=True)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["ttt"]["decay"]  # a checkpoint saved before the option existed
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    assert load(tmp_path / "ckpt").ttt_config.decay == 0.0


def test_a_row_frozen_by_exec_mask_does_not_decay():
    model = _model(0.5, torch.float32, layers="1")
    seq = delayed_input(model, model_codes(model, random_audio_codes(2, 12, seed=7)))
    with torch.no_grad(), exact_streaming(model.transformer, 2, 4):
        model.forward_text(seq[:, :, :4])
        state = ttt_states(model)[1]
        frozen = [w[0].clone() for w in state.fast_weights]
        model.transformer.set_exec_mask(torch.tensor([False, True]))
        model.forward_text(seq[:, :, 4:8])
        for w, before in zip(state.fast_weights, frozen, strict=True):
            torch.testing.assert_close(w[0], before, rtol=0, atol=0)
