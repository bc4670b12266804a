"""Persistence has one definition (moshi_ttt/options.py): off, the fast weights go back to W_base every
`reset_every` tokens from the start of the file, so every mode and chunk size gives the same numbers."""

import pytest
import torch
from tiny_models import CONTEXT, random_audio_codes, tiny_lm
from tolerances import FLOAT32, FLOAT64_STORED

from moshi_ttt import (
    LegacyConfig,
    RunOptions,
    TTTConfig,
    apply_ttt,
    exact_streaming,
    score,
    set_streaming_options,
    ttt_states,
)
from moshi_ttt.compat.sequence import delayed_input, model_codes

T = 45  # past the 16-token attention window of the tiny models


def _model(dtype=torch.float32, **cfg):
    norm = "rms_norm" if dtype == torch.float64 else "rms_norm_f32"
    cfg = {"layers": "1,2", "mini_batch_size": 4, "gating_alpha_init": 0.5, "norm": norm, **cfg}
    return apply_ttt(tiny_lm(0, dtype=dtype, norm=norm), TTTConfig(**cfg)).eval()


@pytest.mark.parametrize("reset_every", [8, 6, 13], ids=["two-mini-batches", "mid-mini-batch", "odd"])
@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_a_reset_period_gives_the_same_losses_in_every_mode_and_chunking(reset_every, share_qk):
    model = _model(torch.float64, share_qk=share_qk)
    codes = random_audio_codes(2, T, seed=11)
    full = score(model, codes, "full", reset_every=reset_every).loss
    for mode, chunk in (("stream", None), ("chunked", 5), ("chunked", 8), ("chunked", CONTEXT)):
        other = score(model, codes, mode, chunk, reset_every=reset_every).loss
        torch.testing.assert_close(other, full, **FLOAT64_STORED, equal_nan=True, msg=f"{mode} {chunk}")
    persistent = score(model, codes, "full").loss
    assert not torch.allclose(full.nan_to_num(), persistent.nan_to_num())  # the resets change the numbers


def test_a_reset_restarts_the_inner_loop_exactly_at_the_period():
    """The resets sit at absolute positions: one call, chunks of any size, or one token at a time end with the same
    fast weights and the same count of tokens read since the last reset."""
    model = _model()
    seq = delayed_input(model, model_codes(model, random_audio_codes(1, 24, seed=3)))
    finals = []
    for chunks in ([24], [3, 9, 12], [1] * 24):
        with torch.no_grad(), exact_streaming(model.transformer, 1, max(chunks)):
            set_streaming_options(model, RunOptions(reset_every=10))
            start = 0
            for size in chunks:
                model.forward_text(seq[:, :, start : start + size])
                start += size
            state = ttt_states(model)[1]
            assert int(state.offset[0]) == 4  # 24 tokens: resets at 10 and 20, 4 read since
            finals.append([w.clone() for w in state.fast_weights])
    for other in finals[1:]:
        for a, b in zip(finals[0], other, strict=True):
            torch.testing.assert_close(a, b, **FLOAT32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_legacy_layers_keep_the_invariant_with_whole_mini_batch_periods(causal):
    model = _model(legacy=LegacyConfig(causal=causal))
    codes = random_audio_codes(1, 40, seed=4)
    full = score(model, codes, "full", reset_every=8).loss
    torch.testing.assert_close(score(model, codes, "chunked", 8, reset_every=8).loss, full, **FLOAT32, equal_nan=True)
    if causal:
        torch.testing.assert_close(score(model, codes, "stream", reset_every=8).loss, full, **FLOAT32, equal_nan=True)
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        score(model, codes, "full", reset_every=6)


def test_persistence_off_defaults_to_the_attention_context_and_the_checkpoint_decides_by_default():
    codes = random_audio_codes(1, T, seed=5)
    model = _model()
    by_context = score(model, codes, "chunked", persistent_states=False).loss
    torch.testing.assert_close(score(model, codes, "chunked", reset_every=CONTEXT).loss, by_context, rtol=0, atol=0,
                               equal_nan=True)  # fmt: skip
    # A checkpoint whose TTTConfig says persistent_states=False is scored with resets by default, in every mode.
    off = _model(persistent_states=False)
    torch.testing.assert_close(score(off, codes, "stream").loss, by_context, **FLOAT32, equal_nan=True)
    torch.testing.assert_close(score(off, codes, "full").loss, by_context, **FLOAT32, equal_nan=True)
    persistent = score(off, codes, "full", persistent_states=True).loss
    torch.testing.assert_close(persistent, score(model, codes, "full").loss, rtol=0, atol=0, equal_nan=True)


def test_periodic_resets_respect_moshis_exec_mask():
    model = _model(layers="1")
    seq = delayed_input(model, model_codes(model, random_audio_codes(2, 12, seed=7)))
    with torch.no_grad(), exact_streaming(model.transformer, 2, 4):
        set_streaming_options(model, RunOptions(reset_every=4))
        model.forward_text(seq[:, :, :4])
        state = ttt_states(model)[1]
        frozen = [w[0].clone() for w in state.fast_weights]
        model.transformer.set_exec_mask(torch.tensor([False, True]))
        model.forward_text(seq[:, :, 4:8])  # row 1 resets at 4 and reads 4 more; row 0 is frozen at offset 4
        assert state.exec_mask.tolist() == [False, True]
        assert state.offset.tolist() == [4, 4]
        for w, before in zip(state.fast_weights, frozen, strict=True):
            torch.testing.assert_close(w[0], before, rtol=0, atol=0)
