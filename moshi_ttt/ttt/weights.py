"""Fast weights as values: one NamedTuple of tensors per inner model, the same operations on each.

Notation: B batch rows, H heads, D head dim, F = 4D hidden size of the TTT-MLP.
"""

from __future__ import annotations

import typing as tp

import torch

_W = tp.TypeVar("_W", bound=tuple)  # the weights' own type (typing.Self is Python 3.11+; we support 3.10)


class FastWeights(tp.NamedTuple):
    """Fast weights of the inner MLP, one set per batch row and head."""

    W1: torch.Tensor  # [B, H, D, F]
    b1: torch.Tensor  # [B, H, 1, F]
    W2: torch.Tensor  # [B, H, F, D]
    b2: torch.Tensor  # [B, H, 1, D]

    def to(self: _W, dtype: torch.dtype) -> _W:
        return type(self)(*(w.to(dtype) for w in self))

    def minus_scaled(self: _W, scale: torch.Tensor | float, other: _W) -> _W:
        """self - scale * other; `scale` broadcasts against [B, H, ., .]."""
        return type(self)(*(w - scale * o for w, o in zip(self, other, strict=True)))

    def plus(self: _W, other: _W) -> _W:
        return type(self)(*(w + o for w, o in zip(self, other, strict=True)))

    def where(self: _W, mask: torch.Tensor, other: _W) -> _W:
        """Rows where `mask` [B] is True from self, the others from `other`."""
        m = mask.view(-1, 1, 1, 1)
        return type(self)(*(torch.where(m, w, o) for w, o in zip(self, other, strict=True)))

    def zeros_like(self: _W) -> _W:
        return type(self)(*(torch.zeros_like(w) for w in self))

    def rows(self: _W, index: torch.Tensor) -> _W:
        return type(self)(*(w[index] for w in self))


class LinearWeights(tp.NamedTuple):
    """Fast weights of TTT-Linear, f(x) = x W1 + b1 per head (ttt-lm-pytorch's TTTLinear), same operations."""

    W1: torch.Tensor  # [B, H, D, D]
    b1: torch.Tensor  # [B, H, 1, D]

    to = FastWeights.to
    minus_scaled = FastWeights.minus_scaled
    plus = FastWeights.plus
    where = FastWeights.where
    zeros_like = FastWeights.zeros_like
    rows = FastWeights.rows


AnyWeights = FastWeights | LinearWeights
INNER_WEIGHTS = {"mlp": FastWeights, "linear": LinearWeights}
