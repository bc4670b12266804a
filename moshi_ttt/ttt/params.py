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

from moshi_ttt.ttt.weights import AnyWeights


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
        if self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay}")
        if self.decay > 0 and self.w_base is None:
            raise ValueError("a decay toward W_base needs w_base")

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
