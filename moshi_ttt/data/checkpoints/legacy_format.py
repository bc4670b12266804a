"""The older TTT layout of the moshi-finetune TTT fork, mapped to our names and loaded in legacy mode.

A checkpoint directory (`.../consolidated/`) holds `lora.safetensors` (trained tensors only) or
`consolidated.safetensors` (everything), `config.json` (moshi LM config) and `training_config.json` (its `ttt`
section). Tensors of TTT layer N sit under `transformer.layers.N.seq_modeling_block.`:
`ttt_layer.ttt.{wq,wk,wv,wo}.{weight,bias}`, `ttt_layer.ttt.post_norm.*`, `ttt_layer.ttt.learnable_ttt_lr_weight`
[H,1,dim], `ttt_layer.ttt.learnable_ttt_lr_bias` [H,1], `ttt_layer.ttt.ttt_norm_{weight,bias}` [H,HD],
`ttt_layer.ttt.{W1,b1,W2,b2}` or `ttt_layer.ttt.{weights,biases}.i`, and `forward_ssm_gating.gating_alpha` [dim].
The even older variant has the same names directly under `seq_modeling_block.`. The base weights of layer N are
`transformer.layers.N.original_layer.*`, and in full files also `...seq_modeling_block.original_layer.*`.
"""

from __future__ import annotations

import logging
import math
import re
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
from moshi.models import loaders

from moshi_ttt.config import LegacyConfig, TTTConfig, parse_layers
from moshi_ttt.data.checkpoints.common import (
    LoadedCheckpoint,
    build_lm,
    legacy_notes,
    lm_kwargs,
    load_full,
    load_part,
    model_shapes,
    read_json,
    read_tensors,
    tensor_shapes,
    ttt_prefixes,
)
from moshi_ttt.data.checkpoints.hub import HF_PREFIX
from moshi_ttt.ttt.apply import apply_ttt

logger = logging.getLogger(__name__)

TRAINING_CONFIG = "training_config.json"
WEIGHT_NAMES = ("consolidated.safetensors", "lora.safetensors")  # full first
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(seq_modeling_block|original_layer)\.(.+)$")
_TTT_NAMES = {
    *(f"{p}.{s}" for p in ("wq", "wk", "wv", "wo", "post_norm") for s in ("weight", "bias")),
    "learnable_ttt_lr_weight",
    "learnable_ttt_lr_bias",
    "ttt_norm_weight",
    "ttt_norm_bias",
}
_TWO_LAYER = {"W1": "weights.0", "b1": "biases.0", "W2": "weights.1", "b2": "biases.1"}
_DEEP = re.compile(r"^(weights|biases)\.(\d+)$")
_GATE = "forward_ssm_gating.gating_alpha"
_UNUSED_GATE = "backward_ssm_gating.gating_alpha"  # created by the fork, never used in its forward


@dataclass(frozen=True)
class LegacyKeys:
    """How the keys of an older TTT checkpoint map to ours."""

    ours: dict[str, str]  # our key -> the checkpoint key holding it
    duplicates: dict[str, str]  # seq_modeling_block.original_layer key -> the primary key it must equal
    ignored: tuple[str, ...]  # keys deliberately not loaded (the unused backward gate)
    ttt_layers: tuple[int, ...]
    layout: str  # "ttt_layer.ttt" or "flat" (the older variant)


def map_legacy_keys(names: tp.Iterable[str]) -> LegacyKeys:
    """Maps checkpoint key names to ours.

    Raises:
        ValueError: naming unknown TTT keys, or a file that mixes the two layouts.
    """
    ours: dict[str, str] = {}
    dup_candidates: dict[str, str] = {}
    ignored, unknown, layouts, layers = [], [], set(), set()
    for name in names:
        m = _LAYER.match(name)
        if m is None:
            ours[name] = name  # a base weight outside the TTT layers
            continue
        layer, kind, rest = int(m.group(1)), m.group(2), m.group(3)
        prefix = f"transformer.layers.{layer}."
        if kind == "original_layer":
            ours[prefix + rest] = name
            continue
        if rest.startswith("original_layer."):
            dup_candidates[name] = prefix + rest.removeprefix("original_layer.")
            continue
        if rest == _GATE:
            ours[prefix + "ttt.gating_alpha"] = name
            layers.add(layer)
            continue
        if rest == _UNUSED_GATE:
            ignored.append(name)
            continue
        layout = "ttt_layer.ttt" if rest.startswith("ttt_layer.ttt.") else "flat"
        param = rest.removeprefix("ttt_layer.ttt.")
        param = _TWO_LAYER.get(param, param)
        if param not in _TTT_NAMES and not _DEEP.match(param):
            unknown.append(name)
            continue
        layouts.add(layout)
        layers.add(layer)
        ours[prefix + "ttt." + param] = name
    if unknown:
        raise ValueError(f"unknown keys in the older TTT checkpoint: {sorted(unknown)}")
    if len(layouts) > 1:
        raise ValueError("the checkpoint mixes the 'ttt_layer.ttt.' layout and the older flat layout")
    duplicates = {}
    for dup, target in dup_candidates.items():
        if target in ours:
            duplicates[dup] = ours[target]
        else:  # only the second copy is stored: it is the source
            ours[target] = dup
    return LegacyKeys(ours, duplicates, tuple(ignored), tuple(sorted(layers)), layouts.pop() if layouts else "none")


def check_duplicates(path: Path, duplicates: dict[str, str]) -> None:
    """The module the fork registered twice must hold the same values under both names.

    Raises:
        ValueError: naming the copies that differ.
    """
    if not duplicates:
        return
    tensors = read_tensors(path, [*duplicates, *duplicates.values()])
    differ = [dup for dup, primary in duplicates.items() if not torch.equal(tensors[dup], tensors[primary])]
    if differ:
        pairs = [f"{d} != {duplicates[d]}" for d in sorted(differ)[:8]]
        raise ValueError(f"{path}: duplicate copies of the base layer weights disagree: {pairs}")


def _ttt_config(section: dict, shapes: dict[str, tuple[int, ...]], keys: LegacyKeys, causal: bool) -> TTTConfig:
    """Our legacy-mode TTTConfig from the `ttt` training args and the tensor shapes (shapes win, args are checked)."""
    first = keys.ttt_layers[0]
    prefix = f"transformer.layers.{first}.ttt."
    H, _ = shapes[keys.ours[prefix + "ttt_norm_weight"]]
    depth = sum(1 for k in keys.ours if k.startswith(prefix + "weights."))
    widths = [shapes[keys.ours[f"{prefix}weights.{i}"]][2] for i in range(depth - 1)]
    declared = section.get("ttt_mlp_layers")
    # The fork used its 2-layer module for any ttt_mlp_layers below 3.
    if declared is not None and max(int(declared), 2) != depth:
        raise ValueError(f"training_config says ttt_mlp_layers={declared} but the checkpoint has {depth} MLP layers")
    for field in ("mini_batch_size", "base_lr"):
        if field not in section:
            raise ValueError(f"{TRAINING_CONFIG} has no ttt.{field}")
    return TTTConfig(
        layers=",".join(str(i) for i in keys.ttt_layers),
        mini_batch_size=_whole(section, "mini_batch_size"),
        base_lr=_number(section, "base_lr"),
        persistent_states=_flag(section, "persistent_states", True),
        gating_alpha_init=_number(section, "initial_gating_alpha", 0.1),
        num_heads=int(H),
        target="legacy",
        legacy=LegacyConfig(
            causal=causal,
            mlp_layers=depth,
            mlp_hidden_dims=tuple(int(w) for w in widths),
            use_rope=_flag(section, "use_rope", False),
            rope_theta=_number(section, "rope_theta", 10000.0),
            ttt_layer_context=section.get("ttt_layer_context"),
            non_ttt_layer_context=section.get("non_ttt_layer_context"),
        ),
    )


def _flag(section: dict, key: str, default: bool) -> bool:
    """A yes/no training arg: a YAML bool (a string such as "false" would read as True through bool())."""
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{TRAINING_CONFIG}: ttt.{key} must be true or false, got {value!r}")
    return value


def _number(section: dict, key: str, default: float | None = None) -> float:
    """A real training arg; a string is parsed (YAML 1.1 reads 1e-3, without a dot, as a string)."""
    value = section.get(key, default)
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{TRAINING_CONFIG}: ttt.{key} must be a finite number, got {value!r}")
    return number


def _whole(section: dict, key: str) -> int:
    value = section[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise ValueError(f"{TRAINING_CONFIG}: ttt.{key} must be a whole number, got {value!r}")
    return int(value)


def _check_declared_layers(section: dict, found: tuple[int, ...], num_layers: int) -> None:
    declared = section.get("layers")
    if declared is None:
        return
    if isinstance(declared, str) and declared.strip() not in ("all", "none") and not declared.strip()[:1].isdigit():
        # Symbolic specs such as "middle" may be defined differently in the fork: the tensors are authoritative.
        logger.info("training_config names TTT layers %r; the checkpoint has them in %s", declared, found)
        return
    if isinstance(declared, str):
        indices = parse_layers(declared, num_layers)
    else:
        indices = sorted(int(i) for i in declared)
    if indices != list(found):
        raise ValueError(f"training_config names TTT layers {indices} but the checkpoint has TTT tensors in {found}")


def load_legacy(
    directory: Path,
    *,
    ref: str,
    base: str | None,
    device: torch.device | str,
    dtype: torch.dtype | None,
    legacy_causal: bool,
    load_fn: tp.Callable[..., LoadedCheckpoint],
) -> LoadedCheckpoint:
    """Loads an older TTT checkpoint directory in legacy mode (`load_fn` is `checkpoints.load`, for the base)."""
    training = read_json(directory / TRAINING_CONFIG)
    section = training.get("ttt")
    if not isinstance(section, dict):
        raise ValueError(f"{directory / TRAINING_CONFIG} has no 'ttt' section")
    path = next((directory / n for n in WEIGHT_NAMES if (directory / n).exists()), None)
    if path is None:
        raise FileNotFoundError(f"{directory} holds none of {list(WEIGHT_NAMES)} (only safetensors are accepted)")
    shapes = tensor_shapes(path)
    keys = map_legacy_keys(shapes)
    if any(".lora_A." in k or ".lora_B." in k for k in shapes):
        raise ValueError(f"{path} holds LoRA adapters next to TTT weights; loading those is not supported")
    if keys.ttt_layers and not section.get("enable", True):
        raise ValueError(f"{directory / TRAINING_CONFIG} says ttt.enable is false but {path} holds TTT tensors")
    if not keys.ttt_layers:
        raise ValueError(f"{path} holds no TTT tensors (no 'seq_modeling_block.' keys)")
    check_duplicates(path, keys.duplicates)
    cfg = _ttt_config(section, shapes, keys, causal=legacy_causal)
    raw = read_json(directory / "config.json") if (directory / "config.json").is_file() else None
    notes = []
    if keys.ignored:
        notes.append(f"{len(keys.ignored)} backward_ssm_gating tensors are in the checkpoint; the fork never used them")
    prefixes = ("transformer.layers.",)
    full = any(not ours.startswith(prefixes) for ours in keys.ours)  # base weights outside the layers
    if base is None and full:
        if raw is None:
            raise FileNotFoundError(f"{directory} has no config.json with the moshi LM config")
        lm_config = lm_kwargs(raw)
        _check_declared_layers(section, keys.ttt_layers, int(lm_config["num_layers"]))
        model = build_lm(lm_config, device, dtype)
        apply_ttt(model, cfg, device="meta")  # filled by load_full, never randomly initialised
        tensors = read_tensors(path, keys.ours.values())
        load_full(model, {ours: tensors[k] for ours, k in keys.ours.items()}, str(path), device)
        mimi_ref = f"{HF_PREFIX}{_base_repo(training)}/{loaders.MIMI_NAME}"
    else:
        base_ref = base or f"{HF_PREFIX}{_base_repo(training)}"
        base_ckpt = load_fn(base_ref, device=device, dtype=dtype)
        if base_ckpt.ttt_config is not None:
            raise ValueError(f"the base {base_ref} already has TTT layers; a base must be a plain model")
        model, lm_config, mimi_ref = base_ckpt.model, base_ckpt.lm_config, base_ckpt.mimi_ref
        notes = list(base_ckpt.notes) + notes
        _check_declared_layers(section, keys.ttt_layers, len(model.transformer.layers))
        apply_ttt(model, cfg, device="meta")
        expected = model_shapes(model, ttt_prefixes(model))
        all_shapes = model_shapes(model)
        expected.update({k: all_shapes[k] for k in keys.ours if k in all_shapes})
        tensors = read_tensors(path, keys.ours.values())
        load_part(model, {ours: tensors[k] for ours, k in keys.ours.items()}, expected, str(path), device)
    model.eval()
    logger.info("loaded older TTT checkpoint %s (%s layout, layers %s)", path, keys.layout, keys.ttt_layers)
    return LoadedCheckpoint(
        model=model,
        mimi=None,
        mimi_ref=mimi_ref,
        lm_config=lm_config,
        ttt_config=cfg,
        kind="legacy_ttt",
        ref=ref,
        notes=legacy_notes(cfg) + notes,
    )


def _base_repo(training: dict) -> str:
    """The Hub repo of the base model named by the training config (moshi-finetune's moshi_paths.hf_repo_id)."""
    paths = training.get("moshi_paths") or {}
    return paths.get("hf_repo_id") or loaders.DEFAULT_REPO


def is_legacy(directory: Path) -> bool:
    return (directory / TRAINING_CONFIG).is_file()
