"""Mixed precision: under CPU bfloat16 autocast the TTT inner loop still runs in float32, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_audio_codes, tiny_lm

from moshi_ttt import TTTConfig, apply_ttt, ttt_blocks
from moshi_ttt.compat.sequence import model_codes
from moshi_ttt.ttt.ops import FastWeights, ttt_mlp, ttt_mlp_token
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.state import FastWeightState

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def inputs(B=2, H=2, T=11, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((D, 4 * D), (1, 4 * D), (4 * D, D), (1, D))
    weights = FastWeights(*(torch.randn(B, H, *s, generator=g) * 0.3 for s in shapes))
    xq, xk, xv = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    lr = torch.rand(B, H, T, generator=g) * 0.5
    return weights, xq, xk, xv, lr, 1.0 + 0.1 * torch.randn(H, D, generator=g), 0.1 * torch.randn(H, D, generator=g)


def test_ttt_mlp_inside_autocast_is_the_float32_computation_exactly():
    weights, xq, xk, xv, lr, ln_w, ln_b = inputs()
    ref_out, ref_w = ttt_mlp(weights, xq, xk, xv, lr, ln_w, ln_b, 4)
    with torch.autocast(**BF16):
        out, new = ttt_mlp(weights, xq, xk, xv, lr, ln_w, ln_b, 4)
        # bfloat16 inputs are read in float32 (the values they hold), not computed in bfloat16.
        low = (xq.bfloat16(), xk.bfloat16(), xv.bfloat16())
        out_low, _ = ttt_mlp(weights, *low, lr, ln_w, ln_b, 4)
    assert out.dtype == torch.float32 and all(w.dtype == torch.float32 for w in new)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for w, w_ref in zip(new, ref_w, strict=True):
        torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    expected_low, _ = ttt_mlp(weights, *(x.float() for x in low), lr, ln_w, ln_b, 4)
    torch.testing.assert_close(out_low, expected_low, rtol=0, atol=0)


def test_primal_token_step_inside_autocast_is_the_float32_computation_exactly():
    weights, xq, xk, xv, lr, ln_w, ln_b = inputs(T=1)
    state = FastWeightState.fresh(weights)._replace(position=torch.tensor([0, 2]))
    args = (state, InnerInputs(xq, xk, xv, lr), InnerParams(ln_w, ln_b, 4))
    ref_out, ref = ttt_mlp_token(*args)
    with torch.autocast(**BF16):
        got_out, got = ttt_mlp_token(*args)
    got_all, ref_all = ((o, *s.weights, *s.grad_sums, s.position) for o, s in ((got_out, got), (ref_out, ref)))
    torch.testing.assert_close(got_all, ref_all, rtol=0, atol=0)
    assert got.weights.W1.dtype == torch.float32


def ttt_model(share_qk: bool):
    cfg = TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5, share_qk=share_qk)
    return apply_ttt(tiny_lm(0), cfg)


def audio_loss(model, codes):
    out = model(codes)
    target = codes[:, model.audio_offset : model.audio_offset + model.dep_q]
    return F.cross_entropy(out.logits[out.mask].float(), target[out.mask])


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_training_forward_and_backward_under_bf16_autocast(share_qk):
    """What moshi-finetune does: float32 master weights, bfloat16 autocast. The baseline ran; TTT raised
    `expected scalar type BFloat16 but found Float` in the inner loop's LayerNorm backward."""
    model = ttt_model(share_qk).train()
    codes = model_codes(model, random_audio_codes(2, 20, seed=1))
    loss32 = audio_loss(model, codes)
    grads32 = torch.autograd.grad(loss32, list(ttt_blocks(model)[1].parameters()))
    with torch.autocast(**BF16):
        loss16 = audio_loss(model, codes)
    grads16 = torch.autograd.grad(loss16, list(ttt_blocks(model)[1].parameters()))
    assert abs(loss16.item() - loss32.item()) < 2e-2
    flat32 = torch.cat([g.flatten() for g in grads32])
    flat16 = torch.cat([g.flatten() for g in grads16])
    assert bool(flat16.isfinite().all()) and all(g.dtype == torch.float32 for g in grads16)
    assert F.cosine_similarity(flat16, flat32, dim=0) > 0.95  # bf16 round-off of the projections, no more


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_streaming_block_under_bf16_autocast_keeps_float32_fast_weights(share_qk):
    """The TTT block's own streaming state (moshi's KV cache itself does not take bfloat16 keys into its float32
    cache under autocast, so the whole model does not stream there, with or without TTT)."""
    model = ttt_model(share_qk).eval()
    block = ttt_blocks(model)[1]
    x = torch.randn(2, 24, model.dim)
    finals = []
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast(**BF16, enabled=autocast), block.streaming(2):
            for s in (0, 5, 6, 16):
                block(x[:, s : s + {0: 5, 5: 1, 6: 10, 16: 8}[s]])
            state = block._streaming_state
            assert all(w.dtype == torch.float32 for w in (*state.fast_weights, *state.grad_sums))
            finals.append([w.clone() for w in state.fast_weights])
    base = block.base_weights(2)
    for w16, w32, w0 in zip(*finals, base, strict=True):
        assert not torch.equal(w16, w32)  # the projections did run in bfloat16 ...
        # ... and the fast weights moved as in float32, up to the projections' round-off.
        assert (w16 - w32).norm() < 0.05 * (w32 - w0).norm()


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_carried_training_chunks_under_bf16_autocast(share_qk):
    from moshi_ttt.ttt.carry import TTTCarry, carry_ttt_state

    model = ttt_model(share_qk).train()
    codes = model_codes(model, random_audio_codes(2, 16, seed=3))
    carry = TTTCarry()
    with torch.autocast(**BF16), carry_ttt_state(model, carry):
        for s in (0, 8):
            audio_loss(model, codes[:, :, s : s + 8]).backward()
    assert all(w.dtype == torch.float32 for state in carry.states.values() for w in state.weights)
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in ttt_blocks(model)[1].parameters())
