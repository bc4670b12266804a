"""Checkpoints of the In-Place TTT fork (AlufRon/moshi_in_place), loaded with its forward (moshi_ttt/ttt/inplace.py).

Paths below are inside the fork. Its trainer (`moshi-finetune/finetune/checkpointing.py` ~113-161) writes
`checkpoints/checkpoint_{step:06d}/consolidated/` with `config.json` (moshi's LM config, `lora`, `lora_rank`,
`lora_scaling`, `ttt_config` {enabled, layer_frequency, start_layer, chunk_size, learning_rate, conv_kernel_size}
and, with YaRN, `yarn_config` {enabled, scale, original_max_seq_len, beta_fast, beta_slow, mscale, mscale_all_dim})
and one weights file:
- `lora.safetensors` (also for TTT-only runs): the modules whose parameters were all trained. TTT-only runs hold,
  per TTT layer N, `transformer.layers.N.gating.target_generator.conv1d.conv.weight` [d, d, K] and
  `...target_generator.W_target.weight` [d, d]; `gating.w_down` is trained but not saved, so at load it starts again
  from the base's `linear_out.weight`, as in the fork's loader. LoRA + TTT runs hold `lora_A`/`lora_B` of every
  linear layer and `W_target.frozen_W.weight` with its LoRA; runs with unfrozen TTT layers hold those whole layers,
  `gating.w_down` included. The base weights come from `base` (default: the fork's kyutai/moshiko-pytorch-bf16).
- `consolidated.safetensors`: every tensor (LoRA merged), `gating.w_down` and `gating.w_down_pretrained` included.
Loaded here: LoRA adapters merged into their weights (W + scaling B A); `w_down_pretrained` (the fork's reset value,
which its loader overwrites with w_down) and the TTT layers' `linear_out` and its LoRA (the fork's TTT layers never
read them) are known and not used. Any other key that the model does not have, and any tensor the model needs that
the file lacks, is an error naming it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
from moshi.models import loaders

from moshi_ttt.config import InPlaceConfig, YarnConfig
from moshi_ttt.data.checkpoints.common import (
    LoadedCheckpoint,
    build_lm,
    check_keys,
    lm_kwargs,
    load_full,
    load_part,
    read_json,
    read_tensors,
    tensor_shapes,
)
from moshi_ttt.data.checkpoints.hub import HF_PREFIX, confined_ref
from moshi_ttt.ttt.fork_yarn import apply_fork_yarn
from moshi_ttt.ttt.inplace import apply_inplace, inplace_blocks

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
FULL_NAME, LORA_NAME = "consolidated.safetensors", "lora.safetensors"  # full first, as the fork's trainer names them
TARGET_MARK = ".gating.target_generator."  # only In-Place checkpoints have tensors under it
DEFAULT_CLIP = 1e-5  # the fork's TTTGating default for delta_clip_fro_norm (its training runs never set it)
_TTT_FIELDS = {
    "enabled",
    "layer_frequency",
    "start_layer",
    "chunk_size",
    "learning_rate",
    "conv_kernel_size",
    "delta_clip_fro_norm",
    "delta_clip_epsilon",
}
_YARN_FIELDS = {"enabled", "scale", "original_max_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
_FORK_KEYS = ("ttt_config", "yarn_config")  # fork sections of config.json that are not LMModel kwargs
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_LORA = re.compile(r"^(.+)\.(lora_A|lora_B)\.weight$")
LORA_PARTS = ("lora_A", "lora_B")
_UNUSED = ("gating.w_down_pretrained", "gating.linear_out.weight", "gating.linear_out.frozen_W.weight")


@dataclass(frozen=True)
class InPlaceOptions:
    """How to run an In-Place checkpoint, beyond what it says (`load_inplace`)."""

    # Gate of the TTT layers' MLP: "gelu" as the fork computes it, "silu" as stock moshi (the fork's slip fixed).
    activation: str = "gelu"
    # YaRN frequencies: "float32" as the fork's inference, "bfloat16" as its training runs (config.YarnConfig).
    yarn_frequencies: str = "float32"
    # YaRN: attention context times the scale, as the fork's run_inference; False keeps the checkpoint's context.
    yarn_extend_context: bool = True


def is_inplace(path: Path) -> bool:
    """A directory of the fork's layout (config.json with ttt_config.layer_frequency, or weights with target
    generator tensors), or such a weights file."""
    if path.is_file():
        return path.suffix == ".safetensors" and any(TARGET_MARK in k for k in tensor_shapes(path))
    config = path / CONFIG_NAME
    if config.is_file():
        section = read_json(config).get("ttt_config")
        if isinstance(section, dict) and "layer_frequency" in section:
            return True
    weights = [path / n for n in (FULL_NAME, LORA_NAME) if (path / n).is_file()]
    return any(TARGET_MARK in k for w in weights for k in tensor_shapes(w))


def _num(section: dict, key: str, default: float, where: str, whole: bool = False) -> tp.Any:
    """A number of a config section (`default` when absent), as the fork's dataclasses hold it: an int when `whole`
    (4.0 read as 4), else a float. Ranges are checked by InPlaceConfig and YarnConfig.

    Raises:
        ValueError: a string, list, object, true/false, NaN or infinity, or a fraction where a whole number belongs.
    """
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}.{key} must be a finite number, got {value!r}"[:200])
    if whole and value != int(value):
        raise ValueError(f"{where}.{key} must be a whole number, got {value!r}")
    return int(value) if whole else float(value)


def inplace_config(section: tp.Any, num_layers: int, activation: str = "gelu") -> InPlaceConfig:
    """Our InPlaceConfig from the fork's `ttt_config`, with its defaults (modules/transformer.py and ttt_module.py:
    layer_frequency 6, start_layer 0, chunk_size 256, learning_rate 1e-3, conv_kernel_size 2, delta_clip_fro_norm
    1e-5, None or <= 0 for no clip, delta_clip_epsilon 1e-12).

    Raises:
        ValueError: for a missing or disabled section, unknown fields, or one that puts TTT in no layer.
    """
    if not isinstance(section, dict):
        raise ValueError(f"config.json has no ttt_config object, found {section!r}")
    unknown = sorted(set(section) - _TTT_FIELDS)
    if unknown:
        raise ValueError(f"unknown ttt_config fields {unknown}; the In-Place fork knows {sorted(_TTT_FIELDS)}")
    if not section.get("enabled", False):
        raise ValueError("ttt_config.enabled is false: the fork builds no TTT layer for this checkpoint")
    frequency = _num(section, "layer_frequency", 6, "ttt_config", whole=True)
    start = _num(section, "start_layer", 0, "ttt_config", whole=True)
    if frequency < 1:
        raise ValueError(f"ttt_config.layer_frequency must be >= 1, got {frequency}")
    layers = tuple(i for i in range(num_layers) if i >= start and (i - start) % frequency == 0)
    if not layers:
        raise ValueError(f"ttt_config (start_layer {start}, layer_frequency {frequency}) names none of the "
                         f"{num_layers} layers")  # fmt: skip
    clip = section.get("delta_clip_fro_norm", DEFAULT_CLIP)
    clip = None if clip is None else _num(section, "delta_clip_fro_norm", DEFAULT_CLIP, "ttt_config")
    if clip is not None and clip <= 0:
        clip = None  # the fork: a bound <= 0 turns the clip off
    return InPlaceConfig(
        layers=layers,
        chunk_size=_num(section, "chunk_size", 256, "ttt_config", whole=True),
        lr=_num(section, "learning_rate", 1e-3, "ttt_config"),
        clip=clip,
        clip_epsilon=_num(section, "delta_clip_epsilon", 1e-12, "ttt_config"),
        conv_kernel_size=_num(section, "conv_kernel_size", 2, "ttt_config", whole=True),
        activation=activation,
    )


def yarn_config(section: tp.Any, lm_config: dict, options: InPlaceOptions) -> YarnConfig | None:
    """Our YarnConfig from the fork's `yarn_config` (its loaders.get_moshi_lm defaults); None when YaRN is off or
    its scale is <= 1 (the fork then runs moshi's RoPE)."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f"config.json yarn_config must be an object, found {section!r}")
    unknown = sorted(set(section) - _YARN_FIELDS)
    if unknown:
        raise ValueError(f"unknown yarn_config fields {unknown}; the In-Place fork knows {sorted(_YARN_FIELDS)}")
    scale = _num(section, "scale", 1.0, "yarn_config")
    if not section.get("enabled", False) or scale <= 1.0:
        return None
    return YarnConfig(
        scale=scale,
        original_max_seq_len=_num(
            section, "original_max_seq_len", lm_config.get("context") or 3000, "yarn_config", whole=True
        ),
        beta_fast=_num(section, "beta_fast", 32.0, "yarn_config"),
        beta_slow=_num(section, "beta_slow", 1.0, "yarn_config"),
        mscale=_num(section, "mscale", 1.0, "yarn_config"),
        mscale_all_dim=_num(section, "mscale_all_dim", 0.0, "yarn_config"),
        frequencies=options.yarn_frequencies,
        extend_context=options.yarn_extend_context,
    )


def _check_depformer(lm_config: dict, section: dict) -> None:
    """The fork passes ttt_config to the depth transformer too; its layers escape TTT only through weights_per_step
    (Moshi's). A depth transformer without it would get TTT layers that run without token embeddings."""
    if lm_config.get("depformer_weights_per_step", False) or int(lm_config.get("dep_q", 0)) == 0:
        return
    if lm_config.get("depformer_gating", lm_config.get("gating", "none")) == "none":
        return
    raise ValueError(
        "this config has a depth transformer without weights per step: the fork would put its TTT gating into the "
        "depth transformer too (GELU, no update), which is not reproduced"
    )


def _fork_lm_config(raw: dict) -> dict:
    return {k: v for k, v in lm_kwargs(raw).items() if k not in _FORK_KEYS}


def _ttt_key(key: str, layers: tuple[int, ...]) -> str | None:
    """The part after `transformer.layers.N.` of a key of a TTT layer N, else None."""
    m = _LAYER.match(key)
    return m.group(2) if m and int(m.group(1)) in layers else None


def _full_tensors(tensors: dict[str, torch.Tensor], cfg: InPlaceConfig) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of a consolidated file under our names: the unused TTT keys dropped; w_down from linear_out where
    the file has none (the fork's loader does the same). Returns (tensors, w_down taken from the file)."""
    out, from_file = {}, True
    for key, value in tensors.items():
        rest = _ttt_key(key, cfg.layers)
        if rest in _UNUSED:
            continue
        out[key] = value
    for i in cfg.layers:
        prefix = f"transformer.layers.{i}.gating."
        if prefix + "w_down" not in out and prefix + "linear_out.weight" in tensors:
            out[prefix + "w_down"] = tensors[prefix + "linear_out.weight"]
            from_file = False
    return out, from_file


def _lora_tensors(
    tensors: dict[str, torch.Tensor], model: tp.Any, cfg: InPlaceConfig, lora: bool, scaling: float, source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a lora.safetensors file as replacements of the (In-Place) model's tensors, LoRA merged.

    Returns (our key -> tensor, the keys it replaces beyond the target generators).
    Raises:
        ValueError: naming unknown keys, incomplete LoRA pairs, or missing target generator tensors.
    """
    state = model.state_dict()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linears |= {f"transformer.layers.{i}.gating.linear_out" for i in cfg.layers}  # the fork keeps it, never reads it
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown, ignored = [], []
    for key, value in tensors.items():
        m = _LORA.match(key)
        if m and lora and m.group(1) in linears:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        elif _ttt_key(key, cfg.layers) in _UNUSED:
            ignored.append(key)
        elif key.endswith(".frozen_W.weight") and key.replace(".frozen_W.weight", ".weight") in state:
            out[key.replace(".frozen_W.weight", ".weight")] = value
        elif key in state:
            out[key] = value
        else:
            unknown.append(key)
    expected_pairs = linears if lora else set()
    missing = [f"{n}.{p}.weight" for n in sorted(expected_pairs) for p in LORA_PARTS if p not in pairs.get(n, {})]
    for i in cfg.layers:
        prefix = f"transformer.layers.{i}.gating.target_generator."
        for name in ("conv1d.conv.weight", "W_target.weight"):
            if prefix + name not in out:
                missing.append(prefix + (name if not lora or name.startswith("conv") else "W_target.frozen_W.weight"))
    if unknown or missing:
        problems = [f"unknown keys: {sorted(unknown)[:8]}"] if unknown else []
        problems += [f"missing keys: {sorted(missing)[:8]}"] if missing else []
        raise ValueError(f"{source} is not an In-Place checkpoint of this model: " + "; ".join(problems))
    for name, pair in pairs.items():
        if name.endswith("gating.linear_out") and _ttt_key(name + ".weight", cfg.layers):
            continue  # the TTT layers read w_down, never linear_out
        key = f"{name}.weight"
        weight = out.get(key, state[key])
        a, b = pair["lora_A"].float(), pair["lora_B"].float()  # [r, in], [out, r]
        check_keys({key: tuple(weight.shape)}, {key: (b.shape[0], a.shape[1])}, f"{source} LoRA of {name}")
        merged = weight.float() + scaling * (b @ a)  # moshi's LoRA merge W + scaling B A, in float32
        out[key] = merged.to(state[key].dtype)
    replaced = sorted(k for k in out if TARGET_MARK not in k)
    return out, replaced


def load_inplace(
    directory: Path,
    *,
    ref: str,
    base: str | None,
    device: torch.device | str,
    dtype: torch.dtype,
    load_fn: tp.Callable[..., LoadedCheckpoint],
    options: InPlaceOptions | None = None,
) -> LoadedCheckpoint:
    """Loads an In-Place checkpoint directory (`load_fn` is `checkpoints.load`, for the base of a lora.safetensors).

    Args:
        directory: the fork's `.../consolidated/` directory.
        base: the base weights of a lora.safetensors checkpoint (local path or hf://); None: the fork's default,
            hf://kyutai/moshiko-pytorch-bf16.
        options: the gate, YaRN frequencies and context (InPlaceOptions; None: the fork's inference).
    Raises:
        FileNotFoundError: no config.json or weights file.
        ValueError: unknown, missing or mis-shaped keys (named), configs the fork's code would not run, or a base
            that does not match the checkpoint's config.
    """
    options = options or InPlaceOptions()
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME} (the In-Place fork writes one per checkpoint)")
    raw = read_json(directory / CONFIG_NAME)
    lm_config = _fork_lm_config(raw)
    section = raw.get("ttt_config")
    cfg = inplace_config(section, int(lm_config.get("num_layers", 32)), options.activation)
    _check_depformer(lm_config, section)
    yarn = yarn_config(raw.get("yarn_config"), lm_config, options)
    path = next((directory / n for n in (FULL_NAME, LORA_NAME) if (directory / n).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{directory} holds neither {FULL_NAME} nor {LORA_NAME} (only safetensors are read)")
    lora, scaling = bool(raw.get("lora", False)), float(raw.get("lora_scaling", 2.0))
    notes: list[str] = []
    if path.name == FULL_NAME:
        model = build_lm(lm_config, device, dtype)
        mimi_ref = _mimi_ref(raw, directory, None)
        _apply(model, cfg, yarn)
        tensors, w_from_file = _full_tensors(read_tensors(path), cfg)
        load_full(model, tensors, str(path), device)
        w_source = "the checkpoint's gating.w_down" if w_from_file else "the checkpoint's linear_out (no w_down in it)"
    else:
        base_ref = base or f"{HF_PREFIX}{loaders.DEFAULT_REPO}"
        base_ckpt = load_fn(base_ref, device=device, dtype=dtype)
        if base_ckpt.ttt_config is not None or inplace_blocks(base_ckpt.model):
            raise ValueError(f"the base {base_ref} already has TTT layers; a base must be a plain model")
        _check_base_config(lm_config, base_ckpt.lm_config, base_ref, str(directory / CONFIG_NAME))
        model, notes = base_ckpt.model, list(base_ckpt.notes)
        mimi_ref = _mimi_ref(raw, directory, base_ckpt.mimi_ref)
        _apply(model, cfg, yarn)
        tensors, replaced = _lora_tensors(read_tensors(path), model, cfg, lora, scaling, str(path))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in tensors}
        load_part(model, tensors, expected, str(path), device)
        has_w = [i for i in cfg.layers if f"transformer.layers.{i}.gating.w_down" in tensors]
        w_source = "the checkpoint's gating.w_down" if has_w else f"the base's linear_out ({base_ref})"
        if not has_w:
            notes.append(
                "w_down was trained by the fork but lora.safetensors does not hold it: as in the fork's loader, each "
                "TTT layer's fast weight starts from the base's linear_out."
            )
        if lora:
            notes.append(f"LoRA adapters (rank {raw.get('lora_rank')}, scaling {scaling}) merged into their weights.")
        logger.info("In-Place checkpoint %s replaces %d base tensors", path, len(replaced))
    lm_config = dict(lm_config, context=model.context)
    model.eval()
    notes = inplace_notes(model, cfg, yarn, w_source) + notes
    return LoadedCheckpoint(
        model=model,
        mimi=None,
        mimi_ref=mimi_ref,
        lm_config=lm_config,
        ttt_config=None,
        kind="inplace_ttt",
        ref=ref,
        notes=notes,
    )


def _apply(model: tp.Any, cfg: InPlaceConfig, yarn: YarnConfig | None) -> None:
    if yarn is not None:
        apply_fork_yarn(model, yarn)
    apply_inplace(model, cfg)


def _mimi_ref(raw: dict, directory: Path, default: str | None) -> str:
    """The codec: config.json's `mimi_name` next to the checkpoint (a file or one of our codec directories), else
    `default` (the base's), else moshi's on the Hub."""
    name = confined_ref(raw.get("mimi_name"), directory, "mimi_name")
    if isinstance(name, str) and (directory / name).exists():
        return os.path.abspath(directory / name)  # lexical: a Hub snapshot's file stays a .safetensors name
    return default or f"{HF_PREFIX}{loaders.DEFAULT_REPO}/{loaders.MIMI_NAME}"


class BaseMismatch(ValueError):
    """A lora.safetensors checkpoint and a base whose LM configs disagree; `detail` names the kwargs, no path."""

    def __init__(self, source: str, base_ref: str, detail: str):
        super().__init__(f"{source} and the base {base_ref} disagree on {detail}")
        self.detail = detail


def _check_base_config(ckpt: dict, base: dict, base_ref: str, source: str) -> None:
    """The base must be the model the checkpoint was trained on: the LM kwargs both name must agree."""
    differ = sorted(k for k in set(ckpt) & set(base) if ckpt[k] != base[k])
    if differ:
        detail = ", ".join(f"{k}: {ckpt[k]!r} vs {base[k]!r}" for k in differ[:6])
        raise BaseMismatch(source, base_ref, detail)


def inplace_notes(model: tp.Any, cfg: InPlaceConfig, yarn: YarnConfig | None, w_source: str) -> list[str]:
    """Plain-language remarks that every report of an In-Place model shows (results.json config.notes)."""
    clip = "no clip" if cfg.clip is None else f"clip tau = {cfg.clip:g}"
    gate = "GELU where stock moshi's gating uses SiLU, so they change the model even when the fast weight never " \
        "changes" if cfg.activation == "gelu" else "SiLU (stock moshi's gate; the fork's code uses GELU)"  # fmt: skip
    notes = [
        f"In-Place TTT checkpoint (AlufRon/moshi_in_place): in layers {list(cfg.layers)} the MLP's down-projection "
        f"w_down is a float32 fast weight, starting from {w_source}, updated every {cfg.chunk_size} tokens by "
        f"lr = {cfg.lr:g} times the chunk's Delta W = V_hat^T Z ({clip}, before lr); its TTT layers gate with {gate}."
    ]
    if cfg.clip is not None:
        blocks = inplace_blocks(model)
        w = next(iter(blocks.values())).w_down.detach()
        entries = w.numel()
        rms = float(torch.linalg.vector_norm(w.float())) / math.sqrt(entries)
        per_entry = cfg.lr * cfg.clip / math.sqrt(entries)
        resolution = rms * 2.0**-24  # half a float32 ulp at a typical entry
        if per_entry < resolution:
            origin = " (the fork's default: its training runs drop the YAML's delta_clip_fro_norm)" if (
                cfg.clip == DEFAULT_CLIP) else ""  # fmt: skip
            notes.append(
                f"Clip tau = {cfg.clip:g}{origin}: each chunk's update is at most lr * tau = {cfg.lr * cfg.clip:.1e} "
                f"in Frobenius norm, about {per_entry:.0e} per entry of w_down, below the float32 resolution of its "
                f"typical entry ({resolution:.0e}): expect the fast weight never to change (the run's telemetry "
                "says whether it did)."
            )
    if yarn is not None:
        notes.append(
            f"The fork's YaRN (scale {yarn.scale:g}, original length {yarn.original_max_seq_len}, its ramp bounds "
            f"beta * L, query-only attention factor), {yarn.frequencies} frequencies, attention context "
            f"{model.context} tokens"
            + (
                " (the checkpoint's times the scale, as its run_inference)." if yarn.extend_context else "."
            )  # fmt: skip
        )
    return notes
