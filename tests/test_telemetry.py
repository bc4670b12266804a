"""Telemetry: drift and inner-loop losses per mini-batch, the same in every mode, checked against a manual run."""

import pytest
import torch
from tiny_models import random_audio_codes, tiny_lm
from tolerances import FLOAT32, FLOAT64_STORED

from moshi_ttt import TTTConfig, apply_ttt, drift, exact_streaming, score, ttt_blocks, ttt_states
from moshi_ttt.compat.sequence import delayed_input, model_codes
from moshi_ttt.scoring.telemetry import WEIGHT_NAMES, reconstruction_loss, weight_drift
from moshi_ttt.ttt.ops import FastWeights, gelu_tanh, head_layer_norm

T = 45


def ttt_lm(b: int, dtype=torch.float32, **cfg):
    # float64: moshi's rms_norm_f32 and rope round activations to float32 (see tiny_models).
    norm = "rms_norm" if dtype == torch.float64 else "rms_norm_f32"
    cfg = {"layers": "1,2", "base_lr": 1.0, "gating_alpha_init": 0.5, "norm": norm, **cfg}
    model = tiny_lm(0, dtype=dtype, norm=norm, positional_embedding="sin" if dtype == torch.float64 else "rope")
    return apply_ttt(model, TTTConfig(mini_batch_size=b, **cfg))


def assert_telemetry_close(a, b, tol=FLOAT32):
    assert a.layers.keys() == b.layers.keys() and a.mini_batch_size == b.mini_batch_size
    for i, la in a.layers.items():
        lb = b.layers[i]
        assert torch.equal(la.update_step, lb.update_step)
        for name in WEIGHT_NAMES:
            torch.testing.assert_close(la.drift[name], lb.drift[name], **tol)
            torch.testing.assert_close(la.final_drift[name], lb.final_drift[name], **tol)
        for field in ("loss_base", "loss_start", "loss_after"):
            torch.testing.assert_close(getattr(la, field), getattr(lb, field), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("b", [1, 4, 16], ids=lambda b: f"b{b}")
def test_every_mode_records_the_same_telemetry(b, dtype):
    model = ttt_lm(b, dtype=dtype)
    tol = FLOAT64_STORED if dtype == torch.float64 else FLOAT32  # the invariant; float32 round-off
    codes = random_audio_codes(2, T, seed=1)
    full = score(model, codes, "full").telemetry
    layer = full.layers[1]
    assert full.mini_batch_size == b
    assert layer.update_step.tolist() == list(range(b, T + 1, b))
    U = T // b
    assert layer.drift["W1"].shape == (2, U) and layer.loss_after.shape == (2, U)
    assert (layer.drift["W1"] > 0).all()
    for chunks in (7, 16):
        assert_telemetry_close(score(model, codes, "chunked", chunks).telemetry, full, tol)
    assert_telemetry_close(score(model, codes, "stream").telemetry, full, tol)


def test_drift_and_losses_match_a_manual_streaming_run():
    b = 4
    model = ttt_lm(b)
    codes = random_audio_codes(2, T, seed=2)
    telemetry = score(model, codes, "chunked", 8).telemetry
    seq = delayed_input(model, model_codes(model, codes))
    block = ttt_blocks(model)[2]
    captured = []
    hook = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    starts = []
    with torch.no_grad(), exact_streaming(model.transformer, 2, b):
        state = ttt_states(model)[2]
        for start in range(0, T, b):  # one mini-batch per call: the state holds every W0
            starts.append(FastWeights(*(w.clone() for w in state.fast_weights)))
            model.forward_text(seq[:, :, start : start + b])
        final_drift = drift(state)
        ends = starts[1:] + [FastWeights(*(w.clone() for w in state.fast_weights))]
    hook.remove()
    layer = telemetry.layers[2]
    base = block.base_weights(2)
    ln = (block.ttt_norm_weight, block.ttt_norm_bias)
    for u in range(T // b):
        expected = weight_drift(ends[u], base)
        for name in WEIGHT_NAMES:
            torch.testing.assert_close(layer.drift[name][:, u], expected[name], **FLOAT32)  # float32 round-off
        with torch.no_grad():
            _, xk, xv, _, _ = block._project(block.norm(captured[u]), None)
        target = head_layer_norm(xv - xk, *ln)
        for field, weights in (("loss_base", base), ("loss_start", starts[u]), ("loss_after", ends[u])):
            expected_loss = reconstruction_loss(weights, xk, target, *ln)
            torch.testing.assert_close(getattr(layer, field)[:, u], expected_loss, **FLOAT32)  # float32 round-off
    for name in WEIGHT_NAMES:
        torch.testing.assert_close(layer.final_drift[name], final_drift[name], **FLOAT32)  # float32 round-off
    torch.testing.assert_close(layer.loss_start[:, 0], layer.loss_base[:, 0])  # the first W0 is W_base


def test_reconstruction_loss_is_half_the_squared_error_averaged_over_heads_and_tokens():
    g = torch.Generator().manual_seed(0)
    B, H, n, D = 2, 3, 5, 4
    weights = FastWeights(*(torch.randn(B, H, *s, generator=g) for s in ((D, 4 * D), (1, 4 * D), (4 * D, D), (1, D))))
    xk, target = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    ln_w, ln_b = torch.randn(H, D, generator=g), torch.randn(H, D, generator=g)
    expected = torch.zeros(B)
    for row in range(B):
        for h in range(H):
            for s in range(n):
                w = FastWeights(*(x[row : row + 1, h : h + 1] for x in weights))
                k = xk[row, h, s].view(1, 1, 1, D)
                f = gelu_tanh(k @ w.W1 + w.b1) @ w.W2 + w.b2
                pred = head_layer_norm(f, ln_w[h : h + 1], ln_b[h : h + 1])
                expected[row] += 0.5 * (pred.flatten() - target[row, h, s]).pow(2).sum() / (H * n)
    torch.testing.assert_close(reconstruction_loss(weights, xk, target, ln_w, ln_b), expected)


@pytest.mark.parametrize("mode, chunk", [("chunked", 8), ("chunked", 5), ("stream", None), ("full", None)])
def test_with_a_reset_period_every_period_starts_at_w_base_in_every_mode(mode, chunk):
    model = ttt_lm(4)
    codes = random_audio_codes(1, T, seed=3)
    layer = score(model, codes, mode, chunk, reset_every=8).telemetry.layers[1]
    assert layer.update_step.tolist() == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44]
    # Periods of 8 = two mini-batches: the first of each period starts at W_base, the second after one update.
    torch.testing.assert_close(layer.loss_start[:, ::2], layer.loss_base[:, ::2])
    assert not torch.allclose(layer.loss_start[:, 1::2], layer.loss_base[:, 1::2])


def test_telemetry_can_be_turned_off_and_leaves_no_hooks_behind():
    model = ttt_lm(4)
    codes = random_audio_codes(1, 20, seed=4)
    assert score(model, codes, "stream", telemetry=False).telemetry is None
    score(model, codes, "stream")
    for block in ttt_blocks(model).values():
        assert not block._forward_hooks and not block._forward_pre_hooks
    assert score(tiny_lm(0), codes).telemetry is None


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_target_variance_is_the_loss_of_the_mean_target_and_the_same_in_every_mode(share_qk):
    """The fourth TTT stat of ttt-lm-jax: what there is to learn in each mini-batch, on the scale of the losses."""
    b = 4
    model = ttt_lm(b, share_qk=share_qk)
    codes = random_audio_codes(2, 20, seed=5)
    full = score(model, codes, "full").telemetry.layers[1]
    block = ttt_blocks(model)[1]
    seq = delayed_input(model, model_codes(model, codes))
    captured = []
    hook = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        model.forward_text(seq)  # plain forward: the block's input for all 20 steps
        hook.remove()
        _, xk, xv, _, _ = block._project(block.norm(captured[0]), None)
    target = head_layer_norm(xv - xk, block.ttt_norm_weight, block.ttt_norm_bias)  # [B, H, T, D]
    assert full.target_variance.shape == (2, 20 // b)
    for u in range(20 // b):
        y = target[:, :, u * b : (u + 1) * b]  # [B, H, b, D]
        expected = 0.5 * (y - y.mean(dim=2, keepdim=True)).pow(2).sum(-1).mean(dim=(1, 2))
        torch.testing.assert_close(full.target_variance[:, u], expected, rtol=1e-5, atol=1e-6)
    for mode, chunk in (("chunked", 7), ("stream", None)):
        other = score(model, codes, mode, chunk).telemetry.layers[1]
        torch.testing.assert_close(other.target_variance, full.target_variance, rtol=1e-4, atol=1e-5)
    assert bool((full.target_variance > 0).all())


def test_results_record_names_the_target_variance():
    from moshi_ttt.reports.results import telemetry_record

    model = ttt_lm(4)
    telemetry = score(model, random_audio_codes(1, 12, seed=6), "chunked", 4).telemetry
    _, inner = telemetry_record(telemetry, 0)
    assert inner["1"]["target_variance"] == telemetry.layers[1].target_variance[0].tolist()
    assert len(inner["1"]["target_variance"]) == len(inner["1"]["t"]) == 3
