"""What the TTT inner loop reads besides its state, as two values: a call's tokens and a layer's parameters.

Notation: B batch rows, H heads, T tokens, D head dim, b mini-batch size.

Every form of the loop (ops.py's dual form over a chunk, primal.py's one-token form, step.py's choice between them)
takes `(state, InnerInputs, InnerParams)`, so the argument list is written here once; the docs/ARCHITECTURE.md contract
functions `ttt_mlp` and `ttt_linear` keep their flat signatures and build the two values.
"""

from __future__ import annotations

import dataclasses
import typing as tp

import torch

from moshi_ttt.config import TARGET_MODES
from moshi_ttt.ttt.weights import AnyWeights, FastWeights, LinearWeights


class InnerInputs(tp.NamedTuple):
    """The tokens of one call, projected per head."""

    xq: torch.Tensor  # [B, H, T, D] queries: what each token reads with its fast weights
    xk: torch.Tensor  # [B, H, T, D] keys: the inner model's training inputs
    xv: torch.Tensor  # [B, H, T, D] values: its training targets are LN(v - k)
    lr: torch.Tensor  # [B, H, T] per-token inner learning rates lr_s, before the position factor tau

    def to(self, dtype: torch.dtype) -> InnerInputs:
        return InnerInputs(*(t.to(dtype) for t in self))

    def rows(self, index: torch.Tensor) -> InnerInputs:
        """The batch rows `index` [R] of every tensor."""
        return InnerInputs(*(t[index] for t in self))


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class InnerParams:
    """A layer's inner-loop parameters, the same for every token of a call: trained tensors and hyper-parameters."""

    ln_weight: torch.Tensor  # [H, D] gamma of the per-head LayerNorm (outputs and reconstruction target)
    ln_bias: torch.Tensor  # [H, D] beta
    mini_batch_size: int  # b: tokens per inner gradient step
    token_idx: torch.Tensor | None = None  # [b] learnable offsets of the position factors tau, or None (zeros)
    target: str = "difference"  # reconstruction target: "difference" (correct) or "legacy" (`reconstruction_target`)
    # Decay lambda of the fast weights toward W_base at the end of every full mini-batch (TTTConfig.decay):
    # W0 <- w_base + (1 - lambda) (W0 - tau_b S - w_base). 0: none (w_base unused).
    decay: float = 0.0
    w_base: AnyWeights | None = None  # W_base [H, ...] or [B, H, ...] (broadcast over rows); needed when decay > 0

    def __post_init__(self) -> None:
        # Cheap Python checks only (no host sync): a layer builds these at every forward call.
        b = self.mini_batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:  # bool is an int in Python
            raise ValueError(f"mini_batch_size must be a whole number >= 1, got {b!r}")
        for name in ("ln_weight", "ln_bias"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise ValueError(f"{name} must be a tensor [H, D], got {type(getattr(self, name)).__name__}")
        token_idx = self.token_idx
        if token_idx is not None and (not isinstance(token_idx, torch.Tensor) or token_idx.dim() != 1):
            got = list(token_idx.shape) if isinstance(token_idx, torch.Tensor) else type(token_idx).__name__
            raise ValueError(f"token_idx must be a 1-D tensor [b] of offsets or None, got {got}")
        if self.target not in TARGET_MODES:
            raise ValueError(f"target must be one of {TARGET_MODES}, got {self.target!r}")
        decay = self.decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        if self.decay > 0 and self.w_base is None:
            raise ValueError("a decay toward W_base needs w_base")
        if self.w_base is not None and not isinstance(self.w_base, (FastWeights, LinearWeights)):
            raise ValueError(f"w_base must be FastWeights or LinearWeights, got {type(self.w_base).__name__}")

    def to(self, dtype: torch.dtype) -> InnerParams:
        """The LayerNorm tensors and W_base in `dtype` (`position_factors` casts token_idx itself)."""
        w_base = None if self.w_base is None else self.w_base.to(dtype)
        return dataclasses.replace(
            self, ln_weight=self.ln_weight.to(dtype), ln_bias=self.ln_bias.to(dtype), w_base=w_base
        )

    def decayed(self, updated: AnyWeights) -> AnyWeights:
        """The weights that start the next mini-batch: `updated` (W0 - tau_b S, [B, H, ...]) moved toward W_base by
        the decay; `updated` itself without one."""
        if self.decay == 0:
            return updated
        keep = 1.0 - self.decay
        return type(updated)(*(wb + keep * (w - wb) for w, wb in zip(updated, self.w_base, strict=True)))
