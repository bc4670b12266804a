"""FastWeightState: one value for streaming, the training carry and saved training state; pure operations."""

import pytest
import torch
from tiny_models import tiny_lm

from moshi_ttt import TTTConfig, apply_ttt, ttt_blocks
from moshi_ttt.ttt.ops import FastWeights, ttt_mlp
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.session import SessionOptions
from moshi_ttt.ttt.state import FastWeightState
from moshi_ttt.ttt.step import ttt_mlp_step

B, H, D = 3, 2, 4


def weights(seed: int) -> FastWeights:
    g = torch.Generator().manual_seed(seed)
    return FastWeights(*(torch.randn(B, H, *s, generator=g) for s in ((D, 4 * D), (1, 4 * D), (4 * D, D), (1, D))))


def some_state(history: bool = True) -> FastWeightState:
    return FastWeightState(
        weights(1),
        weights(2),
        torch.tensor([1, 0, 3]),
        torch.tensor([5, 8, 3]),
        torch.randn(B, 3, 8) if history else None,
    )


def test_reset_is_pure_and_restarts_only_the_masked_rows():
    state = some_state()
    copies = {k: v.clone() for k, v in state.state_dict().items()}
    base = FastWeights(*(w[:1, ...].squeeze(0) for w in weights(7)))  # [H, ...], broadcast to the rows
    mask = torch.tensor([True, False, True])
    new = state.reset(mask, base)
    for k, v in state.state_dict().items():  # the old value is untouched
        assert torch.equal(v, copies[k]), k
    for row in range(B):
        if mask[row]:
            assert torch.equal(new.weights.W1[row], base.W1) and not bool(new.grad_sums.W2[row].any())
            assert new.position[row] == 0 and new.offset[row] == 0 and not bool(new.history[row].any())
        else:
            assert torch.equal(new.weights.W1[row], state.weights.W1[row])
            assert torch.equal(new.history[row], state.history[row]) and new.offset[row] == state.offset[row]


def test_reset_to_a_live_base_keeps_gradients_and_detach_drops_them():
    base = FastWeights(*(w.requires_grad_(True) for w in weights(4)))
    new = some_state().reset(torch.tensor([True, False, False]), base)
    assert new.weights.W1.requires_grad
    new.weights.W1.sum().backward()
    assert base.W1.grad[0].abs().sum() > 0 and not bool(base.W1.grad[1:].any())  # only the restarted row
    detached = new.detach()
    assert not detached.weights.W1.requires_grad and torch.equal(detached.weights.W1, new.weights.W1)
    assert detached.history.data_ptr() != new.history.data_ptr()  # a copy, not a view of the chunk


@pytest.mark.parametrize("history", [True, False], ids=["share_qk", "plain"])
def test_state_dict_round_trip(history):
    state = some_state(history)
    back = FastWeightState.from_state_dict(state.state_dict())
    for a, b in zip(state.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (back.history is None) == (not history)
    partial = {k: v for k, v in state.state_dict().items() if k != "grad_sums.b1"}
    with pytest.raises(ValueError, match=r"lacks \['grad_sums.b1'\]"):
        FastWeightState.from_state_dict(partial)


def test_step_takes_and_returns_the_state_and_agrees_with_ttt_mlp():
    g = torch.Generator().manual_seed(0)
    T, b = 11, 4
    xq, xk, xv = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.3
    ln_w, ln_b = torch.ones(H, D, dtype=torch.float64), torch.zeros(H, D, dtype=torch.float64)
    w0 = FastWeights(*(w.double() * 0.3 for w in weights(3)))
    ref_out, ref_w = ttt_mlp(w0, xq, xk, xv, lr, ln_w, ln_b, b)
    state, outs = FastWeightState.fresh(w0), []
    for s, e in ((0, 3), (3, 4), (4, 9), (9, 11)):  # a single token, partial and whole mini-batches
        inputs = InnerInputs(xq[:, :, s:e], xk[:, :, s:e], xv[:, :, s:e], lr[:, :, s:e])
        out, state = ttt_mlp_step(state, inputs, InnerParams(ln_w, ln_b, b))
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), ref_out, rtol=1e-12, atol=1e-12)
    for w, w_ref in zip(state.weights, ref_w, strict=True):
        torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    assert state.position.tolist() == [T % b] * B and state.offset.tolist() == [T] * B


def test_streaming_state_wraps_one_value_of_tensors_only():
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4, share_qk=True))
    block = ttt_blocks(model)[1]
    with block.streaming(2):
        state = block._streaming_state
        assert isinstance(state.fast, FastWeightState) and state.qk_history is state.fast.history
        # W_base for reset: views of the parameters, no copies and no closures.
        params = (block.W1, block.b1, block.W2, block.b2)
        assert all(w.data_ptr() == p.data_ptr() for w, p in zip(state.base, params, strict=True))
        assert not any(callable(v) for v in vars(state).values())
        # The session's options and observer are one value, the layer's own options by default.
        assert state.session == SessionOptions(mini_batch_size=4, persistent=True, observer=None)
