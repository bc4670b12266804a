"""The TTT block: a moshi StreamingModule whose streaming state holds the fast weights.

The trained parameters (W_base and the rest) live on the module; the fast weights live in `TTTState`, one float32
row per batch element, and never become Parameters. Drift is `state.fast_weights - W_base`.
"""

from __future__ import annotations

import logging
import typing as tp
from dataclasses import dataclass

import torch
from einops import rearrange
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import create_norm_fn
from torch import nn

from moshi_ttt.compat.moshi import streaming_state
from moshi_ttt.config import TTTConfig
from moshi_ttt.ttt.inner_math import float32_inner, weight_drift
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.session import SessionOptions, SessionOptionsView, periodic_reset, reset_segments
from moshi_ttt.ttt.state import FastWeightState
from moshi_ttt.ttt.step import ttt_mlp_step
from moshi_ttt.ttt.weights import INNER_WEIGHTS, AnyWeights

logger = logging.getLogger(__name__)

# Parameters that stay float32 whatever dtype the model is moved to (see TTTBlock._apply).
FLOAT32_PARAMS = (
    "W1",
    "b1",
    "W2",
    "b2",
    "ttt_norm_weight",
    "ttt_norm_bias",
    "lr_weight",
    "lr_bias",
    "learnable_token_idx",
)


def keep_float32(param: torch.nn.Parameter, fn) -> torch.nn.Parameter:
    """Applies a module conversion `fn` to `param` for its device only, and for its dtype never below float32.

    `fn` is whatever `nn.Module._apply` was given: a cast (`.to(dtype)`, `.half()`), a move (`.to(device)`), or
    `to_empty`'s `empty_like(t, device=...)`. A conversion that keeps float32 runs as it is (so `to_empty` allocates
    without copying, as for every other parameter); one that would lower the dtype moves the values and keeps
    float32. A meta tensor holds no values: it gets fresh, uninitialised memory on the new device (what `to_empty`
    means), never a copy, which would raise "Cannot copy out of meta tensor".

    Returns:
        The parameter to keep: `param` itself with its new data, or, leaving the meta device (whose tensors cannot
        take real data in place), a new Parameter, as `nn.Module._apply` does.
    """
    probe = fn(torch.empty(0, device=param.device, dtype=param.dtype))
    dtype = torch.promote_types(probe.dtype, torch.float32)
    if probe.dtype == dtype:
        data = fn(param.data)
    elif param.is_meta:
        data = torch.empty_like(param.data, device=probe.device, dtype=dtype)
    else:
        data = param.data.to(device=probe.device, dtype=dtype)
    if data.is_meta != param.is_meta:
        return nn.Parameter(data, requires_grad=param.requires_grad)
    param.data = data
    return param


def apply_keeping_float32(module: nn.Module, super_apply, fn, recurse: bool, names: tp.Iterable[str]) -> nn.Module:
    """`nn.Module._apply` that leaves the named parameters in float32 (float64 allowed): `model.to(torch.bfloat16)`
    must not round the fast weights."""
    kept = {name: module._parameters.pop(name) for name in names if name in module._parameters}
    try:
        super_apply(fn, recurse)
    finally:
        for name, param in kept.items():
            module._parameters[name] = keep_float32(param, fn)
    return module


@dataclass
class TTTState(SessionOptionsView, State):
    """Streaming state of one TTT block: moshi's State around one FastWeightState (ttt/state.py), one row per batch
    element, float32 (float64 for a float64 model)."""

    fast: FastWeightState  # weights, grad sums, position, offset and share_qk history of every row
    # W_base [H, ...] for `reset`: detached views of the block's parameters (no copy; they follow in-place updates
    # such as an optimizer step or load_state_dict).
    base: AnyWeights
    session: SessionOptions  # this session's mini-batch size, persistence and observer (ttt/session.py)

    # Read-only names of the parts (telemetry, tests, callers of ttt_states).
    @property
    def fast_weights(self) -> AnyWeights:
        return self.fast.weights

    @property
    def grad_sums(self) -> AnyWeights:
        return self.fast.grad_sums

    @property
    def position(self) -> torch.Tensor:
        return self.fast.position

    @property
    def offset(self) -> torch.Tensor:
        return self.fast.offset

    @property
    def qk_history(self) -> torch.Tensor | None:
        return self.fast.history

    def base_weights(self, batch_size: int) -> AnyWeights:
        """W_base expanded to [batch_size, H, ...] (detached views)."""
        return type(self.base)(*(w.expand(batch_size, *w.shape) for w in self.base))

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        with torch.no_grad():
            self._copy_in(self.fast.reset(reset_mask, self.base))

    def write(self, new: FastWeightState) -> None:
        """Makes `new` the state: in place outside autograd, so that tensors captured by a CUDA graph (moshi's LMGen
        on GPU) see the new values; rebound (detached) while autograd may still need the old tensors."""
        if torch.is_grad_enabled():
            self.fast = new.detach()
        else:
            self._copy_in(new)

    def _copy_in(self, new: FastWeightState) -> None:
        for dst, src in zip((*self.fast.weights, *self.fast.grad_sums), (*new.weights, *new.grad_sums), strict=True):
            dst.copy_(src)
        self.fast.position.copy_(new.position)
        self.fast.offset.copy_(new.offset)
        if new.history is not None:
            self.fast.history.copy_(new.history)


class TTTBlock(StreamingModule[TTTState]):
    """x -> x + tanh(alpha) * W_o TTT(norm(x)), with TTT-MLP heads (ARCHITECTURE.md, "TTT block inside moshi").

    Args:
        dim: model width.
        num_heads: TTT heads H; head dim D = dim // H, inner hidden size 4D.
        cfg: TTTConfig (mini_batch_size, base_lr, persistent_states, gating_alpha_init, norm, target, init_std).
        device, dtype: of the projections, norm and gate; fast-weight parameters are always float32.
    """

    def __init__(self, dim: int, num_heads: int, cfg: TTTConfig, device=None, dtype=None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"model dim {dim} is not divisible by the {num_heads} TTT heads")
        self.cfg = cfg
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        H, D = num_heads, self.head_dim
        factory = {"device": device, "dtype": dtype}
        # Fast-weight parameters: float32, or float64 for a float64 model.
        f32 = {"device": device, "dtype": torch.promote_types(dtype or torch.float32, torch.float32)}

        self.norm = create_norm_fn(cfg.norm, dim, **factory)
        self.wq = nn.Linear(dim, dim, bias=True, **factory)
        if cfg.share_qk:
            # Depthwise causal convolutions over time of the shared projection (ttt-lm-pytorch's conv_q, conv_k).
            conv = {"kernel_size": cfg.conv_kernel, "groups": dim, "bias": True, **factory}
            self.conv_q = nn.Conv1d(dim, dim, **conv)
            self.conv_k = nn.Conv1d(dim, dim, **conv)
        else:
            self.wk = nn.Linear(dim, dim, bias=True, **factory)
        self.wv = nn.Linear(dim, dim, bias=True, **factory)
        self.wo = nn.Linear(dim, dim, bias=True, **factory)
        self.gating_alpha = nn.Parameter(torch.full((dim,), cfg.gating_alpha_init, **factory))
        # W_base: the initial fast weights, trained by the outer loop (ttt-lm-pytorch's initialisation).
        # TTT-Linear: W1 [H, D, D], b1 [H, 1, D]; TTT-MLP adds the hidden layer of 4D and W2, b2.
        self.weight_kind = INNER_WEIGHTS[cfg.inner]
        hidden = D if cfg.inner == "linear" else 4 * D
        self.W1 = nn.Parameter(torch.randn(H, D, hidden, **f32) * cfg.init_std)
        self.b1 = nn.Parameter(torch.zeros(H, 1, hidden, **f32))
        if cfg.inner == "mlp":
            self.W2 = nn.Parameter(torch.randn(H, 4 * D, D, **f32) * cfg.init_std)
            self.b2 = nn.Parameter(torch.zeros(H, 1, D, **f32))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, D, **f32))  # gamma of the per-head LayerNorm
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, D, **f32))  # beta
        # Learning-rate gate: lr_s = base_lr * sigmoid(theta_h . x_s + b_h) / D.
        self.lr_weight = nn.Parameter(torch.randn(H, dim, **f32) * cfg.init_std)
        self.lr_bias = nn.Parameter(torch.zeros(H, **f32))
        self.learnable_token_idx = nn.Parameter(torch.zeros(cfg.mini_batch_size, **f32))

    def init_qk_shift(self) -> None:
        """share_qk only: the convolutions start as a one-token shift, the query of token t its own projection and
        the key token t - 1's, so that the fast weights learn "what came next" and a query can recall it."""
        if not self.cfg.share_qk:
            raise ValueError("init_qk_shift needs a TTT block with share_qk")
        K = self.cfg.conv_kernel
        if K < 2:
            raise ValueError(f"a one-token shift needs conv_kernel >= 2, got {K}")
        with torch.no_grad():
            for conv, tap in ((self.conv_q, K - 1), (self.conv_k, K - 2)):
                conv.weight.zero_()
                conv.weight[:, 0, tap] = 1.0
                conv.bias.zero_()

    def _apply(self, fn, recurse=True):
        return apply_keeping_float32(self, super()._apply, fn, recurse, FLOAT32_PARAMS)

    def base_weights(self, batch_size: int) -> AnyWeights:
        """W_base expanded to [B, H, ...] (a view: gradients flow to the parameters)."""
        return self.weight_kind(*(p.expand(batch_size, *p.shape) for p in self.fast_weight_params()))

    def fast_weight_params(self) -> tuple[nn.Parameter, ...]:
        """W_base: (W1, b1, W2, b2) for TTT-MLP, (W1, b1) for TTT-Linear."""
        return tuple(getattr(self, name) for name in self.weight_kind._fields)

    def _init_streaming_state(self, batch_size: int) -> TTTState:
        base = self.weight_kind(*(p.detach() for p in self.fast_weight_params()))  # [H, ...] views
        weights = self.weight_kind(*(w.expand(batch_size, *w.shape).clone() for w in base))
        return TTTState(
            batch_size,
            self.W1.device,
            fast=FastWeightState.fresh(weights, self._zero_history(batch_size)),
            base=base,
            session=SessionOptions(self.cfg.mini_batch_size, self.cfg.persistent_states),
        )

    def _zero_history(self, batch_size: int) -> torch.Tensor | None:
        """share_qk: the q/k history before the first token, [B, conv_kernel - 1, dim] zeros; None without."""
        if not self.cfg.share_qk:
            return None
        dtype = torch.promote_types(self.wq.weight.dtype, torch.float32)
        return torch.zeros(batch_size, self.cfg.conv_kernel - 1, self.dim, device=self.W1.device, dtype=dtype)

    def _project(self, h: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """h [B, T, dim] -> xq, xk, xv [B, H, T, D], lr [B, H, T] in float32 (float64 for a float64 model), and
        (share_qk) the new q/k history [B, conv_kernel - 1, dim]; `history` is the previous one (None: zeros).

        The linear projections follow an enclosing autocast (mixed precision); what comes after them (the lr gate,
        the share_qk convolutions, the inner loop) runs in float32."""
        dtype = torch.promote_types(h.dtype, torch.float32)
        xq = self.wq(h).to(dtype)  # [B, T, dim]
        xk = None if self.cfg.share_qk else self.wk(h).to(dtype)
        xv = self.wv(h).to(dtype)
        return self._heads_and_rates(h.to(dtype), xq, xk, xv, history)

    @float32_inner
    def _heads_and_rates(self, h, xq, xk, xv, history: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """`_project` after the projections: h, xq, xv (and xk, None with share_qk) [B, T, dim] in float32."""
        H = self.num_heads
        heads = "b t (h d) -> b h t d"
        if self.cfg.share_qk:
            xq, xk, history = self._conv_qk(xq, history)
        xq, xk, xv = (rearrange(x, heads, h=H) for x in (xq, xk, xv))
        # [B, T, dim] . [H, dim] -> [B, H, T]
        gate = torch.einsum("bti,hi->bht", h, self.lr_weight.to(h.dtype)) + self.lr_bias.to(h.dtype)[None, :, None]
        lr = self.cfg.base_lr * torch.sigmoid(gate) / self.head_dim
        return xq, xk, xv, lr, history

    def _conv_qk(self, xqk: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Causal depthwise convolutions of xqk [B, T, dim] after `history` [B, K - 1, dim] (None: zeros).

        Written as a sum of K shifted products in a fixed order, so that any split of a sequence into calls gives
        the same numbers as one call."""
        K = self.cfg.conv_kernel
        if history is None:
            history = xqk.new_zeros(xqk.shape[0], K - 1, xqk.shape[2])
        padded = torch.cat([history.to(xqk.dtype), xqk], dim=1)  # [B, K - 1 + T, dim]
        T = xqk.shape[1]
        outs = []
        for conv in (self.conv_q, self.conv_k):
            weight = conv.weight.to(xqk.dtype)[:, 0]  # [dim, K]
            out = conv.bias.to(xqk.dtype).expand_as(xqk)
            for j in range(K):
                out = out + padded[:, j : j + T] * weight[:, j]
            outs.append(out)
        return outs[0], outs[1], padded[:, padded.shape[1] - (K - 1) :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] residual stream after self-attention; returns the same shape and dtype."""
        state = streaming_state(self)
        if state is None:
            # Outside streaming (training, plain `LMModel.forward`): every call starts from W_base. Training on
            # consecutive chunks carries state with `moshi_ttt.ttt.carry.carry_ttt_state`, which streams the blocks.
            xq, xk, xv, lr, _ = self._project(self.norm(x), None)
            start = FastWeightState.fresh(self.base_weights(x.shape[0]))
            out, _ = ttt_mlp_step(start, InnerInputs(xq, xk, xv, lr), self._inner_params(self.cfg.mini_batch_size))
        else:
            if not state.persistent:
                # Only the rows that run start again from W_base: rows frozen by moshi's exec_mask keep their state
                # (State.reset marks the rows it resets as executing, so resetting every row would unfreeze them).
                state.reset(state.exec_mask.clone())
            # A reset period (session.reset_every) cuts the call where rows reach it: same numbers as any other cut.
            parts = x.split(reset_segments(state, x.shape[1]), dim=1)
            out = torch.cat([self._read_part(state, part) for part in parts], dim=2)  # [B, H, T, D]
        y = self.wo(rearrange(out, "b h t d -> b t (h d)").to(x.dtype))  # [B, T, dim]
        return x + torch.tanh(self.gating_alpha).to(y.dtype) * y

    def _read_part(self, state: TTTState, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] of one part of a streaming call -> inner-loop outputs [B, H, T, D]."""
        periodic_reset(state)
        xq, xk, xv, lr, history = self._project(self.norm(x), state.fast.history)
        if state.session.observer is not None:
            state.session.observer.inputs(xk, xv)
        return self._forward_streaming(state, xq, xk, xv, lr, history)

    def _inner_params(self, mini_batch_size: int) -> InnerParams:
        # W_base [H, ...] for the decay: the live parameters (the outer loop's gradient reaches them through it too).
        w_base = self.weight_kind(*self.fast_weight_params()) if self.cfg.decay > 0 else None
        return InnerParams(
            self.ttt_norm_weight, self.ttt_norm_bias, mini_batch_size, self.learnable_token_idx, self.cfg.target,
            self.cfg.decay, w_base,
        )  # fmt: skip

    def _forward_streaming(self, state: TTTState, xq, xk, xv, lr, history: torch.Tensor | None) -> torch.Tensor:
        """One streaming call; `history` is the share_qk convolutions' new input history (None without them)."""
        B, _, T, _ = xq.shape
        params = self._inner_params(state.mini_batch_size)
        start = state.fast
        if torch.is_grad_enabled():
            # Rows that have read nothing since their reset hold W_base: read it from the live parameters, so that
            # the outer loop's gradient reaches W_base (training on carried chunks restarts files this way, from
            # W_base as it is now, not as it was at the reset).
            fresh = start.offset == 0  # [B]
            start = start._replace(weights=self.base_weights(B).where(fresh, start.weights))
        observer = state.session.observer
        on_update = None if observer is None else observer.update
        out, new = ttt_mlp_step(start, InnerInputs(xq, xk, xv, lr), params, on_update)
        new = new._replace(history=history)
        keep = state.exec_mask
        with torch.no_grad():  # the streaming state never joins an autograd graph
            # Chunks already synchronised with the host (position groups): skip the selection when every row runs.
            if T == 1 or not bool(keep.all()):
                new = new.where(keep, state.fast)
        state.write(new)
        return out

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, mini_batch_size={self.cfg.mini_batch_size}, "
            f"base_lr={self.cfg.base_lr}, target={self.cfg.target!r}, alpha_init={self.cfg.gating_alpha_init}, "
            f"inner={self.cfg.inner!r}" + (f", decay={self.cfg.decay}" if self.cfg.decay > 0 else "")
        )


def drift(state: TTTState) -> dict[str, torch.Tensor]:
    """||W - W_base||_F / ||W_base||_F per batch row for W1, b1, W2, b2 of the state's current fast weights
    (the absolute norm where W_base is exactly zero, as for the biases at initialisation)."""
    return weight_drift(state.fast.weights, state.base_weights(state.batch_size))
