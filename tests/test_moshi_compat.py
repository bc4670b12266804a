"""One test per use of moshi internals (moshi_ttt/moshi_compat.py): each fails loudly if a moshi release changes it."""

import pytest
import torch
from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import State
from moshi.modules.transformer import StreamingMultiheadAttention, StreamingTransformerLayer
from tiny_models import CONTEXT, random_audio_codes, tiny_lm, tiny_lm_config

from moshi_ttt.compat import moshi as moshi_compat
from moshi_ttt.compat.sequence import delayed_input, model_codes


def first_attention(model: LMModel) -> StreamingMultiheadAttention:
    return model.transformer.layers[0].self_attn


def test_streaming_state_is_the_state_inside_streaming_and_none_outside():
    model = tiny_lm(0)
    attention = first_attention(model)
    assert moshi_compat.streaming_state(attention) is None
    with model.streaming(2):
        state = moshi_compat.streaming_state(attention)
        assert isinstance(state, State) and state.batch_size == 2
        # The same object moshi's public API hands out.
        assert model.transformer.get_streaming_state()["layers.0.self_attn"] is state
    assert moshi_compat.streaming_state(attention) is None


def test_streaming_children_are_cached_and_forgetting_the_cache_shows_new_modules():
    model = tiny_lm(0)
    with model.streaming(1):
        pass  # moshi builds its cached lists of streaming children here
    layer = model.transformer.layers[1]
    layer.extra = StreamingMultiheadAttention(model.dim, 2, causal=True, context=4, device="cpu")
    with model.streaming(1):
        assert moshi_compat.streaming_state(layer.extra) is None  # moshi still uses its cached list ...
    moshi_compat.forget_streaming_children(model)
    with model.streaming(1):
        assert moshi_compat.streaming_state(layer.extra) is not None  # ... until it is forgotten


def test_layer_with_branch_runs_the_branch_on_the_layer_input_and_self_attention_output_once():
    class Recording(moshi_compat.LayerWithBranch):
        def after_self_attention(self, x_in, x_sa):
            self.seen.append((x_in, x_sa))
            return x_sa + 1.0

    model = tiny_lm(0)
    layer = model.transformer.layers[1]
    x = torch.randn(2, 5, model.dim)
    with torch.no_grad():
        plain = layer(x)
        expected_branch_input = StreamingTransformerLayer._sa_block(layer, x)
        layer.__class__ = Recording
        layer.seen = []
        out = layer(x)
    assert len(layer.seen) == 1
    torch.testing.assert_close(layer.seen[0][0], x, rtol=0, atol=0)
    torch.testing.assert_close(layer.seen[0][1], expected_branch_input, rtol=0, atol=0)
    # The branch's output is what the feed-forward block reads: +1 before it changes the layer's output.
    torch.testing.assert_close(out, layer._ff_block(expected_branch_input + 1.0), rtol=0, atol=0)
    assert not torch.allclose(out, plain)


def test_initial_token_is_moshi_forwards_first_input():
    model = tiny_lm(0)
    initial = moshi_compat.initial_token(model)
    assert initial.shape == (1, model.num_codebooks, 1) and initial.dtype == torch.long
    assert initial[0, 0, 0] == model.text_initial_token_id
    assert bool((initial[0, 1:, 0] == model.initial_token_id).all())


def test_delay_sequence_shifts_each_stream_by_its_delay():
    model = tiny_lm(0)
    codes = model_codes(model, random_audio_codes(1, 6, seed=1))  # [1, 9, 6]
    initial = moshi_compat.initial_token(model)
    delayed = moshi_compat.delay_sequence(model.delays, codes, initial)
    assert delayed.shape == codes.shape
    for k, d in enumerate(model.delays):
        assert torch.equal(delayed[0, k, d:], codes[0, k, : codes.shape[-1] - d])
        assert bool((delayed[0, k, :d] == initial[0, k, 0]).all())


def test_default_lm_kwargs_are_moshi_7b_and_a_copy():
    kwargs = moshi_compat.default_lm_kwargs()
    assert {"dim", "num_heads", "num_layers", "delays", "n_q", "dep_q", "card", "text_card", "context"} <= set(kwargs)
    assert kwargs["dim"] == 4096 and kwargs["n_q"] == 16 and kwargs["dep_q"] == 8 and kwargs["context"] == 3000
    kwargs["dim"] = 1
    assert moshi_compat.default_lm_kwargs()["dim"] == 4096


def test_ring_kv_cache_holds_context_slots_and_can_be_widened_before_the_first_token():
    """ARCHITECTURE.md, Scoring: moshi's ring cache has exactly `context` slots; exact chunked streaming widens it."""
    model = tiny_lm(0)
    attention = first_attention(model)
    assert moshi_compat.kv_cache_capacity(attention) is None  # not streaming
    with model.streaming(2):
        assert moshi_compat.kv_cache_capacity(attention) == attention.context == CONTEXT
        old = moshi_compat.streaming_state(attention).kv_cache
        moshi_compat.widen_kv_cache(attention, CONTEXT + 6)
        new = moshi_compat.streaming_state(attention).kv_cache
        assert moshi_compat.kv_cache_capacity(attention) == CONTEXT + 6
        assert new.cache.dtype == old.cache.dtype and new.respect_exec_mask == old.respect_exec_mask
        seq = torch.zeros(2, model.num_codebooks, 3, dtype=torch.long)
        with torch.no_grad():
            model.forward_text(seq)
        assert bool((new.end_offset == 3).all())  # moshi writes into the cache we gave it
        with pytest.raises(ValueError, match="before the first streaming forward"):
            moshi_compat.widen_kv_cache(attention, CONTEXT + 8)


def test_set_attention_context_changes_the_mask_and_the_streaming_cache_together():
    """A model whose attention window was set afterwards equals one built with that window: in its non-streaming
    forward (the mask) and in streaming (the ring cache has the new number of slots)."""
    new_context = CONTEXT // 2
    built = tiny_lm(0, context=new_context)
    changed = tiny_lm(0)
    for layer in changed.transformer.layers:
        moshi_compat.set_attention_context(layer.self_attn, new_context)
    seq = model_codes(built, random_audio_codes(1, 2 * CONTEXT, seed=3))
    with torch.no_grad():
        torch.testing.assert_close(changed(seq).logits, built(seq).logits, rtol=0, atol=0, equal_nan=True)
        assert not torch.allclose(tiny_lm(0)(seq).logits, built(seq).logits)
    with changed.streaming(1):
        assert moshi_compat.kv_cache_capacity(first_attention(changed)) == new_context
        with pytest.raises(ValueError, match="while streaming"):
            moshi_compat.set_attention_context(first_attention(changed), CONTEXT)


class _PlainGating(torch.nn.Module):
    """moshi's gating behind the (x, x0) call of LayerWithTokenFeedForward; records the x0 it was given."""

    def __init__(self, gating: torch.nn.Module):
        super().__init__()
        self.inner = gating
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        self.seen.append(x0)
        return self.inner(x)


def test_layers_with_a_token_feed_forward_read_the_summed_embeddings_and_match_moshi():
    """TransformerWithTokenEmbeddings hands its layers LMModel.forward_text's transformer input, the sum of the text
    and audio embeddings; LayerWithTokenFeedForward's _ff_block is moshi's (same outputs, bit for bit)."""
    model = tiny_lm(0)
    codes = model_codes(model, random_audio_codes(2, 9))  # [B, 1 + 8, T]
    with torch.no_grad():
        expected = model(codes).logits
        gating = _PlainGating(model.transformer.layers[1].gating)
        moshi_compat.feed_token_embeddings(model, 1, gating)
        got = model(codes).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    delayed = delayed_input(model, codes)  # what LMModel.forward passes forward_text
    summed = model.text_emb(delayed[:, 0]) + sum(model.emb[k](delayed[:, 1 + k]) for k in range(8))
    torch.testing.assert_close(gating.seen[0], summed)
    with pytest.raises(RuntimeError, match="only available inside"):
        moshi_compat.token_embeddings()


def test_set_model_context_and_set_rotary_reach_every_layer():
    model = tiny_lm(0)
    moshi_compat.set_model_context(model, 2 * CONTEXT)
    assert model.context == 2 * CONTEXT
    assert {layer.self_attn.context for layer in model.transformer.layers} == {2 * CONTEXT}
    rope = type(model.transformer.rope)(interleave=True, max_period=100.0)
    moshi_compat.set_rotary(model, rope)
    assert model.transformer.rope is rope and all(layer.self_attn.rope is rope for layer in model.transformer.layers)
    with pytest.raises(ValueError, match="no rotary embedding"):
        moshi_compat.set_rotary(tiny_lm(0, positional_embedding="sin"), rope)


def test_layer_gating_and_gated_mlp_read_moshis_feed_forward_and_is_conditioned_its_conditions():
    """`StreamingTransformerLayer.gating` is moshi's ActivationGating for a gated LM, None for a plain feed-forward;
    `LMModel.condition_provider` / `fuser` are None for an unconditioned LM."""
    model = tiny_lm(0)
    layer = model.transformer.layers[0]
    assert isinstance(moshi_compat.layer_gating(layer), ActivationGating)
    assert moshi_compat.gated_mlp(layer) is layer.gating
    assert moshi_compat.layer_gating(torch.nn.Linear(2, 2)) is None  # not moshi's layer
    replaced = _PlainGating(layer.gating)
    moshi_compat.feed_token_embeddings(model, 0, replaced)
    assert moshi_compat.layer_gating(model.transformer.layers[0]) is replaced  # a replacement is still its MLP
    assert moshi_compat.gated_mlp(model.transformer.layers[0]) is None  # but not moshi's gated MLP
    plain = LMModel(**{**tiny_lm_config(), "gating": "none"}).transformer.layers[0]
    assert moshi_compat.layer_gating(plain) is None and moshi_compat.gated_mlp(plain) is None
    assert moshi_compat.is_conditioned(model) is False
