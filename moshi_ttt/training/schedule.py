"""Learning-rate schedule of the outer loop: a linear warm-up, the peak held, then a cosine decay to 0.

One formula for every setting (0-based `step` of `steps` in all):

    lr(step) = base_lr * warmup(step) * decay(step)
    warmup(step) = min(1, (step + 1) / warmup_steps)                 (1 when warmup_steps is 0)
    decay(step)  = 1                                                 (decay "constant", or step < s0)
                 = 1/2 * (1 + cos(pi * (step - s0) / (steps - s0)))  (decay "cosine"), s0 = decay_start * steps

The warm-up and the hold both count from step 0 (they overlap). decay_start 0 is the plain cosine over all steps:
s0 = 0.0 gives `step / steps` exactly, the same floats. The demo assets' recipe (demo_assets/MANIFEST.md, J8):
warm-up 30 steps, the peak held for the first half of 1800 steps, then the cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

DECAYS = ("constant", "cosine")


@dataclass(frozen=True)
class LrSchedule:
    """Multipliers of each AdamW group's learning rate, step by step (the module docstring has the formula)."""

    warmup_steps: int = 0  # linear warm-up: factor (step + 1) / warmup_steps until it reaches 1; 0: none
    decay: Literal["constant", "cosine"] = "constant"  # after the hold: the peak lr to the end, or a cosine to 0
    decay_start: float = 0.0  # cosine only: the share of the steps held at the peak before the decay, in [0, 1)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if not 0.0 <= self.decay_start < 1.0:
            raise ValueError(f"decay_start must lie in [0, 1), got {self.decay_start}")
        if self.decay == "constant" and self.decay_start != 0.0:
            raise ValueError(f"decay_start {self.decay_start} needs decay 'cosine' (a constant lr has no decay)")

    def warmup_factor(self, step: int) -> float:
        """The warm-up's multiplier at 0-based `step`.

        Args:
            step: optimizer steps done before this one.
        Returns:
            min(1, (step + 1) / warmup_steps), or 1.0 without warm-up.
        """
        return 1.0 if self.warmup_steps == 0 else min(1.0, (step + 1) / self.warmup_steps)

    def decay_factor(self, step: int, steps: int) -> float:
        """The hold-then-cosine multiplier at 0-based `step` of `steps`.

        Args:
            step: optimizer steps done before this one.
            steps: the run's total optimizer steps.
        Returns:
            1.0 while held (or with decay "constant"), then the cosine from 1 towards 0.
        """
        if self.decay == "constant":
            return 1.0
        flat = self.decay_start * steps  # 0.0 gives step / steps below exactly: the plain cosine's floats
        return 1.0 if step < flat else 0.5 * (1 + math.cos(math.pi * (step - flat) / (steps - flat)))

    def lr(self, base_lr: float, step: int, steps: int) -> float:
        """The learning rate of a group whose peak is `base_lr`, at 0-based `step` of `steps`.

        Args:
            base_lr: the group's peak learning rate.
            step: optimizer steps done before this one.
            steps: the run's total optimizer steps.
        Returns:
            base_lr * warmup_factor(step) * decay_factor(step, steps), multiplied in that order (the float rounding
            the demo assets were trained with).
        """
        return base_lr * self.warmup_factor(step) * self.decay_factor(step, steps)
