"""Our checkpoint format: a directory with `config.json` and `model.safetensors` (ARCHITECTURE.md, "Checkpoints").

config.json: {"format": "moshi-ttt", "version": 1, "lm_config": {...LMModel kwargs} or "base": "<ref>",
"mimi": "<ref>" or null, "ttt": TTTConfig.to_dict() or null, "dtype": "<on-disk dtype of the non-TTT tensors>"}.
model.safetensors holds every tensor of the model, or only the TTT tensors when the config names a base.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import os
import typing as tp
from pathlib import Path

import torch
from moshi.models.lm import LMModel
from safetensors.torch import save_file

from moshi_ttt.config import TTTConfig, parse_layers
from moshi_ttt.data.checkpoints.common import (
    LoadedCheckpoint,
    build_lm,
    fast_weight_keys,
    legacy_notes,
    load_full,
    load_part,
    meta_lm,
    model_shapes,
    read_json,
    read_tensors,
    ttt_prefixes,
)
from moshi_ttt.data.checkpoints.hub import confined_ref
from moshi_ttt.ttt.apply import apply_ttt, ttt_blocks
from moshi_ttt.ttt.inplace import inplace_blocks

logger = logging.getLogger(__name__)

FORMAT = "moshi-ttt"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CONFIG_KEYS = {"format", "version", "lm_config", "base", "mimi", "ttt", "dtype"}

LoadFn = tp.Callable[..., LoadedCheckpoint]
# The checkpoint directories whose base is being loaded, outermost first: a chain of bases that comes back to one
# of them is refused, not followed until Python's recursion limit.
_LOADING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("moshi_ttt_loading_bases", default=())


def is_ours(config: dict) -> bool:
    return config.get("format") == FORMAT


def save(
    directory: str | Path,
    model: LMModel,
    *,
    lm_config: dict | None = None,
    ttt_config: TTTConfig | None = None,
    mimi_ref: str | None = None,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves `model` in our format.

    Args:
        directory: created if needed.
        model: a moshi LMModel, with TTT applied or not.
        lm_config: the LMModel kwargs that rebuild it (a standalone checkpoint); exactly one of lm_config and base.
        ttt_config: the TTTConfig applied; None takes the one of the model's TTT blocks (with their layer indices).
        mimi_ref: where the codec comes from (local path or hf://owner/repo/file), stored as given: a relative
            path is read relative to `directory` when the checkpoint is loaded, never to the working directory.
        base: a reference (local path or hf://) of the base checkpoint, relative paths as for mimi_ref; only the
            TTT tensors are then saved.
        dtype: on-disk dtype of the floating tensors (e.g. torch.bfloat16); TTT fast weights always stay float32.
            None keeps each tensor's dtype.
        overwrite: replace an existing checkpoint in `directory`.
    Returns:
        The directory.
    Raises:
        ValueError: for inconsistent arguments or an existing checkpoint without overwrite.
    """
    directory = Path(directory)
    if inplace_blocks(model):
        raise ValueError("this model has In-Place TTT layers, which our format does not hold; keep the fork's files")
    if (lm_config is None) == (base is None):
        raise ValueError("save needs exactly one of lm_config (standalone checkpoint) or base (TTT weights on a base)")
    blocks = ttt_blocks(model)
    if ttt_config is None and blocks:
        first = next(iter(blocks.values()))
        ttt_config = dataclasses.replace(first.cfg, layers=",".join(str(i) for i in sorted(blocks)))
    if ttt_config is not None:
        indices = parse_layers(ttt_config.layers, len(model.transformer.layers))
        if indices != sorted(blocks):
            raise ValueError(f"ttt_config names layers {indices} but the model has TTT blocks in {sorted(blocks)}")
    if base is not None and not blocks:
        raise ValueError("a checkpoint on top of a base holds only TTT weights, and this model has no TTT block")
    mimi_ref = _reference(mimi_ref, "mimi_ref", directory)
    base = _reference(base, "base", directory)
    if base is not None and "://" not in base and os.path.abspath(directory / base) == os.path.abspath(directory):
        raise ValueError(f"base {base!r} is the checkpoint {directory} itself")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16) or None, not {dtype!r}")
    if lm_config is not None:
        _check_lm_config(model, lm_config)
    if (directory / WEIGHTS_NAME).exists() and not overwrite:
        raise ValueError(f"{directory} already holds a checkpoint; pass overwrite=True to replace it")

    state = model.state_dict()
    if base is not None:
        prefixes = tuple(ttt_prefixes(model))
        state = {k: v for k, v in state.items() if k.startswith(prefixes)}
    keep_float32 = fast_weight_keys(model)
    tensors = {}
    for key, value in state.items():
        value = value.detach()
        if dtype is not None and value.dtype.is_floating_point and key not in keep_float32:
            value = value.to(dtype)
        tensors[key] = value.to("cpu").contiguous()
    config: dict[str, tp.Any] = {
        "format": FORMAT,
        "version": VERSION,
        "mimi": mimi_ref,
        "ttt": None if ttt_config is None else ttt_config.to_dict(),
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
    }
    if base is not None:
        config["base"] = str(base)
    else:
        config["lm_config"] = dict(lm_config)
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:  # ValueError: NaN or infinity, which JSON has not
        raise ValueError(f"lm_config must hold only JSON values (finite numbers, strings, lists, dicts): {e}") from e
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT})
    (directory / CONFIG_NAME).write_text(config_text)
    logger.info("saved %d tensors to %s", len(tensors), directory)
    return directory


def _reference(ref: tp.Any, name: str, directory: Path) -> str | None:
    """A codec or base reference given to `save`, as config.json stores it: None, an hf:// string, or a path. A
    relative path is read beside the checkpoint when it loads (`_beside`); one that exists from the working
    directory but not beside `directory` is what the caller meant, and is stored relative to `directory`."""
    if ref is None:
        return None
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref:
        raise TypeError(f"{name} must be a path, an hf:// reference or None, not {ref!r}")
    if "://" in ref or Path(ref).is_absolute() or (directory / ref).exists() or not Path(ref).exists():
        return ref
    return os.path.relpath(os.path.abspath(ref), os.path.abspath(directory))


def _check_lm_config(model: LMModel, lm_config: tp.Any) -> None:
    """`lm_config` must rebuild `model` (its plain LMModel part), or the checkpoint would not load back.

    Raises:
        ValueError: naming the first keys whose shapes differ, or what the LMModel constructor refused."""
    if not isinstance(lm_config, dict):
        raise TypeError(f"lm_config must be a dict of LMModel kwargs, not {type(lm_config).__name__}")
    expected = model_shapes(meta_lm(dict(lm_config), torch.float32))  # ValueError: what moshi's LMModel refused
    ttt = tuple(ttt_prefixes(model))
    have = {k: v for k, v in model_shapes(model).items() if not k.startswith(ttt)}
    differ = sorted(k for k in set(have) | set(expected) if have.get(k) != expected.get(k))
    if differ:
        detail = ", ".join(f"{k}: model {have.get(k)} vs lm_config {expected.get(k)}" for k in differ[:4])
        raise ValueError(f"lm_config does not describe this model ({len(differ)} tensors differ: {detail})")


def _beside(ref: tp.Any, directory: Path, field: str) -> str | None:
    """A relative local reference (codec, base) names a path relative to the checkpoint's own directory, never to
    the working directory: joined to it here, once (a missing file is then reported where it was looked for).
    Absolute after `os.path.abspath` (lexical, symlinks kept: a Hub snapshot's files are links to blobs)."""
    if ref is not None and (not isinstance(ref, str) or not ref):
        raise ValueError(f"{directory / CONFIG_NAME}: {field} must be a path or hf:// reference, not {ref!r}")
    if ref is None or "://" in ref or Path(ref).is_absolute():
        return ref
    return os.path.abspath(directory / ref)


def read_config(directory: Path) -> dict:
    """Reads and validates our config.json."""
    config = read_json(directory / CONFIG_NAME)
    if not is_ours(config):
        raise ValueError(f"{directory / CONFIG_NAME} is not a {FORMAT} config (format={config.get('format')!r})")
    if config.get("version") != VERSION:
        raise ValueError(f"{directory}: unsupported {FORMAT} version {config.get('version')!r}, expected {VERSION}")
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{directory / CONFIG_NAME} has unknown fields {unknown}")
    if ("lm_config" in config) == ("base" in config):
        raise ValueError(f"{directory / CONFIG_NAME} needs exactly one of 'lm_config' and 'base'")
    if "lm_config" in config and not isinstance(config["lm_config"], dict):
        raise ValueError(f"{directory / CONFIG_NAME}: lm_config must be an object of LM config kwargs")
    return config


def load_ours(
    directory: Path,
    *,
    ref: str,
    base: str | None,
    device: torch.device | str,
    dtype: torch.dtype | None,
    legacy_causal: bool,
    load_fn: LoadFn,
) -> LoadedCheckpoint:
    """Loads our format; `load_fn` is `checkpoints.load`, used for a base reference."""
    config = read_config(directory)
    ttt = None if config.get("ttt") is None else TTTConfig.from_dict(config["ttt"])
    if ttt is not None and ttt.legacy is not None and legacy_causal:
        ttt = dataclasses.replace(ttt, legacy=dataclasses.replace(ttt.legacy, causal=True))
    weights = directory / WEIGHTS_NAME
    mimi_ref = _beside(confined_ref(config.get("mimi"), directory, "mimi"), directory, "mimi")
    notes: list[str] = []
    if "lm_config" in config:
        lm_config = dict(config["lm_config"])
        model = build_lm(lm_config, device, dtype)
        if ttt is not None:
            apply_ttt(model, ttt, device="meta")  # filled by load_full, never randomly initialised
        load_full(model, read_tensors(weights), str(weights), device)
    else:
        base_ref = base or _beside(confined_ref(config["base"], directory, "base"), directory, "base")
        # The base's tensors: read from its files, or those of a model of this process loaded from it (shared.py).
        chain = _LOADING.get() + (os.path.abspath(directory),)
        if base_ref is not None and "://" not in base_ref and os.path.abspath(base_ref) in chain:
            raise ValueError(f"the chain of bases comes back to a checkpoint: {' -> '.join(chain + (base_ref,))}")
        token = _LOADING.set(chain)
        try:
            base_ckpt = load_fn(base_ref, device=device, dtype=dtype)
        finally:
            _LOADING.reset(token)
        if base_ckpt.ttt_config is not None:
            raise ValueError(f"the base {base_ref} of {directory} already has TTT layers; a base must be a plain model")
        if ttt is None:
            raise ValueError(f"{directory / CONFIG_NAME} names a base but no TTT config: it would add nothing")
        model, lm_config, notes = base_ckpt.model, base_ckpt.lm_config, list(base_ckpt.notes)
        mimi_ref = mimi_ref or base_ckpt.mimi_ref
        apply_ttt(model, ttt, device="meta")
        load_part(model, read_tensors(weights), model_shapes(model, ttt_prefixes(model)), str(weights), device)
    model.eval()
    return LoadedCheckpoint(
        model=model,
        mimi=None,
        mimi_ref=mimi_ref,
        lm_config=lm_config,
        ttt_config=ttt,
        kind="ours",
        ref=ref,
        notes=notes + legacy_notes(ttt),
    )
