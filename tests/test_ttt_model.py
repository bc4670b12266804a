"""TTT inside moshi's LMModel: no-op gate, causality, per-row resets, persistence, LMGen, training, bfloat16."""

import copy

import pytest
import torch
import torch.nn.functional as F
from moshi.models.lm import LMGen
from tiny_models import CONTEXT, random_audio_codes, tiny_lm
from tolerances import FLOAT32, FLOAT64

from moshi_ttt import (
    LegacyConfig,
    RunOptions,
    TTTConfig,
    apply_ttt,
    drift,
    exact_streaming,
    set_streaming_options,
    ttt_blocks,
    ttt_states,
)
from moshi_ttt.compat.sequence import delayed_input, model_codes


def per_token_loss(model, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [B, 8, T] of LMModel.forward, NaN where moshi's mask says invalid."""
    out = model(codes)
    logits = out.logits.float()  # [B, 8, T, card]
    target = codes[:, model.audio_offset : model.audio_offset + model.dep_q]
    loss = F.cross_entropy(logits.flatten(0, 2).nan_to_num(), target.flatten(), reduction="none").view(target.shape)
    return torch.where(out.mask, loss, torch.full_like(loss, float("nan")))


def test_zero_gate_gives_the_untouched_models_logits_exactly():
    base = tiny_lm(0)
    model = apply_ttt(copy.deepcopy(base), TTTConfig(layers="all", gating_alpha_init=0.0, mini_batch_size=4))
    codes = model_codes(base, random_audio_codes(2, 40, seed=1))
    with torch.no_grad():
        a, b = base(codes), model(codes)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(b.text_logits, a.text_logits, rtol=0, atol=0, equal_nan=True)


def test_apply_ttt_keeps_moshi_names_and_adds_ttt_ones():
    base_keys = set(tiny_lm(0).state_dict())
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1,2"))
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert {k.split(".ttt.")[0] for k in keys - base_keys} == {"transformer.layers.1", "transformer.layers.2"}
    assert sorted(ttt_blocks(model)) == [1, 2]
    with pytest.raises(ValueError, match="already applied"):
        apply_ttt(model, TTTConfig(layers="0"))
    with pytest.raises(ValueError, match="out of range"):
        apply_ttt(tiny_lm(0), TTTConfig(layers="3"))


@pytest.mark.parametrize("t0", [5, 13, 22], ids=lambda t: f"t0_{t}")
@pytest.mark.parametrize("b", [4, 16], ids=lambda b: f"b{b}")
def test_later_tokens_do_not_change_earlier_outputs(b, t0):
    """Also inside a mini-batch: an older TTT-for-Moshi code base let tokens see later tokens of their mini-batch."""
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="all", mini_batch_size=b, gating_alpha_init=1.0, base_lr=5.0))
    codes = model_codes(model, random_audio_codes(1, 30, seed=4))
    changed = codes.clone()
    changed[:, 1:, t0:] = (changed[:, 1:, t0:] + 7) % model.card
    with torch.no_grad():
        seq_a, seq_b = delayed_input(model, codes), delayed_input(model, changed)
        out_a, out_b = model.forward_text(seq_a)[0], model.forward_text(seq_b)[0]
        loss_a, loss_b = per_token_loss(model, codes), per_token_loss(model, changed)
    # Input step t carries the codes of step t - 1 (moshi prepends the initial token).
    first = int((seq_a != seq_b).any(dim=1)[0].nonzero()[0])
    assert first == t0 + 1 and (first % b != 0 or b == 1)  # the change starts inside a mini-batch
    torch.testing.assert_close(out_b[:, :first], out_a[:, :first], rtol=0, atol=0)
    assert not torch.equal(out_b[:, first], out_a[:, first])
    # Acoustic codebooks are delayed by one step: their loss at step t0 - 1 is scored with the semantic code of
    # step t0 as depformer input, so moshi's own delays make that step depend on t0; everything before is untouched.
    torch.testing.assert_close(loss_b[..., : t0 - 1], loss_a[..., : t0 - 1], rtol=0, atol=0, equal_nan=True)


def _dtype_kwargs(dtype) -> dict:
    """tiny_lm options of a float64 model: moshi's rms_norm_f32 and rope round activations to float32."""
    f64 = dtype == torch.float64
    return {"norm": "rms_norm" if f64 else "rms_norm_f32", "positional_embedding": "sin" if f64 else "rope"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_resetting_one_row_mid_stream_gives_it_a_fresh_stream(share_qk, dtype):
    kw = _dtype_kwargs(dtype)
    cfg = TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5, share_qk=share_qk, norm=kw["norm"])
    model = apply_ttt(tiny_lm(0, dtype=dtype, **kw), cfg)
    seq_a = delayed_input(model, model_codes(model, random_audio_codes(2, 30, seed=5)))
    seq_new = delayed_input(model, model_codes(model, random_audio_codes(1, 20, seed=6)))
    chunks_before, chunks_after = [3, 1, 6], [5, 1, 7, 7]  # 10 tokens, then 20; chunks cross mini-batches
    with torch.no_grad():
        with exact_streaming(model, 2, 10):  # uninterrupted two-row stream
            full = torch.cat([model.forward_text(seq_a[:, :, s : s + 10])[0] for s in (0, 10, 20)], 1)
        with exact_streaming(model, 1, 10):  # a fresh one-row stream of the new sequence
            fresh = torch.cat([model.forward_text(seq_new[:, :, s : s + 10])[0] for s in (0, 10)], 1)
        outs = []
        with exact_streaming(model, 2, 7):
            start = 0
            for n in chunks_before:
                model.forward_text(seq_a[:, :, start : start + n])
                start += n
            model.reset_streaming(torch.tensor([True, False]))
            # Row 0 restarts on the new sequence, row 1 goes on with its own (rows now sit at different positions).
            mixed = torch.cat([seq_new[:, :, :20], seq_a[1:, :, 10:30]], dim=0)
            start = 0
            for n in chunks_after:
                outs.append(model.forward_text(mixed[:, :, start : start + n])[0])
                start += n
            states = ttt_states(model)
            assert states[1].offset.tolist() == [20, 30]
    after = torch.cat(outs, 1)
    tol = FLOAT64 if dtype == torch.float64 else FLOAT32  # batch of 2 vs 1, other chunks: round-off only
    torch.testing.assert_close(after[0], fresh[0], **tol)
    torch.testing.assert_close(after[1], full[1, 10:], **tol)


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_exec_mask_freezes_a_row(share_qk):
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4, share_qk=share_qk)).eval()
    seq = delayed_input(model, model_codes(model, random_audio_codes(2, 6, seed=7)))
    with torch.no_grad(), exact_streaming(model, 2, 3):
        model.forward_text(seq[:, :, :3])
        before = [w.clone() for w in ttt_states(model)[1].fast_weights]
        pos_before = ttt_states(model)[1].position.clone()
        history = None if not share_qk else ttt_states(model)[1].qk_history.clone()
        model.set_exec_mask(torch.tensor([False, True]))
        model.forward_text(seq[:, :, 3:6])
        state = ttt_states(model)[1]
    assert torch.equal(state.fast_weights.W1[0], before[0][0]) and state.position[0] == pos_before[0]
    assert not torch.equal(state.fast_weights.W1[1], before[0][1])
    if share_qk:
        assert torch.equal(state.qk_history[0], history[0]) and not torch.equal(state.qk_history[1], history[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_non_persistent_streaming_starts_every_call_from_w_base(share_qk, dtype):
    kw = _dtype_kwargs(dtype)
    cfg = TTTConfig(layers="1", mini_batch_size=4, persistent_states=False, share_qk=share_qk, norm=kw["norm"])
    model = apply_ttt(tiny_lm(0, dtype=dtype, **kw), cfg)
    block = ttt_blocks(model)[1]
    x = torch.randn(2, 22, model.dim, dtype=dtype)
    tol = FLOAT64 if dtype == torch.float64 else FLOAT32  # streaming vs plain calls: round-off only
    bounds = [(0, 9), (9, 10), (10, 15), (15, 22)]
    with torch.no_grad():
        with model.streaming(2):
            for s, e in bounds:
                torch.testing.assert_close(block(x[:, s:e]), _fresh_block_output(block, x[:, s:e]), **tol)
        # With persistence (a per-session option: the model is not changed) later calls differ from fresh ones.
        with model.streaming(2):
            set_streaming_options(model, RunOptions(persistent_states=True))
            block(x[:, :9])
            assert not torch.allclose(block(x[:, 9:18]), _fresh_block_output(block, x[:, 9:18]))
    assert block.cfg.persistent_states is False


def _fresh_block_output(block, x):
    state, block._streaming_state = block._streaming_state, None
    try:
        return block(x)
    finally:
        block._streaming_state = state


def test_set_streaming_options_is_per_session():
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4))
    with model.streaming(1):
        set_streaming_options(model, RunOptions(mini_batch_size=8, persistent_states=False))
        state = ttt_states(model)[1]
        assert (state.mini_batch_size, state.persistent, state.reset_every) == (8, True, CONTEXT)
    with model.streaming(1):
        state = ttt_states(model)[1]
        assert (state.mini_batch_size, state.persistent, state.reset_every) == (4, True, None)
    assert ttt_blocks(model)[1].cfg.mini_batch_size == 4


def test_moshi_lmgen_runs_the_patched_model_and_fast_weights_move():
    model = apply_ttt(tiny_lm(0, n_q=16), TTTConfig(layers="all", mini_batch_size=4)).eval()
    lm_gen = LMGen(model, temp=0.8, temp_text=0.7)
    user = random_audio_codes(2, 60, seed=8)
    outputs = 0
    with torch.no_grad(), lm_gen.streaming(2):
        for t in range(60):
            out = lm_gen.step(user[:, :, t : t + 1])
            if out is not None:
                assert out.shape == (2, 9, 1)
                outputs += 1
        states = ttt_states(model)
        drifts = {i: drift(s) for i, s in states.items()}
    assert outputs >= 50
    for d in drifts.values():
        assert (d["W1"] > 0).all() and (d["W2"] > 0).all()
    assert all(int(s.offset[0]) == 60 for s in states.values())


def test_training_reaches_every_ttt_parameter_and_lowers_the_loss():
    torch.manual_seed(0)
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4)).train()
    codes = model_codes(model, random_audio_codes(2, 24, seed=9))
    block = ttt_blocks(model)[1]
    loss = per_token_loss(model, codes).nanmean()
    loss.backward()
    for name in (
        "W1",
        "b1",
        "W2",
        "b2",
        "lr_weight",
        "lr_bias",
        "gating_alpha",
        "learnable_token_idx",
        "ttt_norm_weight",
        "ttt_norm_bias",
        "wq.weight",
        "wk.weight",
        "wv.weight",
        "wo.weight",
        "norm.alpha",
    ):
        grad = block.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    ttt_params = [p for blk in ttt_blocks(model).values() for p in blk.parameters()]
    opt = torch.optim.AdamW(ttt_params, lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = per_token_loss(model, codes).nanmean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_bfloat16_model_keeps_fast_weights_in_float32():
    model32 = apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5))
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    block = ttt_blocks(model16)[1]
    assert block.W1.dtype == torch.float32 and block.wq.weight.dtype == torch.bfloat16
    torch.testing.assert_close(block.W1, ttt_blocks(model32)[1].W1, rtol=0, atol=0)
    codes = model_codes(model32, random_audio_codes(2, 40, seed=10))
    with torch.no_grad():
        loss32 = per_token_loss(model32, codes)
        loss16 = per_token_loss(model16, codes)
        seq = delayed_input(model16, codes)
        with exact_streaming(model16, 2, 8):
            for s in range(0, 40, 8):
                model16.forward_text(seq[:, :, s : s + 8])
            state = ttt_states(model16)[1]
            assert all(w.dtype == torch.float32 for w in (*state.fast_weights, *state.grad_sums))
    assert abs(loss16.nanmean() - loss32.nanmean()) < 2e-2
    torch.testing.assert_close(loss16, loss32, rtol=0, atol=0.1, equal_nan=True)


def test_share_qk_keys_see_earlier_tokens_and_bad_options_are_refused():
    """With share_qk, a key mixes the last conv_kernel tokens: started as a one-token shift, token t's key is token
    t - 1's query."""
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", share_qk=True, conv_kernel=3))
    block = ttt_blocks(model)[1]
    assert "wk" not in dict(block.named_children()) and block.conv_q.weight.shape == (model.dim, 1, 3)
    block.init_qk_shift()
    with torch.no_grad():
        xq, xk, _, _, history = block._project(torch.randn(2, 6, model.dim), None)
    torch.testing.assert_close(xk[:, :, 1:], xq[:, :, :-1], rtol=0, atol=0)
    assert torch.equal(xk[:, :, 0], torch.zeros_like(xk[:, :, 0])) and history.shape == (2, 2, model.dim)
    with pytest.raises(ValueError, match="share_qk"):
        TTTConfig(legacy=LegacyConfig(), share_qk=True)
    with pytest.raises(ValueError, match="share_qk"):
        ttt_blocks(apply_ttt(tiny_lm(0), TTTConfig(layers="1")))[1].init_qk_shift()
    with pytest.raises(ValueError, match="conv_kernel"):
        TTTConfig(share_qk=True, conv_kernel=0)


@pytest.mark.parametrize("legacy", [False, True], ids=["core", "legacy"])
@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_non_persistent_streaming_respects_exec_mask(share_qk, legacy):
    if legacy and share_qk:
        pytest.skip("share_qk is not part of the legacy layout")
    cfg = TTTConfig(
        layers="1",
        mini_batch_size=4,
        persistent_states=False,
        share_qk=share_qk,
        legacy=LegacyConfig() if legacy else None,
    )
    model = apply_ttt(tiny_lm(0), cfg).eval()
    seq = delayed_input(model, model_codes(model, random_audio_codes(2, 9, seed=7)))
    with torch.no_grad(), exact_streaming(model, 2, 3):
        model.forward_text(seq[:, :, :3])
        state = ttt_states(model)[1]
        frozen = {name: getattr(state, name).clone() for name in ("position", "offset")}
        moved = copy.deepcopy(state.fast_weights if not legacy else state.weights)
        model.set_exec_mask(torch.tensor([False, True]))
        model.forward_text(seq[:, :, 3:6])
        model.forward_text(seq[:, :, 6:9])
        state = ttt_states(model)[1]
        assert state.exec_mask.tolist() == [False, True]  # the per-call reset did not unfreeze row 0
        for name, before in frozen.items():
            assert getattr(state, name)[0] == before[0], name
        assert state.offset[1] == 3 and state.position[1] == 3  # row 1 ran its last call from W_base
        weights = state.fast_weights if not legacy else state.weights
        for w, w_before in zip(weights, moved, strict=True):
            torch.testing.assert_close(w[0], w_before[0], rtol=0, atol=0)


@pytest.mark.parametrize("legacy", [False, True], ids=["ttt", "legacy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_ttt_blocks_built_on_meta_fill_like_any_module(legacy, dtype):
    """The standard way to build a big model without allocating it: on the meta device, then `to_empty` and a
    state dict, or `load_state_dict(assign=True)` as moshi's loader does. Both give the original model's logits,
    with the fast weights in float32 whatever the model's dtype."""
    extra = {"target": "legacy", "legacy": LegacyConfig(causal=True, mlp_layers=2)} if legacy else {}
    cfg = TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5, **extra)
    original = apply_ttt(tiny_lm(0, dtype=dtype), cfg)
    with torch.no_grad():
        for name, p in original.named_parameters():
            if ".ttt." in name:  # trained-looking values, so that a block left uninitialised would show
                p.add_(torch.randn_like(p) * 0.1)
    state = original.state_dict()
    codes = model_codes(original, random_audio_codes(2, 12, seed=4))
    with torch.no_grad():
        expected = original(codes).logits

    emptied = apply_ttt(tiny_lm(0, dtype=dtype, device="meta"), cfg, device="meta")
    assert all(p.is_meta for p in emptied.parameters())
    emptied.to_empty(device="cpu")
    emptied.load_state_dict(state)
    assigned = apply_ttt(tiny_lm(0, dtype=dtype, device="meta"), cfg, device="meta")
    assigned.load_state_dict(state, assign=True)
    for model in (emptied, assigned):
        block = ttt_blocks(model)[1]
        fast = block.ttt_norm_weight if legacy else block.W1
        assert fast.dtype == torch.float32 and not fast.is_meta and block.wq.weight.dtype == dtype
        with torch.no_grad():
            torch.testing.assert_close(model(codes).logits, expected, rtol=0, atol=0, equal_nan=True)
