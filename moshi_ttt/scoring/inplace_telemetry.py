"""What the In-Place fast weights did while scoring: per layer, batch row and chunk update (ttt/inplace.py).

Notation: B batch rows, U chunk updates recorded so far, d x h the fast weight w_down.

Recorded at every completed chunk (ttt/inplace_math.ChunkUpdate, reported through the session's InPlaceObserver):
- the raw update norm ||Delta W||_F, the clip factor min(1, tau / (||Delta W||_F + eps)), and the update the fast
  weight is meant to take, ||eta * clipped Delta W||_F;
- the step it really took, ||W_{i+1} - W_i||_F as float32 stores W, and the fraction of its entries that changed: an
  update below float32 resolution rounds back to W_i (step 0, nothing changed);
- the drift ||W - W0||_F after the update (absolute; over ||W0||_F relative), next to ||eta S||_F, the drift the
  updates add up to (S the sum of the clipped updates, kept apart in float32 as the fork does), and how far the
  stored drift is from it, ||(W - W0) - eta S||_F: near 0 when float32 keeps the updates, near ||eta S||_F when
  they round away (the few entries near 0 that do change then move by their own rounding, not along the update).
The numbers do not depend on how the sequence was chunked into calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moshi_ttt.ttt.inplace import InPlaceGating, InPlaceState
from moshi_ttt.ttt.inplace_math import ChunkUpdate

FIELDS = ("raw_norm", "clip_factor", "update_norm", "step_norm", "changed", "drift", "intended", "error")


@dataclass(frozen=True)
class InPlaceLayerTelemetry:
    """Telemetry of one In-Place layer; tensors are float32 on the CPU."""

    update_step: torch.Tensor  # [U] long: tokens read (from the start of the file) when each update happened
    raw_norm: torch.Tensor  # [B, U] ||Delta W||_F before the clip
    clip_factor: torch.Tensor  # [B, U]
    update_norm: torch.Tensor  # [B, U] ||eta * clipped Delta W||_F
    step_norm: torch.Tensor  # [B, U] ||W_{i+1} - W_i||_F as stored in float32
    changed: torch.Tensor  # [B, U] fraction of w_down's entries the step changed
    drift: torch.Tensor  # [B, U] ||W - W0||_F after the update
    intended: torch.Tensor  # [B, U] ||eta S||_F: the drift if float32 kept every update
    error: torch.Tensor  # [B, U] ||(W - W0) - eta S||_F: how far from that the stored drift is
    w0_norm: float  # ||W0||_F
    entries: int  # d * h
    lr: float
    clip: float | None
    chunk_size: int

    @property
    def resolution(self) -> float:
        """Half a float32 ulp at an entry of typical size ||W0||_F / sqrt(entries): a change below it rounds away."""
        return self.w0_norm / math.sqrt(self.entries) * 2.0**-24


class InPlaceRecorder:
    """Follows one In-Place layer through a streaming session (InPlaceObserver of ttt/session.py)."""

    def __init__(self, block: InPlaceGating, state: InPlaceState):
        self.block, self.state = block, state
        self.steps_read = 0  # tokens read in this session before the current part
        self.update_step: list[int] = []
        self.values: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS}
        self.pending: list[tuple[int, ChunkUpdate]] = []
        self.part_tokens = 0

    def read(self, tokens: int) -> None:
        self.steps_read += self.part_tokens
        self.part_tokens = tokens

    def chunk(self, update: ChunkUpdate) -> None:
        self.pending.append((self.steps_read + update.token + 1, update))

    def flush(self) -> None:
        """Moves the pending updates to the CPU in one copy."""
        if not self.pending:
            return
        steps, updates = zip(*self.pending, strict=True)
        self.pending = []
        stacked = torch.stack([torch.stack([getattr(u, f).float() for f in FIELDS]) for u in updates]).cpu()
        for u, step in enumerate(steps):  # stacked: [U, fields, B]
            self.update_step.append(step)
            for i, name in enumerate(FIELDS):
                self.values[name].append(stacked[u, i])

    def snapshot(self) -> InPlaceLayerTelemetry:
        self.flush()
        B = self.state.batch_size

        def stack(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(values, dim=1) if values else torch.zeros(B, 0)  # [B, U]

        w0 = self.block.w_down.detach()
        cfg = self.block.cfg
        return InPlaceLayerTelemetry(
            update_step=torch.tensor(self.update_step, dtype=torch.long),
            **{name: stack(values) for name, values in self.values.items()},
            w0_norm=float(torch.linalg.vector_norm(w0.float())),
            entries=w0.numel(),
            lr=cfg.lr,
            clip=cfg.clip,
            chunk_size=self.state.mini_batch_size,
        )
