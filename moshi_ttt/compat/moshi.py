"""Every use of moshi's internals (private names and undocumented structure), in one place, for moshi 0.2.13.

Each function here names the moshi code it depends on; `tests/test_moshi_compat.py` has one test per function that
fails loudly if a moshi release changes it. The rest of moshi_ttt uses moshi's public API only (LMModel.forward,
forward_text, forward_depformer_training, streaming(), get/set_streaming_state, LMGen, CheckpointInfo).
"""

from __future__ import annotations

import contextvars

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.models.lm_utils import _delay_sequence
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import (
    RingKVCache,
    StreamingMultiheadAttention,
    StreamingTransformer,
    StreamingTransformerLayer,
)


def streaming_state(module: StreamingModule) -> State | None:
    """The module's streaming state, None outside streaming (`StreamingModule._streaming_state`)."""
    return module._streaming_state


def forget_streaming_children(model: torch.nn.Module) -> None:
    """moshi caches each StreamingModule's list of streaming children on first use
    (`StreamingModule._cached_children`); after new streaming modules were added (apply_ttt) the lists must be
    rebuilt, or the new modules would never get a streaming state."""
    for module in model.modules():
        if isinstance(module, StreamingModule):
            module._cached_children = None


class LayerWithBranch(StreamingTransformerLayer):
    """moshi's transformer layer with a branch between self-attention and what follows it.

    `StreamingTransformerLayer.forward` runs `self._sa_block(x)` (self-attention with its residual), then the
    cross-attention and feed-forward blocks; overriding `_sa_block` is the one place to put a block in between
    while moshi's own forward, offsets and streaming stay untouched.
    """

    def after_self_attention(self, x_in: torch.Tensor, x_sa: torch.Tensor) -> torch.Tensor:
        """x_in: [B, T, dim] the layer's input; x_sa: the same after self-attention and its residual. Subclasses
        return the shape of x_sa."""
        raise NotImplementedError

    def _sa_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_self_attention(x, super()._sa_block(x))


def initial_token(model: LMModel) -> torch.Tensor:
    """[1, K, 1] long: the token moshi's LMModel.forward puts before the delayed codes (`_get_initial_token`)."""
    return model._get_initial_token()


def delay_sequence(delays: list[int], codes: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """codes [B, K, T] with stream k shifted right by delays[k], the first steps filled from initial [B, K, 1]:
    what LMModel.forward does before the transformer (`moshi.models.lm_utils._delay_sequence`)."""
    return _delay_sequence(delays, codes, initial)


def default_lm_kwargs() -> dict:
    """A copy of moshi's LMModel kwargs of Moshi 7B (moshiko), what `CheckpointInfo` assumes without a
    config.json (`moshi.models.loaders._lm_kwargs`)."""
    return dict(loaders._lm_kwargs)


def set_attention_context(attention: StreamingMultiheadAttention, context: int) -> None:
    """Sets the attention window of a self-attention outside streaming. moshi reads
    `StreamingMultiheadAttention.context` (a constructor argument kept as an attribute) both for the attention mask
    and for the size of the streaming KV cache it creates, so the two change together."""
    if streaming_state(attention) is not None:
        raise ValueError("the attention context cannot change while streaming")
    attention.context = context


def kv_cache_capacity(attention: StreamingMultiheadAttention) -> int | None:
    """Slots of the streaming self-attention's ring KV cache, None without one (or outside streaming).

    Reads `_MHAState.kv_cache` and `RingKVCache.cache` [2, B, H, capacity, D]."""
    state = streaming_state(attention)
    if state is None or state.kv_cache is None:
        return None
    return state.kv_cache.cache.shape[3]


def widen_kv_cache(attention: StreamingMultiheadAttention, capacity: int) -> None:
    """Replaces the streaming self-attention's ring KV cache by an empty one of `capacity` slots, with the same
    batch, heads, head dim, device, dtype and exec-mask behaviour; refused once tokens were written.

    The attention mask keeps reading `attention.context`, so a wider ring only keeps more keys than it needs.
    Depends on `_MHAState.kv_cache`, `RingKVCache(batch, heads, head_dim, capacity, respect_exec_mask, device,
    dtype)`, its `cache`, `end_offset` and `respect_exec_mask`.
    """
    state = streaming_state(attention)
    if state is None or state.kv_cache is None:
        raise ValueError("this attention has no streaming KV cache to widen (not streaming, or no context)")
    old = state.kv_cache
    if bool((old.end_offset > 0).any()):
        raise ValueError("widen_kv_caches must run before the first streaming forward")
    _, batch, heads, _, head_dim = old.cache.shape  # [2, B, H, capacity, D]
    state.kv_cache = RingKVCache(
        batch,
        heads,
        head_dim,
        capacity,
        respect_exec_mask=old.respect_exec_mask,
        device=old.cache.device,
        dtype=old.cache.dtype,
    )


# ---- The token embeddings X0 for feed-forwards that read them (In-Place TTT, ttt/inplace.py). ----

_TOKEN_EMBEDDINGS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "moshi_ttt_token_embeddings", default=None
)


class TransformerWithTokenEmbeddings(StreamingTransformer):
    """moshi's temporal transformer whose layers can read its input (`token_embeddings()`) during its forward.

    `LMModel.forward_text` passes the transformer the sum of the text and audio token embeddings (plus a
    conditioning sum, which In-Place models refuse), and moshi adds positional embeddings only inside
    `StreamingTransformer.forward`, so that input is X0, what the In-Place fork hands its TTT layers. A context
    variable carries it (per thread), so that nothing is stored on the modules.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        token = _TOKEN_EMBEDDINGS.set(x)
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            _TOKEN_EMBEDDINGS.reset(token)


def token_embeddings() -> torch.Tensor:
    """X0 [B, T, dim] of the running `TransformerWithTokenEmbeddings.forward`.

    Raises:
        RuntimeError: outside such a forward (e.g. in an activation-checkpointing recomputation).
    """
    x0 = _TOKEN_EMBEDDINGS.get()
    if x0 is None:
        raise RuntimeError("token embeddings are only available inside the forward of an In-Place model's transformer")
    return x0


class LayerWithTokenFeedForward(StreamingTransformerLayer):
    """moshi's layer whose feed-forward `gating(x, x0)` also reads the token embeddings X0.

    Mirrors `StreamingTransformerLayer._ff_block` for a layer with `gating` and without weights_per_step:
    norm2, the gating, layer_scale_2 and the residual; moshi's own forward, attention and offsets are untouched.
    """

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        x_orig = x
        update = self.gating(self.norm2(x), token_embeddings())
        return x_orig.to(update) + self.layer_scale_2(update)


def is_conditioned(model: LMModel) -> bool:
    """Whether the LM mixes conditions into its transformer input (`LMModel.condition_provider` and `fuser`)."""
    return model.condition_provider is not None or model.fuser is not None


def layer_gating(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The feed-forward MLP of a temporal-transformer layer (`StreamingTransformerLayer.gating`, a replacement put
    there by `feed_token_embeddings` included); None for a layer without one (moshi's plain feed-forward) or a module
    that is not moshi's layer."""
    return layer.gating if isinstance(layer, StreamingTransformerLayer) else None


def gated_mlp(layer: torch.nn.Module) -> ActivationGating | None:
    """The layer's MLP when it is moshi's single gated MLP (`ActivationGating`: linear_in, linear_out), else None."""
    gating = layer_gating(layer)
    return gating if isinstance(gating, ActivationGating) else None


def feed_token_embeddings(model: LMModel, layer: int, gating: torch.nn.Module) -> None:
    """Gives `model.transformer.layers[layer]` the feed-forward `gating(x, x0)` (replacing moshi's gating), and
    the transformer the X0 channel. Reads `StreamingTransformerLayer.gating` and `weights_per_step`.

    Raises:
        ValueError: for a layer without gating or with weights per step (no single MLP to replace).
    """
    target = model.transformer.layers[layer]
    if type(target) not in (StreamingTransformerLayer, LayerWithTokenFeedForward):
        raise ValueError(f"layer {layer} is a {type(target).__name__}, expected moshi's StreamingTransformerLayer")
    if target.gating is None or target.weights_per_step:
        raise ValueError(f"layer {layer} has no single gated MLP (gating, no weights per step) to make In-Place")
    if type(model.transformer) not in (StreamingTransformer, TransformerWithTokenEmbeddings):
        raise ValueError(f"the transformer is a {type(model.transformer).__name__}, expected moshi's")
    model.transformer.__class__ = TransformerWithTokenEmbeddings
    target.__class__ = LayerWithTokenFeedForward
    target.gating = gating


def set_model_context(model: LMModel, context: int) -> None:
    """Sets the attention window of the temporal transformer: `LMModel.context` (read by scoring) and every
    self-attention's `context` (its mask and streaming KV cache, see set_attention_context)."""
    model.context = context
    for layer in model.transformer.layers:
        set_attention_context(layer.self_attn, context)


def rotary(model: LMModel) -> torch.nn.Module | None:
    """The rotary embedding of the temporal transformer (`StreamingTransformer.rope`; None without rope)."""
    return model.transformer.rope


def set_rotary(model: LMModel, rope: torch.nn.Module) -> None:
    """Replaces the rotary embedding of the temporal transformer: `StreamingTransformer.rope`, which moshi shares
    with every layer's `StreamingMultiheadAttention.rope` and calls as `rope(q, k, offset, time_before_heads=False)`.

    Raises:
        ValueError: for a transformer without rope (sin or no positional embedding).
    """
    if model.transformer.rope is None:
        raise ValueError("the model's transformer has no rotary embedding to replace")
    model.transformer.rope = rope
    for layer in model.transformer.layers:
        layer.self_attn.rope = rope
