"""Configuration dataclasses. Frozen, with documented defaults; build new ones with `dataclasses.replace`."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from moshi_ttt.options import MAX_MINI_BATCH_SIZE  # the one cap, of runs and of configs

TARGET_MODES = ("difference", "legacy")
# moshi's norm types (moshi.modules.transformer.create_norm_fn, moshi 0.2.13).
NORMS = ("layer_norm", "layer_norm_f32", "rms_norm", "rms_norm_f32")
# The largest share_qk convolution (tokens; ttt-lm-pytorch uses 4): its weights and each row's history grow with it.
MAX_CONV_KERNEL = 256
INNER_MODELS = ("mlp", "linear")
BRANCH_INPUTS = ("after_attention", "before_attention")


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
    # Reconstruction target: "difference" = LN(XV - XK) (correct); "legacy" = the older fork's: XV - XK normalised
    # with the unbiased std + 1e-5 (ops.reconstruction_target), kept only to evaluate its checkpoints.
    target: str = "difference"
    # Std of the normal initialisation of W1 and W2 (biases start at zero), as in ttt-lm-pytorch.
    init_std: float = 0.02
    # ttt-lm-pytorch's `share_qk`: one projection makes both q and k, each through its own causal depthwise
    # convolution over the last `conv_kernel` tokens (`conv_q`, `conv_k`). Keys and queries can then look at
    # different tokens (the key of token t at token t-1, the query at token t), which is what recalling "what came
    # next last time" needs. False: separate q and k projections of the current token (wq, wk).
    share_qk: bool = False
    conv_kernel: int = 4
    # The inner model whose weights are the fast weights, the paper's two variants: "mlp" (TTT-MLP, f(x) =
    # gelu_tanh(x W1 + b1) W2 + b2 with a 4 * head_dim hidden layer) or "linear" (TTT-Linear, f(x) = x W1 + b1).
    inner: str = "mlp"
    # What the TTT branch reads. "after_attention": the residual stream after self-attention, x' = x + attn(x), then
    # x' + tanh(alpha) * TTT(norm(x')) (ttt-video-dit's layout). "before_attention": the layer's input, side by side
    # with self-attention, x + attn(x) + tanh(alpha) * TTT(norm(x)); in layer 0 that is the token embeddings, where
    # frames are distinct and the inner loop recalls a repeated passage (after attention the frames share most of
    # their features: research/probe_memory.py, demo_assets/MANIFEST.md).
    branch_input: str = "after_attention"
    # Decay of the fast weights toward W_base, lambda in [0, 1], applied at the end of every full mini-batch:
    # W0 <- W_base + (1 - lambda) (W0 - tau_b sum_s lr_s grad l_s(W0) - W_base), the forgetting gate of Titans
    # (Behrouz et al. 2024, arXiv 2501.00663, eq. 13) and gated delta rules (Yang et al. 2024, arXiv 2412.06464)
    # with W_base, not zero, as the point the weights forget toward. It bounds the drift over long inputs: with
    # updates of norm <= g, ||W0 - W_base|| <= g (1 - lambda) / lambda. A memory fades by (1 - lambda) per
    # mini-batch (half-life b ln 2 / lambda tokens). 0 (the default): no decay, the numbers of checkpoints without it.
    decay: float = 0.0
    # Legacy mode (moshi_ttt/ttt/legacy.py): reproduces checkpoints of the older moshi-finetune TTT fork, with the
    # options of `LegacyConfig`. None: our own TTT. Set by `moshi_ttt.data.checkpoints.load` for such checkpoints; never
    # needed for new models.
    legacy: LegacyConfig | None = None

    def __post_init__(self) -> None:
        # Every field is checked for its type too: a config.json is user input, and JSON "false" is a true string.
        _layers_spec(self.layers)  # the syntax; the range is checked against the model (`parse_layers`)
        _whole_number("TTTConfig mini_batch_size", self.mini_batch_size, maximum=MAX_MINI_BATCH_SIZE)
        for name in ("base_lr", "init_std", "gating_alpha_init"):
            _finite(f"TTTConfig {name}", getattr(self, name), minimum=None if name == "gating_alpha_init" else 0.0)
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("persistent_states", "share_qk"):
            _bool(f"TTTConfig {name}", getattr(self, name))
        if self.num_heads is not None:
            _whole_number("TTTConfig num_heads", self.num_heads)
        _whole_number("TTTConfig conv_kernel", self.conv_kernel, maximum=MAX_CONV_KERNEL)
        _choice("TTTConfig norm", self.norm, NORMS)
        _choice("TTTConfig target", self.target, TARGET_MODES)
        _choice("TTTConfig inner", self.inner, INNER_MODELS)
        _choice("TTTConfig branch_input", self.branch_input, BRANCH_INPUTS)
        decay = self.decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"TTTConfig decay must be a number in [0, 1], got {decay!r}")
        object.__setattr__(self, "decay", float(decay))
        if self.legacy is None:
            return
        if not isinstance(self.legacy, LegacyConfig):
            raise ValueError(f"TTTConfig legacy must be a LegacyConfig or None, got {self.legacy!r}")
        if self.inner != "mlp":
            raise ValueError("legacy TTT layers have an MLP inner model (mlp_layers), not inner='linear'")
        if self.branch_input != "after_attention":
            raise ValueError("branch_input 'before_attention' is not part of the legacy TTT layout")
        if self.decay > 0:
            raise ValueError("decay is not part of the legacy TTT layout")
        if self.share_qk:
            raise ValueError("share_qk is not part of the legacy TTT layout")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TTTConfig:
        """The inverse of `to_dict`. Also reads the older flat layout of saved configs, where the legacy options sat
        at the top level (`"legacy": true, "causal": false, "mlp_layers": 3, ...`)."""
        if not isinstance(data, dict):
            raise ValueError(f"a TTTConfig is read from a JSON object, got {type(data).__name__}")
        data = dict(data)
        legacy = data.get("legacy")
        if isinstance(legacy, bool):
            data["legacy"] = _legacy_from_flat(data)
        elif isinstance(legacy, dict):
            data["legacy"] = LegacyConfig.from_dict(legacy)
        elif legacy is not None:
            raise ValueError(f"TTTConfig field legacy must be an object, null or (older layout) a bool, got {legacy!r}")
        return _from_known_fields(cls, data)


def _from_known_fields(cls: type, data: dict):
    """cls(**data), refusing fields that `cls` does not have (naming them) instead of a TypeError."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**data)


def _int_option(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"LegacyConfig {name} must be an integer {bounds}, got {value!r}")


@dataclass(frozen=True)
class LegacyConfig:
    """The options of legacy mode (`TTTConfig.legacy`), which reproduces checkpoints of the older moshi-finetune TTT
    fork with its own math (moshi_ttt/ttt/legacy.py): gate x + tanh(clamp(alpha, -3, 3)) * TTT(x) without a
    pre-norm, L2-normalised q and k, per-token rate base_lr * sigmoid(.) / (head_dim * mini_batch_size) without the
    1/i factor, no output projection. `moshi_ttt.data.checkpoints.load` builds it from the fork's training config.
    """

    # False: every token of a mini-batch reads with the weights after the whole mini-batch's gradient step, so
    # later tokens leak into earlier outputs (what the older fork did; the loader sets False for its checkpoints
    # unless `legacy_causal=True`). True: each token uses only the gradients of itself and the earlier tokens.
    causal: bool = True
    # Layers of the inner MLP, 2 to 10 (the core TTT-MLP has 2).
    mlp_layers: int = 2
    # Hidden widths of the inner MLP (mlp_layers - 1 of them); None: 4 * head_dim each.
    mlp_hidden_dims: tuple[int, ...] | None = None
    # Rotary position embedding on q and k with positions modulo the mini-batch, with base rope_theta.
    use_rope: bool = False
    rope_theta: float = 10000.0
    # Attention context (tokens) of the TTT layers and of the other layers, as the older fork's `ttt_layer_context`
    # and `non_ttt_layer_context`; None keeps moshi's.
    ttt_layer_context: int | None = None
    non_ttt_layer_context: int | None = None

    def __post_init__(self) -> None:
        for name in ("causal", "use_rope"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LegacyConfig {name} must be true or false, got {getattr(self, name)!r}")
        _int_option("mlp_layers", self.mlp_layers, 2, 10)
        if self.mlp_hidden_dims is not None:
            if not isinstance(self.mlp_hidden_dims, (list, tuple)):
                raise ValueError(
                    f"LegacyConfig mlp_hidden_dims must be a list of widths or None, got {self.mlp_hidden_dims!r}"
                )
            for width in self.mlp_hidden_dims:
                _int_option("mlp_hidden_dims widths", width, 1)
            # JSON gives lists; keep the frozen config hashable.
            object.__setattr__(self, "mlp_hidden_dims", tuple(self.mlp_hidden_dims))
            if len(self.mlp_hidden_dims) != self.mlp_layers - 1:
                raise ValueError(
                    f"mlp_hidden_dims needs mlp_layers - 1 = {self.mlp_layers - 1} widths, got {self.mlp_hidden_dims}"
                )
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise ValueError(f"LegacyConfig rope_theta must be a finite number > 0, got {theta!r}")
        object.__setattr__(self, "rope_theta", float(theta))
        for name in ("ttt_layer_context", "non_ttt_layer_context"):
            if getattr(self, name) is not None:
                _int_option(name, getattr(self, name), 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LegacyConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a LegacyConfig is read from a JSON object, got {type(data).__name__}")
        return _from_known_fields(cls, data)


# Options of the older flat layout that now live in LegacyConfig, and the values a non-legacy config had for them.
_FLAT_LEGACY_DEFAULTS = {
    "causal": True,
    "mlp_layers": 2,
    "mlp_hidden_dims": None,
    "use_rope": False,
    "rope_theta": 10000.0,
    "ttt_layer_context": None,
    "non_ttt_layer_context": None,
}


def _legacy_from_flat(data: dict) -> LegacyConfig | None:
    """Pops the legacy options of an older flat TTTConfig dict (`data["legacy"]` a bool) into a LegacyConfig."""
    names = [f.name for f in dataclasses.fields(LegacyConfig)]
    flat = {name: data.pop(name) for name in names if name in data}
    if data["legacy"]:
        return LegacyConfig(**flat)
    used = sorted(name for name, value in flat.items() if value != _FLAT_LEGACY_DEFAULTS[name])
    if used:
        raise ValueError(f"TTTConfig options {used} exist only for legacy checkpoints (old layout: set legacy to true)")
    return None


LAYER_SPECS = ("all", "middle", "none")
_LAYER_INDEX = re.compile(r"[0-9]+")


def _layers_spec(spec: object) -> list[int] | None:
    """The indices a `TTTConfig.layers` spec lists, None for "all", "middle" and "none".

    Raises:
        ValueError: naming the spec, for anything but those words or comma-separated indices ("29, 30,31").
    """
    if isinstance(spec, str):
        spec = spec.strip()
        if spec in LAYER_SPECS:
            return None
        parts = [part.strip() for part in spec.split(",")]
        if all(_LAYER_INDEX.fullmatch(part) for part in parts):  # ASCII digits only: int() also takes "+1", "1_0"
            return sorted({int(part) for part in parts})
    raise ValueError(
        f"TTTConfig layers must be 'all', 'middle', 'none' or comma-separated layer indices such as '29,30,31', "
        f"got {spec!r}"
    )


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Turns a `TTTConfig.layers` spec into sorted layer indices for a transformer of `num_layers` layers.

    Raises:
        ValueError: for an unknown spec or an index outside [0, num_layers).
    """
    indices = _layers_spec(spec)
    if indices is None:
        n = num_layers
        return {"all": list(range(n)), "middle": list(range(n // 4, 3 * n // 4)), "none": []}[spec.strip()]
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"TTT layers {bad} are out of range for a transformer with {num_layers} layers")
    return indices


INPLACE_ACTIVATIONS = ("gelu", "silu")


@dataclass(frozen=True)
class InPlaceConfig:
    """In-Place TTT layers of the In-Place TTT fork's checkpoints (AlufRon/moshi_in_place; moshi_ttt/ttt/inplace.py).

    In each chosen layer of the temporal transformer the MLP's down-projection `w_down` [dim, hidden] is a fast
    weight: every `chunk_size` tokens it takes the clipped update Delta W = V_hat^T Z of the chunk, scaled by `lr`.
    `moshi_ttt.data.checkpoints.load` builds it from the fork's `ttt_config`.
    """

    # Indices of the TTT layers of `model.transformer`; the fork: start_layer + k * layer_frequency.
    layers: tuple[int, ...]
    # Tokens per update; chunks sit at absolute positions [i C, (i + 1) C) from the start of the file.
    chunk_size: int = 256
    # Learning rate eta of the update (the fork's ttt_config.learning_rate).
    lr: float = 1e-3
    # tau: Frobenius bound of each chunk's Delta W, applied before `lr`; None: no clip. 1e-5 is what the fork's
    # TTTGating runs with when ttt_config has no delta_clip_fro_norm, which is always the case for its training runs:
    # train.py and wrapped_model.py drop the YAML's delta_clip_fro_norm when they build ttt_config.
    clip: float | None = 1e-5
    # epsilon of the clip factor min(1, tau / (||Delta W||_F + epsilon)) (the fork's delta_clip_epsilon).
    clip_epsilon: float = 1e-12
    # Kernel of the causal convolution of the target over the token embeddings (sees the next K - 1 tokens).
    conv_kernel_size: int = 2
    # Gate of the TTT layers' MLP: "gelu" (erf) as the fork's TTT layers compute it (its layer's `activation`
    # argument, F.gelu), or "silu", stock moshi's gating for these models.
    activation: str = "gelu"
    # Keep the fast weights through the whole file (False: back to w_down every reset period of the run).
    persistent_states: bool = True

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"InPlaceConfig layers must be a non-empty list of layer indices, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        _whole_number("InPlaceConfig chunk_size", self.chunk_size)
        _whole_number("InPlaceConfig conv_kernel_size", self.conv_kernel_size)
        _finite("InPlaceConfig lr", self.lr, minimum=0.0)
        if self.clip is not None:
            _finite("InPlaceConfig clip", self.clip, minimum=0.0)
            if self.clip <= 0:
                raise ValueError(f"InPlaceConfig clip must be > 0 or None (no clip), got {self.clip!r}")
        _finite("InPlaceConfig clip_epsilon", self.clip_epsilon, minimum=0.0)
        if self.activation not in INPLACE_ACTIVATIONS:
            raise ValueError(f"InPlaceConfig activation must be one of {INPLACE_ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.persistent_states, bool):
            raise ValueError(f"InPlaceConfig persistent_states must be true or false, got {self.persistent_states!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


YARN_FREQUENCIES = ("float32", "bfloat16")


@dataclass(frozen=True)
class YarnConfig:
    """The In-Place TTT fork's YaRN rotary embedding (its moshi/modules/rope.py; moshi_ttt/ttt/fork_yarn.py), from
    its checkpoint's `yarn_config`, with how to run it."""

    scale: float  # context extension factor s (> 1; the fork turns YaRN off at s <= 1)
    original_max_seq_len: int = 3000
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0  # attention factor 0.1 mscale ln(s) + 1 (1 at mscale = 1), applied to the queries only
    mscale_all_dim: float = 0.0
    # dtype the inverse frequencies are rounded to: "float32" as the fork's inference (get_moshi_lm), "bfloat16" as
    # its training runs (wrapped_model.py casts them to the bfloat16 parameter dtype).
    frequencies: str = "float32"
    # Attention context times `scale`, as the fork's run_inference sets it; False keeps the checkpoint's context
    # (what its training runs used).
    extend_context: bool = True

    def __post_init__(self) -> None:
        _finite("YarnConfig scale", self.scale, minimum=0.0)
        if self.scale <= 1.0:
            raise ValueError(f"YarnConfig scale must be > 1 (the fork runs plain RoPE otherwise), got {self.scale!r}")
        _whole_number("YarnConfig original_max_seq_len", self.original_max_seq_len)
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            _finite(f"YarnConfig {name}", getattr(self, name), minimum=None)
        if self.beta_fast == self.beta_slow:
            raise ValueError("YarnConfig beta_fast and beta_slow must differ (the ramp divides by their difference)")
        if self.frequencies not in YARN_FREQUENCIES:
            raise ValueError(f"YarnConfig frequencies must be one of {YARN_FREQUENCIES}, got {self.frequencies!r}")
        if not isinstance(self.extend_context, bool):
            raise ValueError(f"YarnConfig extend_context must be true or false, got {self.extend_context!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _whole_number(name: str, value: object, maximum: int | None = None) -> None:
    # bool is an int in Python, and JSON true is not a number anyone meant (as RunOptions).
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum is not None and value > maximum):
        bounds = ">= 1" if maximum is None else f"in [1, {maximum}]"
        raise ValueError(f"{name} must be a whole number {bounds}, got {value!r}")


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _finite(name: str, value: object, minimum: float | None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
