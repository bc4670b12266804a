"""Carrying fast weights between non-streaming forwards (training on consecutive chunks of files)."""

import pytest
import torch
from tiny_models import random_audio_codes, tiny_lm
from tolerances import FLOAT32, FLOAT64

from moshi_ttt import TTTConfig, apply_ttt, ttt_blocks
from moshi_ttt.compat.sequence import model_codes
from moshi_ttt.ttt.carry import TTTCarry, carry_ttt_state


def make(b=4, share_qk=False, dtype=torch.float32):
    # float64: moshi's rms_norm_f32 and rope round activations to float32 (see tiny_models).
    f64 = dtype == torch.float64
    norm = "rms_norm" if f64 else "rms_norm_f32"
    cfg = TTTConfig(layers="1,2", mini_batch_size=b, gating_alpha_init=0.5, share_qk=share_qk, norm=norm)
    return apply_ttt(tiny_lm(0, dtype=dtype, norm=norm, positional_embedding="sin" if f64 else "rope"), cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_carried_chunks_equal_one_call_and_plain_calls_start_from_w_base(share_qk, dtype):
    model = make(share_qk=share_qk, dtype=dtype)
    block = ttt_blocks(model)[1]  # attention does not carry across separate forwards: test the TTT blocks
    x = torch.randn(2, 12, model.dim, dtype=dtype)
    tol = FLOAT64 if dtype == torch.float64 else FLOAT32  # two chunks vs one call: round-off only
    with torch.no_grad():
        carry = TTTCarry()
        with carry_ttt_state(model, carry):
            carried = torch.cat([block(x[:, :8]), block(x[:, 8:])], 1)
            assert sorted(carry.states) == [1]  # only the block that ran stored a state
        assert not block.is_streaming  # the carry session ended with the context
        torch.testing.assert_close(carried, block(x), **tol)
        assert not torch.allclose(block(x[:, 8:]), carried[:, 8:])  # without the carry: from W_base


def test_carry_through_the_whole_model_runs_and_stores_every_layer():
    model = make()
    codes = model_codes(model, random_audio_codes(2, 8, seed=1))
    carry = TTTCarry()
    with torch.no_grad(), carry_ttt_state(model, carry):
        model(codes)
        model(codes)
    assert sorted(carry.states) == [1, 2]
    assert all(bool((s.position == 0).all()) for s in carry.states.values())  # 8 tokens = two whole mini-batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_reset_rows_restart_from_the_current_w_base_and_it_gets_gradients(share_qk, dtype):
    model = make(share_qk=share_qk, dtype=dtype)
    block = ttt_blocks(model)[1]
    x = torch.randn(2, 16, model.dim, dtype=dtype)
    tol = FLOAT64 if dtype == torch.float64 else FLOAT32  # a reset row of 2 vs a fresh batch of 1: round-off only
    carry = TTTCarry()
    with carry_ttt_state(model, carry):
        with torch.no_grad():
            block(x[:, :8])
        with torch.no_grad():
            block.W1.add_(0.01)  # the outer loop moved W_base since the carry started
        carry.reset(torch.tensor([True, False]))
        out = block(x[:, 8:])
        out[0].sum().backward()
    assert block.W1.grad is not None and block.W1.grad.abs().sum() > 0
    with torch.no_grad():
        fresh = block(x[:1, 8:])
    torch.testing.assert_close(out[0:1].detach(), fresh, **tol)


def test_reset_inside_a_mini_batch_is_refused():
    model = make(b=4)
    block = ttt_blocks(model)[1]
    x = torch.randn(2, 10, model.dim)
    carry = TTTCarry()
    with torch.no_grad(), carry_ttt_state(model, carry):
        block(x[:, :6])
        carry.reset(torch.tensor([True, False]))
        with pytest.raises(ValueError, match="multiples of mini_batch_size"):
            block(x[:, 6:])
