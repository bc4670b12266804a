"""In-Place TTT layers: the MLP's down-projection of chosen layers as a fast weight (the In-Place TTT fork).

Notation: B batch rows, T tokens, C chunk size, d model width, h MLP hidden width. The math is in
`inplace_math.py`; this module is the moshi module around it, with our guarantees. Paths are relative to the fork's
`moshi/moshi/moshi/` (AlufRon/moshi_in_place, d2e9475).

What the fork's TTT layer is (`modules/transformer.py` ~693-730, `modules/ttt_module.py` `TTTGating`): in layers
start_layer + k layer_frequency of the temporal transformer, moshi's gated MLP becomes x -> Z W_down^T with
Z = act(x W_gate) * (x W_up), `linear_in` frozen, `w_down` a float32 copy of the base `linear_out.weight` (or the
checkpoint's) that the In-Place update changes, and act = GELU (the layer's `activation` argument) where moshi's
gating uses SiLU, so these layers differ from the base even when the update does nothing.

What we run, in every scoring mode ("full", "chunked", "stream" give the same numbers):
- the fork's training path (`_parallel_ttt_update` over `_apply_conv1d_per_chunk`'s targets): chunks of C tokens
  at absolute positions from the start of the file; chunk i reads W0 + eta (clipped Delta W of the chunks before);
- one fast weight per batch row in the streaming state (the parameter `w_down` is never written), a fresh state per
  streaming session (per file), resets per row (moshi's reset_mask, the run's reset period), exec_mask respected.

The fork's eval/inference path (`_ttt_forward_inference`, ~203-269), documented here, not reproduced: each forward
call outputs Z w_down^T with w_down as it stands at the call's start; the call's Z and V_hat join a buffer, and each
full chunk of the buffer is replayed through the training path only to overwrite `w_down.data` in place. So its
numbers depend on how a sequence is cut into calls: one call over a whole file uses W0 for every token (no update
is ever read); one-token calls (moshi's LMGen) compute V_hat per call, with zero for the next token (the target never
sees x0_{t+1}), and read each update from the chunk after; other chunkings cut the convolution at call ends. The
state lives in `w_down` itself: it carries over across calls and files until `reset_ttt_state`, and a batch of more
than one row raises. Under LMGen on GPU the Python-side buffering runs only while CUDA graphs are captured, so the
update almost never runs (its own monitor log: 0 to 2 updates in 22,756 steps).
"""

from __future__ import annotations

import logging
import typing as tp
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.modules.streaming import State, StreamingModule
from torch import nn

from moshi_ttt.compat.moshi import (
    feed_token_embeddings,
    forget_streaming_children,
    gated_mlp,
    is_conditioned,
    layer_gating,
    streaming_state,
)
from moshi_ttt.config import InPlaceConfig
from moshi_ttt.ttt.inplace_math import InPlaceInner, InPlaceParams, inplace_read
from moshi_ttt.ttt.layer import apply_keeping_float32
from moshi_ttt.ttt.session import SessionOptions, SessionOptionsView, periodic_reset, reset_segments

logger = logging.getLogger(__name__)

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}


@dataclass
class InPlaceState(SessionOptionsView, State):
    """Streaming state of one In-Place layer, one row per batch element (float32 fast weight)."""

    w: torch.Tensor  # [B, d, h]: W_i = W0 + eta S_i, the weights the row's current chunk reads
    delta_sum: torch.Tensor  # [B, d, h]: S_i, the sum of the clipped updates since the row's reset
    z: torch.Tensor  # [B, C, h] float32: the first `position` entries hold Z of the row's current chunk
    x0: torch.Tensor  # [B, C, d]: their token embeddings
    position: torch.Tensor  # [B] long: tokens read of the current chunk
    offset: torch.Tensor  # [B] long: tokens read since the last reset
    w0: torch.Tensor  # [d, h]: a detached view of the layer's w_down (follows in-place changes of the parameter)
    session: SessionOptions  # this session's chunk size (its `mini_batch_size`), persistence and observer

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        rows = reset_mask.view(-1, 1, 1)
        self.w.copy_(torch.where(rows, self.w0.expand_as(self.w), self.w))
        self.delta_sum.masked_fill_(rows, 0.0)
        self.position.masked_fill_(reset_mask, 0)
        self.offset.masked_fill_(reset_mask, 0)


class _Conv(nn.Module):
    """Holder of the target convolution, so that its weight is named `conv1d.conv.weight` as in the fork."""

    def __init__(self, dim: int, kernel_size: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, bias=False, device=device, dtype=dtype)


class InPlaceTarget(nn.Module):
    """V_hat = W_target(Conv1d(X0)) (the fork's LMAlignedTargetGenerator); parameter names as the fork's."""

    def __init__(self, dim: int, kernel_size: int, device=None, dtype=None):
        super().__init__()
        self.conv1d = _Conv(dim, kernel_size, device=device, dtype=dtype)
        self.W_target = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)


class InPlaceGating(StreamingModule[InPlaceState]):
    """moshi's gated MLP with the fork's In-Place fast weight: x [B, T, d], x0 [B, T, d] -> Z W^T [B, T, d].

    Parameter names follow the fork's `TTTGating` (`linear_in.weight`, `w_down`, `target_generator.conv1d.conv.weight`,
    `target_generator.W_target.weight`), so its checkpoints map one to one; `w_down` [d, h] stays float32 whatever
    dtype the model is moved to. The base `linear_out` is not kept: `w_down` replaces it.
    """

    def __init__(self, linear_in: nn.Linear, w_down: torch.Tensor, cfg: InPlaceConfig):
        """Args:
        linear_in: the MLP's frozen input projection [2 h, d] (moshi's `linear_in`, kept as the module given).
        w_down: [d, h] the fast weight's starting value W0, stored as a float32 copy (float64 for float64).
        cfg: the inner loop's settings; the target generator is initialised as moshi initialises layers (load a
            checkpoint over it).
        """
        super().__init__()
        self.cfg = cfg
        self.dim, self.hidden = w_down.shape
        if tuple(linear_in.weight.shape) != (2 * self.hidden, self.dim):
            raise ValueError(f"linear_in {list(linear_in.weight.shape)} does not match w_down {list(w_down.shape)}")
        factory = {"device": linear_in.weight.device, "dtype": linear_in.weight.dtype}
        self.linear_in = linear_in
        f32 = torch.promote_types(w_down.dtype, torch.float32)
        self.w_down = nn.Parameter(w_down.detach().to(f32, copy=True), requires_grad=w_down.requires_grad)
        self.target_generator = InPlaceTarget(self.dim, cfg.conv_kernel_size, **factory)
        self.activation = ACTIVATIONS[cfg.activation]

    @classmethod
    def from_gating(cls, gating: nn.Module, cfg: InPlaceConfig) -> InPlaceGating:
        """The In-Place version of moshi's `ActivationGating`: its `linear_in` module reused, w_down a float32 copy
        of its `linear_out.weight`."""
        return cls(gating.linear_in, gating.linear_out.weight, cfg)

    def _apply(self, fn, recurse=True):
        return apply_keeping_float32(self, super()._apply, fn, recurse, ("w_down",))

    def params(self, chunk_size: int) -> InPlaceParams:
        return InPlaceParams(
            self.w_down,
            self.target_generator.conv1d.conv.weight,
            self.target_generator.W_target.weight,
            chunk_size,
            self.cfg.lr,
            self.cfg.clip,
            self.cfg.clip_epsilon,
        )

    def _init_streaming_state(self, batch_size: int) -> InPlaceState:
        w0 = self.w_down.detach()
        C, d, h = self.cfg.chunk_size, self.dim, self.hidden
        dtype = self.target_generator.W_target.weight.dtype
        return InPlaceState(
            batch_size,
            w0.device,
            w=w0.expand(batch_size, d, h).clone(),
            delta_sum=torch.zeros(batch_size, d, h, device=w0.device, dtype=w0.dtype),
            z=torch.zeros(batch_size, C, h, device=w0.device, dtype=w0.dtype),
            x0=torch.zeros(batch_size, C, d, device=w0.device, dtype=dtype),
            position=torch.zeros(batch_size, dtype=torch.long, device=w0.device),
            offset=torch.zeros(batch_size, dtype=torch.long, device=w0.device),
            w0=w0,
            session=SessionOptions(C, self.cfg.persistent_states),
        )

    def hidden_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Z = act(x W_gate) * (x W_up): x [B, T, d] -> [B, T, h], computed in x's dtype then float32 (the fork)."""
        B, T, _ = x.shape
        h = self.linear_in(x).view(B, T, 2, -1)  # [B, T, 2, h]
        return (self.activation(h[..., 0, :]) * h[..., 1, :]).to(self.w_down.dtype)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] the layer's normed residual stream; x0: [B, T, d] the token embeddings. -> [B, T, d]."""
        z = self.hidden_activations(x)
        x0 = x0.to(self.target_generator.W_target.weight.dtype)
        state = streaming_state(self)
        if state is None:  # outside streaming: every call starts at W0
            B = x.shape[0]
            fresh = InPlaceInner(
                self.w_down.expand(B, *self.w_down.shape), self.w_down.new_zeros(1, 1, 1), z[:, :0], x0[:, :0]
            )
            out, _ = inplace_read(fresh, z, x0, self.params(self.cfg.chunk_size))
        else:
            if not state.persistent:
                state.reset(state.exec_mask.clone())  # rows frozen by exec_mask keep their state
            sizes = reset_segments(state, x.shape[1])  # a reset period cuts the call where rows reach it
            parts = zip(z.split(sizes, dim=1), x0.split(sizes, dim=1), strict=True)
            out = torch.cat([self._read_part(state, zp, xp) for zp, xp in parts], dim=1)
        return out.to(x.dtype)

    def _read_part(self, state: InPlaceState, z: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """One part of a streaming call: z [B, T, h], x0 [B, T, d] -> out [B, T, d]; rows at the same position of
        their chunk run together, and only the rows of the exec_mask change their state."""
        periodic_reset(state)
        B, T, _ = z.shape
        C = state.mini_batch_size
        if state.z.shape[1] != C:  # the session's chunk size (configure allows it only before any token)
            state.z = state.z.new_zeros(B, C, state.z.shape[2])
            state.x0 = state.x0.new_zeros(B, C, state.x0.shape[2])
        groups: dict[int, list[int]] = {}
        for row, p in enumerate(state.position.tolist()):
            groups.setdefault(p, []).append(row)
        observer = state.session.observer
        if observer is not None:
            if len(groups) > 1:
                raise ValueError("In-Place telemetry needs every batch row at the same position of its chunk")
            observer.read(T)
        params = self.params(C)
        keep = state.exec_mask
        out = z.new_empty(B, T, self.dim)
        with torch.no_grad():
            for p, rows in groups.items():
                whole = len(rows) == B
                idx = slice(None) if whole else torch.tensor(rows, device=z.device)
                inner = InPlaceInner(state.w[idx], state.delta_sum[idx], state.z[idx, :p], state.x0[idx, :p])
                on_chunk = None if observer is None else observer.chunk
                out[idx], new = inplace_read(inner, z[idx], x0[idx], params, on_chunk)
                n = new.z.shape[1]
                if whole and bool(keep.all()):
                    run, sel = slice(None), slice(None)
                else:
                    idx = torch.arange(B, device=z.device) if whole else idx
                    run, sel = idx[keep[idx]], keep[idx]
                if new.w is not inner.w:  # a chunk completed
                    state.w[run] = new.w[sel]
                    state.delta_sum[run] = new.delta_sum[sel]
                state.z[run, :n] = new.z[sel]
                state.x0[run, :n] = new.x0[sel]
                state.position[run] = n
            state.offset.add_(torch.where(keep, T, 0))
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"IN-PLACE dim={self.dim}, hidden={self.hidden}, chunk_size={c.chunk_size}, lr={c.lr}, clip={c.clip}, "
            f"activation={c.activation!r}, conv_kernel_size={c.conv_kernel_size}"
        )


def apply_inplace(model: tp.Any, cfg: InPlaceConfig) -> tp.Any:
    """Makes the MLPs of layers `cfg.layers` of `model.transformer` In-Place layers (w_down from their linear_out).

    Args:
        model: a moshi LMModel without TTT blocks and without conditioning; not streaming.
        cfg: the layers and the inner loop's settings.
    Returns:
        The same LMModel, usable unchanged by `forward`, `streaming()` and scoring.
    Raises:
        ValueError: for a streaming or conditioned model, layers out of range, or layers without a single gated MLP.
    """
    if model.is_streaming:
        raise ValueError("apply_inplace cannot change a model while it is streaming; leave streaming() first")
    if is_conditioned(model):
        raise ValueError("In-Place layers read the token embeddings, which a conditioned model's transformer mixes")
    layers = model.transformer.layers
    bad = [i for i in cfg.layers if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"In-Place layers {bad} are out of range for a transformer with {len(layers)} layers")
    if inplace_blocks(model):
        raise ValueError("In-Place layers are already applied to this model")
    for i in cfg.layers:
        gating = gated_mlp(layers[i])
        if gating is None:
            raise ValueError(f"layer {i} has no single gated MLP (linear_in, linear_out) to make In-Place")
        feed_token_embeddings(model, i, InPlaceGating.from_gating(gating, cfg))
    forget_streaming_children(model)  # moshi caches the streaming children on first use
    logger.info("In-Place TTT applied to layers %s (chunk %d, lr %g, clip %s)", cfg.layers, cfg.chunk_size, cfg.lr,
                cfg.clip)  # fmt: skip
    return model


def inplace_blocks(model: tp.Any) -> dict[int, InPlaceGating]:
    """The In-Place layers' MLPs of `model.transformer`, by layer index."""
    layers = model.transformer.layers
    found = {i: layer_gating(layer) for i, layer in enumerate(layers)}
    return {i: gating for i, gating in found.items() if isinstance(gating, InPlaceGating)}


def inplace_states(model: tp.Any) -> dict[int, InPlaceState]:
    """The streaming states of the In-Place layers (the model must be streaming)."""
    states = {}
    for i, block in inplace_blocks(model).items():
        state = streaming_state(block)
        if state is None:
            raise ValueError("the model is not streaming: In-Place states exist only inside streaming()")
        states[i] = state
    return states
