"""Fast weights carried from one non-streaming forward to the next: training on consecutive chunks of a file.

Outside streaming every TTT forward starts from W_base. Inside `carry_ttt_state(model, carry)` each TTT block
starts from the state that its previous forward ended with (detached: no backpropagation across chunks), and rows
marked by `carry.reset(mask)` restart from the *current* W_base, the live parameter, so that W_base still receives
gradients after a file boundary (an older fork reset to the random initial values instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from moshi.models.lm import LMModel

from .apply import ttt_blocks
from .layer import TTTBlock
from .ops import FastWeights, InnerState


@dataclass
class TTTCarry:
    """Per-layer end states of the last forward (detached) and the rows to restart at the next one."""

    states: dict[int, InnerState] = field(default_factory=dict)
    pending_reset: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B] bool
    # share_qk blocks: the q/k projections of the last conv_kernel - 1 tokens (detached), layer -> [B, K - 1, dim]
    histories: dict[int, torch.Tensor] = field(default_factory=dict)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Rows where `mask` [B] is True (all rows if None) restart from the current W_base at their next forward."""
        if mask is None:
            self.states.clear()
            self.pending_reset.clear()
            self.histories.clear()
            return
        for layer in self.states:
            previous = self.pending_reset.get(layer)
            self.pending_reset[layer] = mask if previous is None else previous | mask

    def start(self, layer: int, base: FastWeights) -> tuple[InnerState, torch.Tensor | None]:
        """Where a block's forward starts, and its share_qk history (None: zeros); `base` is W_base expanded to
        the batch (live, differentiable). Restarted rows take W_base and a zero history."""
        carried = self.states.get(layer)
        if carried is None:
            return InnerState(base, None, 0), None
        if carried.weights.W1.shape != base.W1.shape:
            raise ValueError(
                f"the carried TTT state has {carried.weights.W1.shape[0]} rows but this forward has "
                f"{base.W1.shape[0]}; call carry.reset() when the batch changes"
            )
        history = self.histories.get(layer)
        mask = self.pending_reset.pop(layer, None)
        if mask is None:
            return carried, history
        mask = mask.to(base.W1.device)
        if carried.position != 0 and bool(mask.any()):
            raise ValueError(
                f"rows can restart only at a mini-batch boundary, but the carried state is {carried.position} "
                "tokens into a mini-batch; use chunk lengths that are multiples of mini_batch_size"
            )
        if history is not None:
            history = history.masked_fill(mask[:, None, None], 0.0)
        return InnerState(base.where(mask, carried.weights), carried.grad_sums, carried.position), history

    def store(self, layer: int, end: InnerState, history: torch.Tensor | None = None) -> None:
        sums = None if end.grad_sums is None else FastWeights(*(s.detach() for s in end.grad_sums))
        self.states[layer] = InnerState(FastWeights(*(w.detach() for w in end.weights)), sums, end.position)
        if history is not None:
            self.histories[layer] = history.detach().clone()  # a copy: the slice would keep its whole chunk alive


@contextmanager
def carry_ttt_state(model: LMModel, carry: TTTCarry) -> Iterator[TTTCarry]:
    """Inside this context the model's non-streaming forwards carry TTT state through `carry`.

    Example (training on consecutive chunks of the same files, one file per row):
        carry = TTTCarry()
        with carry_ttt_state(model, carry):
            for chunk, starts_new_file in chunks:
                carry.reset(starts_new_file)  # [B] bool
                loss = loss_fn(model(chunk)); loss.backward()
    """
    if model.is_streaming:
        raise ValueError("carry_ttt_state is for non-streaming forwards; streaming keeps its own TTT state")
    blocks = ttt_blocks(model)
    for layer, block in blocks.items():
        if not isinstance(block, TTTBlock):
            raise TypeError(f"layer {layer} has a {type(block).__name__}; carried state needs TTTBlock")
        if block.carry is not None:
            raise ValueError("this model is already inside carry_ttt_state")
    try:
        for layer, block in blocks.items():
            block.carry = (carry, layer)
        yield carry
    finally:
        for block in blocks.values():
            block.carry = None
