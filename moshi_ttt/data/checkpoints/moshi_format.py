"""moshi's own checkpoints, through `moshi.models.loaders.CheckpointInfo`.

Covers Hub repos such as `hf://kyutai/moshiko-pytorch-bf16`, local copies of them, and moshi-finetune outputs:
`consolidated/` with `consolidated.safetensors` (full weights) or `lora.safetensors` plus a `config.json` with
`lora`, `lora_rank`, `lora_scaling` (the adapter is merged into the base weights, as moshi's `fuse_lora`).
Keys and shapes are checked before moshi loads anything, so a mismatch is a ValueError naming the keys.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.modules.lora import replace_all_linear_with_lora

from moshi_ttt.compat.moshi import default_lm_kwargs
from moshi_ttt.data.checkpoints.common import (
    PICKLE_SUFFIXES,
    LoadedCheckpoint,
    SkipInitOnMeta,
    check_keys,
    check_weights_file,
    lm_kwargs,
    meta_lm,
    model_shapes,
    read_json,
    resolve_dtype,
    tensor_shapes,
)
from moshi_ttt.data.checkpoints.hub import HF_PREFIX, HubRef, confined_ref, hub_call, hub_file, hub_file_or_none

logger = logging.getLogger(__name__)

FULL_NAMES = (loaders.MOSHI_NAME, "consolidated.safetensors")  # full weights, in order of preference
LORA_NAME = "lora.safetensors"  # moshi-finetune's adapter file


def _find_weights(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory} holds pickle checkpoints {pickles} but no safetensors weights ({', '.join(names)}); "
            "only safetensors files are accepted"
        )
    return None


def base_weights(base: str | None) -> Path:
    """The full moshi weights that a LoRA adapter goes on: a local file or directory, or a Hub reference."""
    if base is None:
        base = f"{HF_PREFIX}{loaders.DEFAULT_REPO}"
    if base.startswith(HF_PREFIX):
        hub = HubRef.parse(base)
        return hub_file(hub, hub.path or loaders.MOSHI_NAME)
    path = Path(base)
    if path.is_dir():
        found = _find_weights(path, FULL_NAMES)
        if found is None:
            raise FileNotFoundError(f"base {path} holds none of {list(FULL_NAMES)}")
        return found
    check_weights_file(path)
    return path


def check_moshi_files(lm_config: dict, weights: Path, lora_weights: Path | None, lora_rank: int) -> None:
    """Compares the files' keys and shapes with the LMModel that lm_config builds (on the meta device).

    Raises:
        ValueError: naming unknown, missing or mis-shaped keys of either file.
    """
    model = meta_lm(lm_config, torch.float32)
    check_keys(model_shapes(model), tensor_shapes(weights), str(weights))
    if lora_weights is not None:
        replace_all_linear_with_lora(model, lora_rank, 1.0, device="meta")
        expected = {k: s for k, s in model_shapes(model).items() if ".lora_A." in k or ".lora_B." in k}
        check_keys(expected, tensor_shapes(lora_weights), str(lora_weights))


def _from_info(
    info: loaders.CheckpointInfo, *, ref: str, mimi_ref: str | None, device, dtype: torch.dtype | None, notes: list[str]
) -> LoadedCheckpoint:
    raw_lm = dict(info.lm_config) if info.lm_config is not None else default_lm_kwargs()
    lm_config = lm_kwargs(raw_lm)
    lora_rank = int(raw_lm.get("lora_rank", 128))
    check_moshi_files(lm_config, Path(info.moshi_weights), info.lora_weights, lora_rank)
    # fuse_lora: the adapter is merged, so the result is a plain LMModel that TTT and scoring can use.
    # moshi builds the LMModel on the meta device and assigns every tensor of the file: its initialisation is skipped.
    with SkipInitOnMeta():
        model = info.get_moshi(device=device, dtype=resolve_dtype(dtype, lm_config, device), fuse_lora=True)
    model.eval()
    return LoadedCheckpoint(
        model=model,
        mimi=None,
        mimi_ref=mimi_ref,
        lm_config=lm_config,
        ttt_config=None,
        kind="moshi",
        ref=ref,
        notes=notes,
    )


def load_moshi_dir(
    directory: Path,
    *,
    ref: str,
    weights: Path | None = None,
    base: str | None,
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> LoadedCheckpoint:
    """A local moshi checkpoint directory (or one weights file of it) via CheckpointInfo."""
    config_path = directory / "config.json"
    raw = read_json(config_path) if config_path.is_file() else None
    lm_config = lm_kwargs(raw) if raw is not None else default_lm_kwargs()
    notes = [] if raw is not None else [f"{directory} has no config.json: assumed to be Moshi 7B (moshiko)"]
    lora = bool(raw.get("lora", False)) if raw is not None else False
    full_names = (raw.get("moshi_name", loaders.MOSHI_NAME), *FULL_NAMES) if raw is not None else FULL_NAMES
    lora_path = None
    if lora:
        lora_path = directory / confined_ref(raw.get("lora_name", LORA_NAME), directory, "lora_name")
        check_weights_file(lora_path)
        weights = weights or _find_weights(directory, full_names) or base_weights(base)
        notes.append(
            f"moshi-finetune LoRA adapter (rank {raw.get('lora_rank', 128)}, scaling {raw.get('lora_scaling', 2.0)}) "
            f"merged into the base weights {weights}"
        )
    elif weights is None:
        weights = _find_weights(directory, full_names)
        if weights is None:
            raise FileNotFoundError(f"{directory} holds no moshi weights (looked for {list(full_names)})")
    check_weights_file(weights)
    mimi_name = raw.get("mimi_name", loaders.MIMI_NAME) if raw is not None else loaders.MIMI_NAME
    mimi_name = confined_ref(mimi_name, directory, "mimi_name")
    mimi_path = directory / mimi_name
    mimi_ref = str(mimi_path) if mimi_path.is_file() else f"{HF_PREFIX}{loaders.DEFAULT_REPO}/{loaders.MIMI_NAME}"
    info_config = None
    if raw is not None:
        info_config = dict(lm_config)
        for key in ("lora", "lora_rank", "lora_scaling"):
            if key in raw:
                info_config[key] = raw[key]
    info = loaders.CheckpointInfo(
        moshi_weights=weights,
        mimi_weights=mimi_path,  # only read by get_mimi, which `load` calls only for an existing mimi_ref
        tokenizer=directory
        / confined_ref((raw or {}).get("tokenizer_name", loaders.TEXT_TOKENIZER_NAME), directory, "tokenizer_name"),
        lm_config=info_config,
        raw_config=raw,
        lora_weights=lora_path,
    )
    return _from_info(info, ref=ref, mimi_ref=mimi_ref, device=device, dtype=dtype, notes=notes)


def load_moshi_hub(hub: HubRef, *, ref: str, device: torch.device | str, dtype: torch.dtype | None) -> LoadedCheckpoint:
    """A moshi Hub repo (e.g. kyutai/moshiko-pytorch-bf16) at the reference's revision, via CheckpointInfo.

    Its config.json is optional (moshi assumes Moshi 7B without one); offline, a config.json that is not in the cached
    snapshot is taken as absent, where moshi's `from_hf_repo` would stop at the probe.
    """
    config = hub_file_or_none(hub, "config.json")
    notes = []
    if config is not None:
        info = hub_call(
            hub,
            "the moshi checkpoint",
            lambda: loaders.CheckpointInfo.from_hf_repo(hub.repo, config_path=config, revision=hub.revision),
        )
    else:  # what from_hf_repo does for a repo without config.json
        notes.append(f"{hub} has no config.json: assumed to be Moshi 7B (moshiko)")
        info = loaders.CheckpointInfo(
            moshi_weights=hub_file(hub, loaders.MOSHI_NAME),
            mimi_weights=hub_file(hub, loaders.MIMI_NAME),
            tokenizer=hub_file(hub, loaders.TEXT_TOKENIZER_NAME),
        )
    if info.lora_weights is not None:
        check_weights_file(Path(info.lora_weights))
    return _from_info(info, ref=ref, mimi_ref=str(info.mimi_weights), device=device, dtype=dtype, notes=notes)
