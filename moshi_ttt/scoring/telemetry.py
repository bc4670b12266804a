"""What the fast weights did while scoring: drift from W_base and inner-loop losses, per TTT layer and batch row.

Notation: B batch rows, H heads, n tokens, D head dim, U mini-batch updates recorded so far.

Recorded at every completed inner-loop mini-batch (ARCHITECTURE.md, "Telemetry"; the four curves of ttt-lm-jax's TTT
stats):
- drift ||W - W_base||_F / ||W_base||_F of W1, b1, W2, b2 after the update (absolute norm where W_base is zero);
- the reconstruction loss l(W) = mean over heads and tokens of 1/2 |LN(f_W(k_s)) - target_s|^2 on the keys of that
  mini-batch, at W_base, at the mini-batch's start W0 and after its update;
- the variance of the target, mean over heads and tokens of 1/2 |E[Y] - Y_s|^2 with E[Y] the mean target of the
  mini-batch (per head): the loss of the best constant prediction, the scale of what there is to learn (ttt-lm-jax's
  `ssl_tgt_last_in_mini_batch_from_mean_mse`, there against the mean over the whole sequence, one token per
  mini-batch and the mean over D: here it stays causal and on the scale of the losses above).

The recorder only observes, as the session's observer of each block (ttt/session.py): `inputs` gets the keys and
values the block computed, and `update`, called by the inner loop itself in both forms (ttt/step.py), the weights
before and after each update. The numbers do not depend on how the sequence was chunked.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from moshi.models.lm import LMModel

from moshi_ttt.scoring.inplace_telemetry import InPlaceLayerTelemetry, InPlaceRecorder
from moshi_ttt.ttt.apply import ttt_blocks, ttt_states
from moshi_ttt.ttt.inner_math import head_layer_norm, inner_forward, reconstruction_target, weight_drift
from moshi_ttt.ttt.inplace import inplace_blocks, inplace_states
from moshi_ttt.ttt.layer import TTTBlock, TTTState
from moshi_ttt.ttt.session import configure
from moshi_ttt.ttt.weights import AnyWeights, FastWeights

logger = logging.getLogger(__name__)

WEIGHT_NAMES = FastWeights._fields  # ("W1", "b1", "W2", "b2"); TTT-Linear layers have W1 and b1 only
FLUSH_EVERY = 32  # pending updates computed together (bounds the memory held for them)


@dataclass(frozen=True)
class LayerTelemetry:
    """Telemetry of one TTT layer; tensors are float32 on the CPU."""

    update_step: torch.Tensor  # [U] long: transformer steps read when each update happened (a multiple of b)
    drift: dict[str, torch.Tensor]  # name -> [B, U], drift of W1, b1, W2, b2 after each update
    loss_base: torch.Tensor  # [B, U] inner loss of each mini-batch at W_base
    loss_start: torch.Tensor  # [B, U] ... at the mini-batch's start weights W0
    loss_after: torch.Tensor  # [B, U] ... after the mini-batch's update
    target_variance: torch.Tensor  # [B, U] mean_{h, s} 1/2 |E[Y] - Y_s|^2 over the mini-batch's targets Y
    final_drift: dict[str, torch.Tensor]  # name -> [B], drift of the fast weights at the end


@dataclass(frozen=True)
class Telemetry:
    """Per-layer telemetry of one scoring run (layer index -> LayerTelemetry)."""

    layers: dict[int, LayerTelemetry]
    mini_batch_size: int
    # In-Place TTT layers (checkpoints of the In-Place fork; inplace_telemetry.py), by layer index.
    inplace: dict[int, InPlaceLayerTelemetry] = field(default_factory=dict)


def reconstruction_loss(
    weights: AnyWeights, xk: torch.Tensor, target: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor
) -> torch.Tensor:
    """Inner-loop loss mean_{h, s} 1/2 |LN(f_W(k_s)) - target_s|^2 per batch row (Sun et al. 2024, eq. 1).

    Args:
        weights: AnyWeights [B, H, ...]; xk, target: [B, H, n, D]; ln_weight, ln_bias: [H, D].
    Returns:
        [B]
    """
    return _token_losses(weights, xk, target, ln_weight, ln_bias).mean(dim=(1, 2))  # [B, H, n] -> [B]


def _token_losses(weights: AnyWeights, xk, target, ln_weight, ln_bias) -> torch.Tensor:
    """1/2 |LN(f_W(k_s)) - target_s|^2 per row, head and token: [B, H, n]."""
    pred = head_layer_norm(inner_forward(weights, xk), ln_weight, ln_bias)  # [B, H, n, D]
    return 0.5 * (pred - target).pow(2).sum(dim=-1)


def target_variance(target: torch.Tensor) -> torch.Tensor:
    """mean over heads and tokens of 1/2 |E[Y] - Y_s|^2, E over the n tokens (per head). target: [B, H, n, D] ->
    [B]."""
    centred = target - target.mean(dim=2, keepdim=True)  # [B, H, n, D]
    return 0.5 * centred.pow(2).sum(dim=-1).mean(dim=(1, 2))


def _base_loss(base: AnyWeights, xk, target, ln_weight, ln_bias) -> torch.Tensor:
    """reconstruction_loss at the one W_base [1, H, ...] for many rows [R, H, n, D]: the rows are folded into the
    token axis, so that the weights are not copied R times. Returns [R]."""
    R, H, n, _ = xk.shape

    def fold(x: torch.Tensor) -> torch.Tensor:  # [R, H, n, D] -> [1, H, R n, D]
        return x.transpose(0, 1).reshape(1, H, R * n, x.shape[-1])

    tok = _token_losses(base, fold(xk), fold(target), ln_weight, ln_bias)  # [1, H, R n]
    return tok.view(H, R, n).mean(dim=(0, 2))


class _LayerRecorder:
    """Follows one TTT block through a streaming session (all batch rows at the same position)."""

    def __init__(self, block: TTTBlock, state: TTTState):
        self.block = block
        self.state = state
        # Keys and targets [B, H, buffered, D] read since the last completed mini-batch.
        self.keys: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.buffered = 0  # tokens in keys/targets
        self.buffer_start = 0  # transformer step of the first buffered token
        self.steps_read = 0  # transformer steps read so far in this session
        self.update_step: list[int] = []
        self.drift: dict[str, list[torch.Tensor]] = {name: [] for name in block.weight_kind._fields}
        self.loss_base: list[torch.Tensor] = []
        self.loss_start: list[torch.Tensor] = []
        self.loss_after: list[torch.Tensor] = []
        self.target_variance: list[torch.Tensor] = []
        # Updates not yet computed: (step, keys, targets, w_start, w_end); see `flush`.
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, AnyWeights, AnyWeights]] = []

    def inputs(self, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Observer.inputs (ttt/session.py): buffers the chunk's keys and targets [B, H, n, D], the block's own."""
        state, block = self.state, self.block
        target = reconstruction_target(xk, xv, block.ttt_norm_weight, block.ttt_norm_bias, block.cfg.target)
        positions = state.position.unique()
        if positions.numel() != 1:
            raise ValueError("telemetry needs every batch row at the same inner-loop position")
        position = int(positions[0])
        if bool((state.offset == 0).all()):  # a fresh inner loop: session start, per-call or periodic reset
            self.keys, self.targets, self.buffered, self.buffer_start = None, None, 0, self.steps_read
        if self.buffered != position:
            raise ValueError(f"telemetry lost track of the inner loop: {self.buffered} tokens buffered at {position}")
        if self.buffered == 0:
            self.keys, self.targets = xk, target
        else:  # one copy per call: on_update then takes views
            self.keys, self.targets = torch.cat([self.keys, xk], dim=2), torch.cat([self.targets, target], dim=2)
        self.buffered += xk.shape[2]
        self.steps_read += xk.shape[2]

    def update(self, w_start: AnyWeights, w_end: AnyWeights) -> None:
        """Observer.update: one mini-batch of b tokens completed; w_start are its W0, w_end the weights after it.

        The numbers are computed in batches (`flush`) every FLUSH_EVERY updates and at each snapshot,
        so that a chunk of many mini-batches costs a few batched ops instead of dozens per mini-batch. Weights
        that are the state's own tensors (changed in place by later calls) are copied first.
        """
        w_start, w_end = self._keep(w_start), self._keep(w_end)
        b = self.state.mini_batch_size
        keys, targets = self.keys, self.targets  # [B, H, buffered, D]
        self.keys, self.targets = keys[:, :, b:], targets[:, :, b:]
        self.buffered -= b
        self.buffer_start += b
        self.pending.append((self.buffer_start, keys[:, :, :b], targets[:, :, :b], w_start, w_end))
        if len(self.pending) >= FLUSH_EVERY:
            self.flush()

    def _keep(self, weights: AnyWeights) -> AnyWeights:
        own = self.state.fast_weights
        if any(w is o for w, o in zip(weights, own, strict=True)):
            return type(weights)(*(w.clone() for w in weights))
        return weights

    def flush(self) -> None:
        """Computes drift, the three inner losses and the target variance of the pending updates in one batched
        call."""
        if not self.pending:
            return
        steps, xks, tgts, starts, ends = zip(*self.pending, strict=True)
        self.pending = []
        xk, tgt = torch.cat(xks), torch.cat(tgts)  # [U * B, H, b, D]
        block = self.block
        ln = (block.ttt_norm_weight.to(xk.dtype), block.ttt_norm_bias.to(xk.dtype))
        B, U = self.state.batch_size, len(steps)
        base = self.state.base_weights(1).to(xk.dtype)  # [1, H, ...], broadcast over the U * B rows
        kind = type(starts[0])
        start = kind(*(torch.cat(ws).to(xk.dtype) for ws in zip(*starts, strict=True)))
        end = kind(*(torch.cat(ws).to(xk.dtype) for ws in zip(*ends, strict=True)))
        # [U B] each: at W_base, at W0, after the update; U updates of B rows each.
        losses = [_base_loss(base, xk, tgt, *ln), *(reconstruction_loss(w, xk, tgt, *ln) for w in (start, end))]
        losses.append(target_variance(tgt))
        drifts = weight_drift(end, base)  # name -> [U B]
        values = torch.cat([*losses, *drifts.values()]).float().cpu()  # one device-to-host copy
        n = U * B
        for u, step in enumerate(steps):
            rows = slice(u * B, (u + 1) * B)
            self.update_step.append(step)
            self.loss_base.append(values[:n][rows])
            self.loss_start.append(values[n : 2 * n][rows])
            self.loss_after.append(values[2 * n : 3 * n][rows])
            self.target_variance.append(values[3 * n : 4 * n][rows])
            for i, name in enumerate(drifts):
                self.drift[name].append(values[(4 + i) * n : (5 + i) * n][rows])

    def snapshot(self) -> LayerTelemetry:
        self.flush()
        B = self.state.batch_size

        def stack(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(values, dim=1) if values else torch.zeros(B, 0)  # [B, U]

        state = self.state
        final = weight_drift(state.fast_weights, state.base_weights(B).to(state.fast_weights.W1.dtype))
        return LayerTelemetry(
            update_step=torch.tensor(self.update_step, dtype=torch.long),
            drift={name: stack(values) for name, values in self.drift.items()},
            loss_base=stack(self.loss_base),
            loss_start=stack(self.loss_start),
            loss_after=stack(self.loss_after),
            target_variance=stack(self.target_variance),
            final_drift={name: value.float().cpu() for name, value in final.items()},
        )


class TelemetryRecorder:
    """Records telemetry of every TTT layer of a model during one streaming session (see `record`)."""

    def __init__(self, model: LMModel):
        blocks, states = ttt_blocks(model), ttt_states(model)
        # Legacy blocks (older checkpoints, ttt/legacy.py) keep another state layout: no telemetry for them.
        self.layers = {i: _LayerRecorder(b, states[i]) for i, b in blocks.items() if isinstance(b, TTTBlock)}
        if len(self.layers) < len(blocks):
            logger.info("no telemetry for the %d legacy TTT layers", len(blocks) - len(self.layers))
        states = inplace_states(model)
        self.inplace = {i: InPlaceRecorder(b, states[i]) for i, b in inplace_blocks(model).items()}

    def snapshot(self) -> Telemetry:
        """The telemetry so far (copies: later steps do not change it)."""
        sizes = {rec.state.mini_batch_size for rec in self.layers.values()}
        return Telemetry(
            layers={i: rec.snapshot() for i, rec in self.layers.items()},
            mini_batch_size=sizes.pop() if len(sizes) == 1 else 0,
            inplace={i: rec.snapshot() for i, rec in self.inplace.items()},
        )


@contextmanager
def record(model: LMModel):
    """Inside a streaming session of `model.transformer`: hooks that record telemetry until the block exits.

    The observers are removed from the states on exit, so a shared model is left as it was.

    Yields:
        TelemetryRecorder; call `snapshot()` for the numbers.
    """
    recorder = TelemetryRecorder(model)
    observed = [*recorder.layers.values(), *recorder.inplace.values()]
    try:
        for rec in observed:
            # Observers of this session's own states: a shared model may run other sessions between this one's
            # steps (the app swaps streaming states in and out), and theirs have none.
            configure(rec.state, observer=rec)
        yield recorder
    finally:
        for rec in observed:
            configure(rec.state, observer=None)
