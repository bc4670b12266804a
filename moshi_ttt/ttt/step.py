"""The inner loop on a FastWeightState: state in, (outputs, next state) out, rows at any positions.

Notation: B batch rows, H heads, T tokens, D head dim.

One token per row goes through the branch-free primal form (`ttt_mlp_token`, CUDA-graph safe: moshi's LMGen steps
one token at a time); chunks of T > 1 tokens through the dual form (`ttt_mlp_chunk`), the rows that sit at the same
position of their mini-batch together. Either way every row gets the numbers of one call over its whole sequence.
"""

from __future__ import annotations

import torch

from moshi_ttt.ttt.inner_math import UpdateHook
from moshi_ttt.ttt.ops import ttt_mlp_chunk
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.primal import ttt_mlp_token
from moshi_ttt.ttt.state import FastWeightState


def ttt_mlp_step(
    state: FastWeightState, inputs: InnerInputs, params: InnerParams, on_update: UpdateHook | None = None
) -> tuple[torch.Tensor, FastWeightState]:
    """Reads T tokens per row from `state` (titans' `forward(seq, state) -> (out, next_state)`).

    Args:
        state: where each row stands; its `history` is passed through unchanged (the caller owns the share_qk
            convolutions).
        inputs: xq, xk, xv [B, H, T, D]; lr [B, H, T] (before tau).
        params: the layer's LayerNorm [H, D], mini-batch size b, token_idx [b] or None, target mode.
        on_update: called as on_update(w_start, w_end) at every mini-batch the call completes, in both forms
            (telemetry; every row must then sit at the same position).
    Returns:
        out [B, H, T, D] (float32, float64 for float64 inputs) and the next state (offset advanced by T).
    """
    if inputs.xq.shape[2] != 1:
        return ttt_mlp_chunk(state, inputs, params, on_update)
    out, new = ttt_mlp_token(state, inputs, params)
    if on_update is not None:  # (a host sync, only with an observer: LMGen's CUDA graphs have none)
        done = state.position + 1 == params.mini_batch_size  # [B]: rows that completed their mini-batch
        if bool(done.all()):
            on_update(state.weights, new.weights)
        elif bool(done.any()):
            raise ValueError("update observers need every batch row at the same inner-loop position")
    return out, new
