"""The inner loop on a FastWeightState: state in, (outputs, next state) out, rows at any positions.

Notation: B batch rows, H heads, T tokens, D head dim.

One token per row goes through the branch-free primal form (`ttt_mlp_token`, CUDA-graph safe: moshi's LMGen steps
one token at a time); chunks of T > 1 tokens through the dual form (`ttt_mlp_chunk`), the rows that sit at the same
position of their mini-batch together. Either way every row gets the numbers of one call over its whole sequence.
"""

from __future__ import annotations

import logging

import torch

from moshi_ttt.ttt.inner_math import UpdateHook
from moshi_ttt.ttt.ops import ttt_mlp_chunk
from moshi_ttt.ttt.primal import ttt_mlp_token
from moshi_ttt.ttt.state import FastWeightState
from moshi_ttt.ttt.weights import InnerState

logger = logging.getLogger(__name__)


def ttt_mlp_step(
    state: FastWeightState,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mini_batch_size: int,
    token_idx: torch.Tensor | None = None,
    target: str = "difference",
    on_update: UpdateHook | None = None,
) -> tuple[torch.Tensor, FastWeightState]:
    """Reads T tokens per row from `state` (titans' `forward(seq, state) -> (out, next_state)`).

    Args:
        state: where each row stands; its `history` is passed through unchanged (the caller owns the share_qk
            convolutions).
        xq, xk, xv: [B, H, T, D]; lr: [B, H, T] (before tau); ln_weight, ln_bias: [H, D]; token_idx: [b] or None.
        on_update: called as on_update(w_start, w_end) at every mini-batch the call completes, in both forms
            (telemetry; every row must then sit at the same position).
    Returns:
        out [B, H, T, D] (float32, float64 for float64 inputs) and the next state (offset advanced by T).
    """
    T = xq.shape[2]
    kwargs = {"ln_weight": ln_weight, "ln_bias": ln_bias, "mini_batch_size": mini_batch_size, "token_idx": token_idx}
    kwargs["target"] = target
    if T == 1:
        out, weights, sums, position = ttt_mlp_token(
            state.weights, state.grad_sums, state.position, xq, xk, xv, lr, **kwargs
        )
        if on_update is not None:  # (a host sync, only with an observer: LMGen's CUDA graphs have none)
            done = state.position + 1 == mini_batch_size  # [B]: rows that completed their mini-batch
            if bool(done.all()):
                on_update(state.weights, weights)
            elif bool(done.any()):
                raise ValueError("update observers need every batch row at the same inner-loop position")
    else:
        out, weights, sums, position = _chunk_by_position(state, xq, xk, xv, lr, on_update, kwargs)
    return out, FastWeightState(weights, sums, position, state.offset + T, state.history)


def _chunk_by_position(state: FastWeightState, xq, xk, xv, lr, on_update, kwargs):
    """Chunks of T > 1 tokens: rows that sit at the same position of their mini-batch run together."""
    B = xq.shape[0]
    groups: dict[int, list[int]] = {}
    for row, p in enumerate(state.position.tolist()):
        groups.setdefault(p, []).append(row)
    if len(groups) > 1 and on_update is not None:
        raise ValueError("update observers need every batch row at the same inner-loop position")
    if len(groups) == 1:
        (p,) = groups
        start = InnerState(state.weights, state.grad_sums if p > 0 else None, p)
        out, end = ttt_mlp_chunk(start, xq, xk, xv, lr, on_update=on_update, **kwargs)
        sums = end.grad_sums if end.grad_sums is not None else end.weights.zeros_like()
        return out, end.weights, sums, torch.full_like(state.position, end.position)
    out = xq.new_empty(xq.shape)
    weights = type(state.weights)(*(w.clone() for w in state.weights))
    sums = type(state.grad_sums)(*(s.clone() for s in state.grad_sums))
    position = state.position.clone()
    for p, rows in groups.items():
        idx = torch.tensor(rows, device=xq.device)
        start = InnerState(state.weights.rows(idx), state.grad_sums.rows(idx) if p > 0 else None, p)
        o, end = ttt_mlp_chunk(start, xq[idx], xk[idx], xv[idx], lr[idx], **kwargs)
        out[idx] = o
        for dst, src in zip(weights, end.weights, strict=True):
            dst[idx] = src
        for dst, src in zip(sums, end.grad_sums or end.weights.zeros_like(), strict=True):
            dst[idx] = src
        position[idx] = end.position
    logger.debug("TTT chunk of %d rows ran in %d position groups", B, len(groups))
    return out, weights, sums, position
