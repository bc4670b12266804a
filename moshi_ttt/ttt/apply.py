"""apply_ttt(): puts TTT blocks into the chosen layers of a moshi LMModel's temporal transformer."""

from __future__ import annotations

import logging
import typing as tp

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingTransformerLayer

from moshi_ttt.compat.moshi import LayerWithBranch, forget_streaming_children, streaming_state
from moshi_ttt.config import TTTConfig, parse_layers
from moshi_ttt.options import RunOptions
from moshi_ttt.ttt.inplace import inplace_blocks, inplace_states
from moshi_ttt.ttt.layer import TTTBlock, TTTState
from moshi_ttt.ttt.legacy import LegacyTTTBlock, set_legacy_contexts
from moshi_ttt.ttt.session import configure

logger = logging.getLogger(__name__)


class TTTTransformerLayer(LayerWithBranch):
    """moshi's layer with a TTT block between self-attention and the feed-forward.

    `apply_ttt` turns existing `StreamingTransformerLayer`s into this class in place, so the base weights keep
    their moshi names (`transformer.layers.N.self_attn...`) and the TTT parameters sit under
    `transformer.layers.N.ttt.`. Everything else (cross-attention, offsets, streaming) is moshi's own code.
    """

    ttt: TTTBlock | LegacyTTTBlock

    def after_self_attention(self, x_in: torch.Tensor, x_sa: torch.Tensor) -> torch.Tensor:
        if self.ttt.cfg.branch_input == "before_attention":
            # x + attn(x) + tanh(alpha) * TTT(norm(x)): the block returns its input plus the gated branch, so
            # subtracting x leaves the branch (exactly 0 with a zero gate).
            return x_sa + (self.ttt(x_in) - x_in)
        return self.ttt(x_sa)


def apply_ttt(model: LMModel, cfg: TTTConfig, *, device: torch.device | str | None = None) -> LMModel:
    """Wraps the layers named by `cfg.layers` of `model.transformer` with TTT blocks (docs/ARCHITECTURE.md contract).

    Args:
        model: a moshi LMModel; the depth transformer is left alone.
        cfg: where and how; `layers="none"` returns the model unchanged.
        device: where the new blocks are built; None: beside each layer's weights. "meta" builds them without
            memory or random initialisation, to be filled with `load_state_dict(..., assign=True)` (checkpoint
            loading, as moshi's own loader builds the LMModel) or `to_empty`.
    Returns:
        The same LMModel object, usable unchanged by moshi's LMGen, forward and streaming().
    Raises:
        TypeError: for a model that is not an LMModel or layers that are not moshi StreamingTransformerLayers.
        ValueError: if TTT is already applied, the model is streaming, or the layer spec does not fit the model.
    """
    if not isinstance(model, LMModel):
        raise TypeError(f"apply_ttt expects a moshi LMModel, got {type(model).__name__}")
    if model.is_streaming:
        raise ValueError("apply_ttt cannot change a model while it is streaming; leave streaming() first")
    layers = model.transformer.layers
    indices = parse_layers(cfg.layers, len(layers))
    if ttt_blocks(model):
        raise ValueError("TTT is already applied to this model")
    for i in indices:
        layer = layers[i]
        if type(layer) is not StreamingTransformerLayer:
            raise TypeError(f"layer {i} is a {type(layer).__name__}, expected moshi's StreamingTransformerLayer")
        if layer.skip_self_attn:
            raise ValueError(f"layer {i} has no self-attention to put a TTT block after")
    for i in indices:
        layer = layers[i]
        num_heads = cfg.num_heads or layer.self_attn.num_heads
        ref = layer.self_attn.in_projs[0].weight
        block_cls = (
            LegacyTTTBlock if cfg.legacy is not None else TTTBlock
        )  # legacy: older checkpoints, see ttt/legacy.py
        block = block_cls(model.dim, num_heads, cfg, device=ref.device if device is None else device, dtype=ref.dtype)
        layer.__class__ = TTTTransformerLayer
        layer.ttt = block
    if cfg.legacy is not None:
        set_legacy_contexts(model, indices, cfg)
    forget_streaming_children(model)  # moshi caches the streaming children on first use: it must see the new blocks
    logger.info("TTT applied to layers %s (mini_batch_size=%d)", indices, cfg.mini_batch_size)
    return model


def ttt_blocks(model: LMModel) -> dict[int, TTTBlock]:
    """The TTT blocks of `model.transformer`, by layer index."""
    return {i: layer.ttt for i, layer in enumerate(model.transformer.layers) if isinstance(layer, TTTTransformerLayer)}


def ttt_states(model: LMModel) -> dict[int, TTTState]:
    """The streaming states of the TTT blocks (the model must be streaming)."""
    states = {}
    for i, block in ttt_blocks(model).items():
        state = streaming_state(block)
        if state is None:
            raise ValueError("the model is not streaming: TTT states exist only inside streaming()")
        states[i] = state
    return states


def set_streaming_options(model: LMModel, options: RunOptions) -> None:
    """Puts one run's TTT options into the model's streaming session, right after entering streaming(); the model
    itself is not changed.

    Several users can share one model: each streaming session holds its own mini-batch size and resets
    (`state.session` of each TTT block, ttt/session.py). Persistence is the run's (RunOptions.resets): the layers'
    per-call reset of raw streaming is off, the reset period, if any, on.

    Raises:
        ValueError: naming the layer, for options its state refuses (ttt/session.configure).
    """
    if not isinstance(options, RunOptions):
        raise TypeError(f"options must be a moshi_ttt.RunOptions, got {type(options).__name__}")
    blocks = {**ttt_blocks(model), **inplace_blocks(model)}  # In-Place layers: their mini-batch is their chunk
    for layer, state in {**ttt_states(model), **inplace_states(model)}.items():
        block = blocks[layer]
        changes: dict[str, tp.Any] = {"persistent": True}
        if options.mini_batch_size is not None:
            changes["mini_batch_size"] = options.mini_batch_size
        try:
            changes["reset_every"] = options.resets(block.cfg.persistent_states, model.context)
            configure(state, **changes)
        except ValueError as err:
            raise ValueError(f"layer {layer}: {err}") from None
