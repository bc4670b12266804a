"""In-Place TTT math: the In-Place TTT fork's update of an MLP's down-projection, as pure functions.

Notation: B batch rows, T tokens, C chunk size, d model width, h MLP hidden width (w_down is [d, h]), K the
target convolution's kernel. Paths below are relative to the fork's `moshi/moshi/moshi/modules/`
(AlufRon/moshi_in_place, d2e9475), `ttt_module.py` `TTTGating`.

For a chunk i of C tokens, at absolute positions [i C, (i + 1) C) from the start of the file (the training path,
`_parallel_ttt_update` and `_apply_conv1d_per_chunk`):
- Z_t = act(x_t W_gate) * (x_t W_up) [h]: the MLP's hidden activations (linear_in frozen; act GELU in the fork);
- V_hat_t = W_target sum_k conv_k x0_{t+k} [d]: a convolution over X0, the summed text and audio token embeddings,
  padded with zeros after the chunk's last token, so V_hat_t mixes x0_t and the next K - 1 tokens of its chunk;
- Delta W_i = sum_{t in chunk i} V_hat_t Z_t^T [d, h], clipped: Delta W_i * min(1, tau / (||Delta W_i||_F + eps));
- S_i = sum_{j < i} clipped Delta W_j, a float32 running sum, and W_i = W0 + eta S_i, rounded to float32 once,
  as the fork adds its prefix sum to W0 (`W_eff_apply = W_init_bc + self.ttt_lr * S_apply`);
- token t of chunk i outputs Z_t W_i^T [d]. A trailing partial chunk reads W_i and updates nothing.
The update of chunk i needs only the tokens of chunk i, so it is causal: tokens are read one call at a time and
the chunk's update is taken when its last token arrives. Everything after linear_in runs in float32, as the fork.
"""

from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F


class InPlaceInner(tp.NamedTuple):
    """Where the inner loop of one In-Place layer stands, for rows that share their position p in the chunk."""

    w: torch.Tensor  # [B, d, h] float32: W_i = W0 + eta S_i, what the current chunk reads
    delta_sum: torch.Tensor  # [B, d, h] float32: S_i, the sum of the clipped updates of the chunks read
    z: torch.Tensor  # [B, p, h] float32: Z of the current chunk's tokens read so far
    x0: torch.Tensor  # [B, p, d] their token embeddings (the model's dtype)


class InPlaceParams(tp.NamedTuple):
    """The trained tensors and settings of one In-Place layer that its inner loop reads."""

    w0: torch.Tensor  # [d, h] float32: w_down, the fast weight at a reset
    conv_weight: torch.Tensor  # [d, d, K]: the target convolution (the fork's target_generator.conv1d.conv)
    target_weight: torch.Tensor  # [d, d]: W_target
    chunk_size: int
    lr: float
    clip: float | None
    clip_epsilon: float


class ChunkUpdate(tp.NamedTuple):
    """What one completed chunk did to the fast weight, per row (all [B] float32), for telemetry."""

    token: int  # index, in the call, of the chunk's last token
    raw_norm: torch.Tensor  # ||Delta W||_F before the clip
    clip_factor: torch.Tensor  # min(1, tau / (||Delta W||_F + eps)); 1 without a clip
    update_norm: torch.Tensor  # ||eta * clipped Delta W||_F: the step the fast weight is meant to take
    step_norm: torch.Tensor  # ||W_{i+1} - W_i||_F as float32 represents it (0: the step rounded away)
    changed: torch.Tensor  # fraction of the entries of W that the step changed
    drift: torch.Tensor  # ||W_{i+1} - W0||_F
    intended: torch.Tensor  # ||eta S_{i+1}||_F: the drift if W were stored exactly
    error: torch.Tensor  # ||(W_{i+1} - W0) - eta S_{i+1}||_F: how far float32 put the drift from the intended one


def chunk_target(x0: torch.Tensor, conv_weight: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """V_hat of one chunk: x0 [B, n, d] -> [B, n, d], the convolution padded with zeros after the chunk's last token,
    then W_target (the fork's CausalConv1D and LMAlignedTargetGenerator), in x0's dtype."""
    K = conv_weight.shape[-1]
    x = F.pad(x0.transpose(1, 2), (0, K - 1))  # [B, d, n + K - 1]
    conv = F.conv1d(x, conv_weight.to(x0.dtype)).transpose(1, 2)  # [B, n, d]
    return F.linear(conv, target_weight.to(x0.dtype))


def clip_update(delta: torch.Tensor, clip: float | None, epsilon: float) -> tuple[torch.Tensor, ...]:
    """Delta W [B, d, h] -> (clipped Delta W, ||Delta W||_F [B], clip factor [B]) as the fork's
    `_parallel_ttt_update`: factor min(1, tau / (||Delta W||_F + eps)), applied to the whole matrix."""
    norm = torch.linalg.vector_norm(delta.reshape(delta.shape[0], -1), dim=-1)  # [B]
    if clip is None:
        return delta, norm, torch.ones_like(norm)
    factor = (delta.new_tensor(clip) / (norm + delta.new_tensor(epsilon))).clamp(max=1.0)
    return delta * factor.view(-1, 1, 1), norm, factor


def _chunk_step(
    inner: InPlaceInner, params: InPlaceParams, token: int, observe: bool
) -> tuple[InPlaceInner, ChunkUpdate | None]:
    """The update at the end of a full chunk (inner.z holds its C tokens): the next chunk's W and S."""
    # [B, C, d] in the fast weight's dtype: float32 (the fork's), float64 for a float64 model
    v_hat = chunk_target(inner.x0, params.conv_weight, params.target_weight).to(inner.z.dtype)
    delta = torch.einsum("btd,bth->bdh", v_hat, inner.z)  # sum_t V_hat_t Z_t^T: [B, d, h]
    clipped, raw_norm, factor = clip_update(delta, params.clip, params.clip_epsilon)
    delta_sum = inner.delta_sum + clipped
    w = params.w0 + params.lr * delta_sum  # [d, h] + [B, d, h]: W0 + eta S, one float32 rounding
    report = None
    if observe:
        with torch.no_grad():
            flat = (w - inner.w).reshape(w.shape[0], -1)  # [B, d h]
            report = ChunkUpdate(
                token=token,
                raw_norm=raw_norm.detach(),
                clip_factor=factor.detach(),
                update_norm=torch.linalg.vector_norm((params.lr * clipped).reshape(w.shape[0], -1), dim=-1),
                step_norm=torch.linalg.vector_norm(flat, dim=-1),
                changed=(flat != 0).float().mean(dim=-1),
                drift=torch.linalg.vector_norm((w - params.w0).reshape(w.shape[0], -1), dim=-1),
                intended=torch.linalg.vector_norm((params.lr * delta_sum).reshape(w.shape[0], -1), dim=-1),
                error=torch.linalg.vector_norm(
                    ((w - params.w0) - params.lr * delta_sum).reshape(w.shape[0], -1), dim=-1
                ),
            )
    empty_z, empty_x0 = inner.z[:, :0], inner.x0[:, :0]
    return InPlaceInner(w, delta_sum, empty_z, empty_x0), report


def inplace_read(
    inner: InPlaceInner,
    z: torch.Tensor,
    x0: torch.Tensor,
    params: InPlaceParams,
    on_chunk: tp.Callable[[ChunkUpdate], None] | None = None,
) -> tuple[torch.Tensor, InPlaceInner]:
    """Reads T new tokens from `inner` (which may be inside a chunk) and returns their outputs and the new state.

    Args:
        inner: the rows' state, all at the same position p = inner.z.shape[1] < chunk_size.
        z: [B, T, h] the MLP's hidden activations of the new tokens (float32); x0: [B, T, d] their token embeddings.
        params: the layer's trained tensors and settings.
        on_chunk: called with a ChunkUpdate at every chunk the call completes (telemetry); None: nothing computed.
    Returns:
        out [B, T, d] float32 (Z_t W_i^T) and the state after the call: any chunk completed by it has updated W.
    """
    C = params.chunk_size
    p = inner.z.shape[1]
    if not 0 <= p < C:
        raise ValueError(f"an In-Place state holds {p} tokens of its chunk, expected fewer than the chunk size {C}")
    outs, start, T = [], 0, z.shape[1]
    while start < T:
        n = min(C - p, T - start)
        z_part, x0_part = z[:, start : start + n], x0[:, start : start + n]
        outs.append(torch.matmul(z_part, inner.w.transpose(-1, -2)))  # [B, n, h] @ [B, h, d] -> [B, n, d]
        inner = inner._replace(z=torch.cat([inner.z, z_part], dim=1), x0=torch.cat([inner.x0, x0_part], dim=1))
        p, start = p + n, start + n
        if p == C:
            inner, report = _chunk_step(inner, params, start - 1, on_chunk is not None)
            if report is not None:
                on_chunk(report)
            p = 0
    out = torch.cat(outs, dim=1) if outs else z.new_zeros(*z.shape[:2], inner.w.shape[1])
    return out, inner
