"""TTTConfig.branch_input="before_attention": the TTT branch reads the layer's input (where frames are distinct),
in parallel with self-attention. Every invariant of the default layout holds: modes agree, causal, per-row reset,
zero gate = baseline, checkpoints round-trip."""

import copy

import pytest
import torch
from moshi.modules.transformer import StreamingTransformerLayer
from test_ttt_streaming import T, patterns, stream, ttt_model
from tiny_models import random_audio_codes, tiny_lm, tiny_lm_config

from moshi_ttt import LegacyConfig, TTTConfig, apply_ttt, exact_streaming, ttt_blocks, ttt_states
from moshi_ttt.compat.sequence import delayed_input, model_codes
from moshi_ttt.data.checkpoints import load, save

BEFORE = "before_attention"


def before_model(b: int = 4, layers: str = "0,2", share_qk: bool = True, alpha: float = 0.5, seed: int = 0):
    cfg = TTTConfig(layers=layers, mini_batch_size=b, base_lr=1.0, gating_alpha_init=alpha, share_qk=share_qk,
                    branch_input=BEFORE)  # fmt: skip
    return apply_ttt(tiny_lm(seed), cfg)


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
@pytest.mark.parametrize("b", [1, 4, 16], ids=lambda b: f"b{b}")
def test_whole_token_by_token_and_uneven_chunks_agree(b, share_qk):
    model = before_model(b, share_qk=share_qk)
    seq = delayed_input(model, model_codes(model, random_audio_codes(2, T, seed=1)))
    with torch.no_grad():
        reference, _ = model.forward_text(seq)
        results = {name: stream(model, seq, chunks) for name, chunks in patterns(T).items()}
    whole_out, whole_w = results["whole"]
    torch.testing.assert_close(whole_out, reference, rtol=1e-5, atol=1e-5)
    # float32: round-off accumulates over two TTT layers and 45 tokens (the float64 test below is tight).
    for name, (out, weights) in results.items():
        torch.testing.assert_close(out, whole_out, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        for layer, ws in weights.items():
            for w, w_ref in zip(ws, whole_w[layer], strict=True):
                torch.testing.assert_close(w, w_ref, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.allclose(whole_w[0][0][0], whole_w[0][0][1])  # the rows' fast weights moved differently


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_float64_agreement_is_tight(share_qk):
    model = ttt_model(4, dtype=torch.float64, layers="0,2", branch_input=BEFORE, share_qk=share_qk)
    seq = delayed_input(model, model_codes(model, random_audio_codes(2, T, seed=2)))
    with torch.no_grad():
        ref, ref_w = stream(model, seq, [T])
        out, w = stream(model, seq, [13, 1, 1, 1, 16, T - 32])
        tokens, tokens_w = stream(model, seq, [1] * T)
    for o, ws in ((out, w), (tokens, tokens_w)):
        torch.testing.assert_close(o, ref, rtol=1e-11, atol=1e-11)
        for layer in (0, 2):
            for a, b in zip(ws[layer], ref_w[layer], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_the_branch_reads_the_layer_input_not_the_attention_output():
    model = before_model(layers="1")
    layer, block = model.transformer.layers[1], ttt_blocks(model)[1]
    seen = {}
    layer.register_forward_pre_hook(lambda _m, a: seen.__setitem__("layer_in", a[0]))
    block.register_forward_pre_hook(lambda _m, a: seen.__setitem__("ttt_in", a[0]))
    seq = delayed_input(model, model_codes(model, random_audio_codes(1, 20, seed=2)))
    with torch.no_grad():
        model.forward_text(seq)
    torch.testing.assert_close(seen["ttt_in"], seen["layer_in"], rtol=0, atol=0)
    # The layer's self-attention block is attention and the gated TTT branch side by side.
    with torch.no_grad():
        x = seen["layer_in"]
        expected = StreamingTransformerLayer._sa_block(layer, x) + (block(x) - x)
        torch.testing.assert_close(layer._sa_block(x), expected, rtol=0, atol=0)


def test_zero_gate_gives_the_untouched_models_logits_exactly():
    base = tiny_lm(0)
    model = apply_ttt(copy.deepcopy(base), TTTConfig(layers="all", gating_alpha_init=0.0, branch_input=BEFORE))
    codes = model_codes(base, random_audio_codes(2, 40, seed=1))
    with torch.no_grad():
        a, b = base(codes), model(codes)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("b", [4, 16], ids=lambda b: f"b{b}")
def test_later_tokens_do_not_change_earlier_outputs(b):
    model = before_model(b, layers="all", alpha=1.0)
    codes = model_codes(model, random_audio_codes(1, 30, seed=4))
    changed = codes.clone()
    changed[:, 1:, 13:] = (changed[:, 1:, 13:] + 7) % model.card
    with torch.no_grad():
        out_a = model.forward_text(delayed_input(model, codes))[0]
        out_b = model.forward_text(delayed_input(model, changed))[0]
    torch.testing.assert_close(out_b[:, :14], out_a[:, :14], rtol=0, atol=0)
    assert not torch.equal(out_b[:, 14], out_a[:, 14])


def test_resetting_one_row_mid_stream_gives_it_a_fresh_stream():
    model = before_model(4)
    seq_a = delayed_input(model, model_codes(model, random_audio_codes(2, 30, seed=5)))
    seq_new = delayed_input(model, model_codes(model, random_audio_codes(1, 20, seed=6)))
    with torch.no_grad():
        with exact_streaming(model, 2, 10):
            full = torch.cat([model.forward_text(seq_a[:, :, s : s + 10])[0] for s in (0, 10, 20)], 1)
        with exact_streaming(model, 1, 10):
            fresh = torch.cat([model.forward_text(seq_new[:, :, s : s + 10])[0] for s in (0, 10)], 1)
        outs = []
        with exact_streaming(model, 2, 7):
            for s, n in ((0, 3), (3, 7)):
                model.forward_text(seq_a[:, :, s : s + n])
            model.reset_streaming(torch.tensor([True, False]))
            mixed = torch.cat([seq_new[:, :, :20], seq_a[1:, :, 10:30]], dim=0)
            for s, n in ((0, 5), (5, 1), (6, 7), (13, 7)):
                outs.append(model.forward_text(mixed[:, :, s : s + n])[0])
            assert ttt_states(model)[0].offset.tolist() == [20, 30]
    after = torch.cat(outs, 1)
    torch.testing.assert_close(after[0], fresh[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[1], full[1, 10:], rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_keeps_the_layout(tmp_path):
    model = before_model(4).eval()
    codes = model_codes(model, random_audio_codes(1, 24, seed=3))
    save(tmp_path / "ckpt", model, lm_config=tiny_lm_config())
    loaded = load(str(tmp_path / "ckpt")).model.eval()
    assert ttt_blocks(loaded)[0].cfg.branch_input == BEFORE
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes).logits, model(codes).logits, rtol=0, atol=0, equal_nan=True)
    # A config written before the field existed loads with the default layout.
    assert TTTConfig.from_dict({"layers": "1"}).branch_input == "after_attention"


@pytest.mark.parametrize("value", ["before", "", 2.5, None, ["before_attention"]])
def test_bad_branch_inputs_are_refused(value):
    with pytest.raises(ValueError, match="branch_input"):
        TTTConfig(branch_input=value)


def test_legacy_layout_has_no_before_attention_branch():
    with pytest.raises(ValueError, match="branch_input"):
        TTTConfig(legacy=LegacyConfig(), branch_input=BEFORE)
