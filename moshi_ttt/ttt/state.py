"""The fast-weight state of one TTT layer as one value: what streaming holds, training carries and checkpoints save.

Notation: B batch rows, H heads, D head dim, F = 4D, K the share_qk convolution kernel.

A `FastWeightState` is immutable (a NamedTuple of tensors); `reset`, `detach` and `where` return new values.
moshi's streaming `TTTState` (ttt/layer.py) wraps one, the training carry (ttt/carry.py) stores one per layer and
the trainer saves it with `state_dict()`.
"""

from __future__ import annotations

import typing as tp

import torch

from moshi_ttt.ttt.weights import AnyWeights, FastWeights, LinearWeights


class FastWeightState(tp.NamedTuple):
    """Where the inner loop of one layer stands, one row per batch element (float32, float64 for float64 models)."""

    weights: AnyWeights  # W0 (FastWeights: TTT-MLP, LinearWeights: TTT-Linear) of each row's mini-batch [B, H, ...]
    grad_sums: AnyWeights  # sum_s lr_s grad l_s(W0) over the row's tokens of its current mini-batch (0 at a start)
    position: torch.Tensor  # [B] long: tokens of the current mini-batch already read, in [0, b)
    offset: torch.Tensor  # [B] long: tokens read since the last reset
    history: torch.Tensor | None  # share_qk: q/k projections of the last K - 1 tokens [B, K - 1, dim]; else None

    @classmethod
    def fresh(cls, base: AnyWeights, history: torch.Tensor | None = None) -> FastWeightState:
        """Every row at W_base (`base` [B, H, ...], kept as given: a live view stays differentiable), nothing
        read; `history`: a zero share_qk history [B, K - 1, dim] or None."""
        B, device = base.W1.shape[0], base.W1.device
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        return cls(base, base.zeros_like(), zeros, zeros.clone(), history)

    @property
    def batch_size(self) -> int:
        return self.weights.W1.shape[0]

    def where(self, mask: torch.Tensor, other: FastWeightState) -> FastWeightState:
        """Rows where `mask` [B] is True from self, the others from `other`."""
        history = None
        if self.history is not None:
            history = torch.where(mask[:, None, None], self.history, other.history)
        return FastWeightState(
            self.weights.where(mask, other.weights),
            self.grad_sums.where(mask, other.grad_sums),
            torch.where(mask, self.position, other.position),
            torch.where(mask, self.offset, other.offset),
            history,
        )

    def reset(self, mask: torch.Tensor, base: AnyWeights) -> FastWeightState:
        """Rows where `mask` [B] is True back to W_base (`base`, broadcastable to the weights), nothing read."""
        base = type(self.weights)(*(b.expand_as(w) for b, w in zip(base, self.weights, strict=True)))
        history = None if self.history is None else torch.zeros_like(self.history)
        return FastWeightState.fresh(base, history).where(mask, self)

    def detach(self) -> FastWeightState:
        """The same values out of any autograd graph (copies of the history: a slice would keep its chunk alive)."""
        return FastWeightState(
            type(self.weights)(*(w.detach() for w in self.weights)),
            type(self.grad_sums)(*(w.detach() for w in self.grad_sums)),
            self.position.detach(),
            self.offset.detach(),
            None if self.history is None else self.history.detach().clone(),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor (contiguous), for safetensors; `from_state_dict` reads it back."""
        names = self.weights._fields
        tensors = {f"weights.{n}": w.contiguous() for n, w in zip(names, self.weights, strict=True)}
        tensors.update({f"grad_sums.{n}": w.contiguous() for n, w in zip(names, self.grad_sums, strict=True)})
        tensors["position"], tensors["offset"] = self.position.contiguous(), self.offset.contiguous()
        if self.history is not None:
            tensors["history"] = self.history.contiguous()
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: tp.Mapping[str, torch.Tensor], device=None) -> FastWeightState:
        """The inverse of `state_dict` (TTT-MLP with weights.W2, else TTT-Linear). Raises ValueError naming the
        missing entries."""
        kind = FastWeights if "weights.W2" in tensors else LinearWeights
        needed = [f"{part}.{n}" for part in ("weights", "grad_sums") for n in kind._fields] + ["position", "offset"]
        missing = [k for k in needed if k not in tensors]
        if missing:
            raise ValueError(f"a saved fast-weight state lacks {missing}")

        def get(key: str) -> torch.Tensor:
            return tensors[key].to(device)

        return cls(
            kind(*(get(f"weights.{n}") for n in kind._fields)),
            kind(*(get(f"grad_sums.{n}") for n in kind._fields)),
            get("position").long(),
            get("offset").long(),
            get("history") if "history" in tensors else None,
        )
