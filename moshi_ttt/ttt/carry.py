"""Fast weights carried from one non-streaming forward to the next: training on consecutive chunks of a file.

Outside streaming every TTT forward starts from W_base. Inside `carry_ttt_state(model, carry)` each TTT block
starts from the FastWeightState that its previous forward ended with (detached: no backpropagation across chunks),
and rows marked by `carry.reset(mask)` restart from the *current* W_base, the live parameter, so that W_base still
receives gradients after a file boundary (an older fork reset to the random initial values instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from moshi.models.lm import LMModel

from .apply import ttt_blocks
from .layer import TTTBlock
from .ops import FastWeights
from .state import FastWeightState


@dataclass
class TTTCarry:
    """Per-layer end states of the last forward (detached) and the rows to restart at the next one."""

    states: dict[int, FastWeightState] = field(default_factory=dict)
    pending_reset: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B] bool

    @property
    def histories(self) -> dict[int, torch.Tensor]:
        """share_qk layers: the carried q/k history [B, K - 1, dim], by layer."""
        return {layer: s.history for layer, s in self.states.items() if s.history is not None}

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Rows where `mask` [B] is True (all rows if None) restart from the current W_base at their next forward."""
        if mask is None:
            self.states.clear()
            self.pending_reset.clear()
            return
        for layer in self.states:
            previous = self.pending_reset.get(layer)
            self.pending_reset[layer] = mask if previous is None else previous | mask

    def start(self, layer: int, base: FastWeights, history: torch.Tensor | None = None) -> FastWeightState:
        """Where a block's forward starts; `base` is W_base expanded to the batch (live, differentiable) and
        `history` the share_qk zero history (None without). Restarted rows take W_base and a zero history."""
        carried = self.states.get(layer)
        if carried is None:
            return FastWeightState.fresh(base, history)
        if carried.weights.W1.shape != base.W1.shape:
            raise ValueError(
                f"the carried TTT state has {carried.batch_size} rows but this forward has "
                f"{base.W1.shape[0]}; call carry.reset() when the batch changes"
            )
        mask = self.pending_reset.pop(layer, None)
        if mask is None:
            return carried
        mask = mask.to(base.W1.device)
        if bool((carried.position[mask] != 0).any()):
            raise ValueError(
                f"rows can restart only at a mini-batch boundary, but the carried state is "
                f"{carried.position.max().item()} tokens into a mini-batch; use chunk lengths that are multiples of "
                "mini_batch_size"
            )
        return carried.reset(mask, base)

    def store(self, layer: int, end: FastWeightState) -> None:
        self.states[layer] = end.detach()


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
