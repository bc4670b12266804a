"""Configuration dataclasses. Frozen, with documented defaults; build new ones with `dataclasses.replace`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TARGET_MODES = ("difference", "legacy")


@dataclass(frozen=True)
class TTTConfig:
    """Where TTT layers go and how their inner loop runs.

    The defaults follow Sun et al. 2024 (arXiv 2407.04620) and ttt-lm-pytorch, with the gate of ttt-video-dit.
    """

    # Which layers of `model.transformer` get a TTT block: "all", "middle" (layers n//4 ... 3n//4 - 1),
    # "none", or a comma-separated list of indices such as "29,30,31".
    layers: str = "middle"
    # Tokens per inner-loop mini-batch b: the fast weights take one gradient step every b tokens.
    mini_batch_size: int = 16
    # Inner-loop learning rate; the per-token rate is base_lr * sigmoid(theta . x + b) / head_dim.
    base_lr: float = 1.0
    # Inside `streaming()`, keep the fast weights from one forward call to the next (False: every call starts
    # from W_base).
    persistent_states: bool = True
    # Initial value of the per-channel gate alpha in x + tanh(alpha) * TTT(norm(x)); 0 makes TTT a no-op.
    gating_alpha_init: float = 0.1
    # Number of TTT heads; None takes the transformer's number of attention heads.
    num_heads: int | None = None
    # moshi norm type (moshi.modules.transformer.create_norm_fn) applied before the TTT branch.
    norm: str = "rms_norm_f32"
    # Reconstruction target: "difference" = LN(XV - XK) (correct); "legacy" = LN(XV) - XK, the older bug, kept only
    # to evaluate checkpoints that were trained with it.
    target: str = "difference"
    # Std of the normal initialisation of W1 and W2 (biases start at zero), as in ttt-lm-pytorch.
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if self.base_lr < 0:
            raise ValueError(f"base_lr must be >= 0, got {self.base_lr}")
        if self.target not in TARGET_MODES:
            raise ValueError(f"target must be one of {TARGET_MODES}, got {self.target!r}")
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1 or None, got {self.num_heads}")
        parse_layers(self.layers, 1_000_000)  # validates the syntax; the range is checked against the model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TTTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TTTConfig fields: {unknown}")
        return cls(**data)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Turns a `TTTConfig.layers` spec into sorted layer indices for a transformer of `num_layers` layers.

    Raises:
        ValueError: for an unknown spec or an index outside [0, num_layers).
    """
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers))
    if spec == "middle":
        return list(range(num_layers // 4, 3 * num_layers // 4))
    if spec == "none":
        return []
    try:
        indices = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError as e:
        raise ValueError(f"TTT layers must be 'all', 'middle', 'none' or comma-separated integers, got {spec!r}") from e
    if not indices:
        raise ValueError(f"TTT layers spec {spec!r} names no layer")
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"TTT layers {bad} are out of range for a transformer with {num_layers} layers")
    return indices
