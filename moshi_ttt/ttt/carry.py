"""Fast weights carried from one non-streaming forward to the next: training on consecutive chunks of a file.

Outside streaming every TTT forward starts from W_base. Inside `carry_ttt_state(model, carry)` each TTT block
streams on its own (moshi's streaming state, opened at the block's first forward: nothing is set on the module)
and starts from the FastWeightState that its previous forward ended with (detached: no backpropagation across chunks),
and rows marked by `carry.reset(mask)` restart from the *current* W_base, the live parameter, so that W_base still
receives gradients after a file boundary (an older fork reset to the random initial values instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from moshi.models.lm import LMModel

from moshi_ttt.compat.moshi import streaming_state
from moshi_ttt.compat.streaming import start_streaming
from moshi_ttt.ttt.apply import ttt_blocks
from moshi_ttt.ttt.layer import TTTBlock, TTTState
from moshi_ttt.ttt.session import configure
from moshi_ttt.ttt.state import FastWeightState


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

    def _restart_pending(self, layer: int, state: TTTState) -> None:
        """Applies the rows marked by `reset` to a block's streaming state, before its next forward."""
        mask = self.pending_reset.pop(layer, None)
        if mask is None:
            return
        mask = mask.to(state.position.device)
        if bool((state.position[mask] != 0).any()):
            raise ValueError(
                f"rows can restart only at a mini-batch boundary, but the carried state is "
                f"{state.position.max().item()} tokens into a mini-batch; use chunk lengths that are multiples of "
                "mini_batch_size"
            )
        state.fast = state.fast.reset(mask, state.base)  # new tensors: the last forward's graph keeps its own


@contextmanager
def carry_ttt_state(model: LMModel, carry: TTTCarry) -> Iterator[TTTCarry]:
    """Inside this context the model's non-streaming forwards carry TTT state through `carry`.

    The TTT blocks (only they) stream: at its first forward each block opens a streaming session of that batch
    size from `carry.states`, and after every forward its state goes back into `carry.states` (detached). A row
    that restarts reads the live W_base (see TTTBlock._forward_streaming), so the outer loop trains it.

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
        if block.is_streaming:
            raise ValueError("this model is already inside carry_ttt_state (its TTT blocks are streaming)")
    with ExitStack() as stack:

        def before(layer: int, block: TTTBlock, args: tuple) -> None:
            batch = args[0].shape[0]
            state = streaming_state(block)
            if state is None:
                stack.enter_context(start_streaming(block, batch))
                state = streaming_state(block)
                configure(state, persistent=True)  # the carry's whole point, whatever the layer's option
                carried = carry.states.get(layer)
                if carried is not None:
                    if carried.batch_size != batch:
                        raise ValueError(
                            f"the carried TTT state has {carried.batch_size} rows but this forward has {batch}; "
                            "call carry.reset() when the batch changes"
                        )
                    state.fast = carried
            elif state.batch_size != batch:
                raise ValueError(
                    f"the carried TTT state has {state.batch_size} rows but this forward has {batch}; "
                    "call carry.reset() when the batch changes"
                )
            carry._restart_pending(layer, state)

        def after(layer: int, block: TTTBlock) -> None:
            carry.states[layer] = streaming_state(block).fast.detach()

        for layer, block in blocks.items():
            stack.callback(block.register_forward_pre_hook(lambda m, args, i=layer: before(i, m, args)).remove)
            stack.callback(block.register_forward_hook(lambda m, _args, _out, i=layer: after(i, m)).remove)
        yield carry
