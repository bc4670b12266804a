"""`load()`: one entry point for our checkpoints, moshi's (local or Hub) and the older TTT fork's."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel

from moshi_ttt.data.checkpoints.common import (
    HF_PREFIX,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    LoadedCheckpoint,
    check_weights_file,
    hub_file,
    hub_file_or_none,
    hub_folder,
    parse_hf_ref,
    read_json,
)
from moshi_ttt.data.checkpoints.inplace_format import is_inplace, load_inplace
from moshi_ttt.data.checkpoints.legacy_format import TRAINING_CONFIG, is_legacy, load_legacy
from moshi_ttt.data.checkpoints.moshi_format import load_moshi_dir, load_moshi_hub
from moshi_ttt.data.checkpoints.ours import CONFIG_NAME, is_ours, load_ours
from moshi_ttt.data.codec import is_codec_dir, load_codec

logger = logging.getLogger(__name__)


def load(
    ref: str | Path,
    *,
    base: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    legacy_causal: bool = False,
    load_mimi: bool = False,
) -> LoadedCheckpoint:
    """Loads a checkpoint of any supported kind; the model comes back in eval mode.

    Args:
        ref: a local directory or safetensors file, or `hf://owner/repo[/path]`. Kinds: ours (config.json with
            "format": "moshi-ttt"), the older TTT fork's (a directory with training_config.json), the In-Place TTT
            fork's (config.json with ttt_config.layer_frequency; `inplace_format.load_inplace` has its options), moshi's
            (CheckpointInfo: Hub repos, local copies, moshi-finetune outputs with LoRA or full weights).
        base: where the base weights come from when the checkpoint holds only part of them (ours with a base,
            older TTT checkpoints with lora.safetensors, moshi-finetune LoRA): a local path or hf:// reference.
            None uses the base the checkpoint names.
        device, dtype: of the model; TTT fast-weight parameters are float32 whatever `dtype`.
        legacy_causal: for legacy-mode checkpoints, the causal variant of the same weights (no future tokens of a
            mini-batch leak into earlier tokens' outputs).
        load_mimi: also build the Mimi codec from `mimi_ref` (may download it).
    Raises:
        FileNotFoundError: missing files, or a Hub reference that cannot be downloaded (the message says how to
            pre-download it).
        ValueError: pickle checkpoints, unknown/missing/mis-shaped keys (named), inconsistent configs.
    """
    ref = str(ref)
    if ref.startswith(HF_PREFIX):
        ckpt = _load_hub(ref, base=base, device=device, dtype=dtype, legacy_causal=legacy_causal)
    else:
        ckpt = _load_local(Path(ref), ref=ref, base=base, device=device, dtype=dtype, legacy_causal=legacy_causal)
    if ckpt.mimi_ref is not None and not ckpt.mimi_ref.startswith(HF_PREFIX) and not ref.startswith(HF_PREFIX):
        # A relative codec path in a local checkpoint is relative to the checkpoint's directory; resolved, so that
        # two checkpoints naming the same codec compare equal.
        local = Path(ref) if Path(ref).is_dir() else Path(ref).parent
        candidate = local / ckpt.mimi_ref
        codec = candidate if not Path(ckpt.mimi_ref).is_absolute() and candidate.exists() else Path(ckpt.mimi_ref)
        ckpt = dataclasses.replace(ckpt, mimi_ref=str(codec.resolve()))
    if load_mimi and ckpt.mimi_ref is not None:
        mimi = load_mimi_codec(ckpt.mimi_ref, ckpt.lm_config, device=device)
        ckpt = dataclasses.replace(ckpt, mimi=mimi)
    logger.info("loaded %s checkpoint %s", ckpt.kind, ref)
    return ckpt


def _load_local(
    path: Path, *, ref: str, base: str | None, device, dtype: torch.dtype, legacy_causal: bool
) -> LoadedCheckpoint:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        check_weights_file(path)  # refuses pickles whatever the suffix
        if path.suffix not in SAFETENSORS_SUFFIXES:
            raise ValueError(f"{path}: expected a .safetensors weights file or a checkpoint directory")
        if is_inplace(path):
            return load_inplace(path.parent, ref=ref, base=base, device=device, dtype=dtype, load_fn=load)
        return load_moshi_dir(path.parent, ref=ref, weights=path, base=base, device=device, dtype=dtype)
    config_path = path / CONFIG_NAME
    if config_path.is_file() and is_ours(read_json(config_path)):
        return load_ours(
            path, ref=ref, base=base, device=device, dtype=dtype, legacy_causal=legacy_causal, load_fn=load
        )
    if is_inplace(path):
        return load_inplace(path, ref=ref, base=base, device=device, dtype=dtype, load_fn=load)
    if is_legacy(path):
        return load_legacy(
            path, ref=ref, base=base, device=device, dtype=dtype, legacy_causal=legacy_causal, load_fn=load
        )
    return load_moshi_dir(path, ref=ref, base=base, device=device, dtype=dtype)


def _load_hub(ref: str, *, base: str | None, device, dtype: torch.dtype, legacy_causal: bool) -> LoadedCheckpoint:
    repo, sub = parse_hf_ref(ref)
    suffix = Path(sub).suffix
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{ref} is a pickle/torch.save checkpoint; only safetensors files are accepted")
    if suffix in SAFETENSORS_SUFFIXES:
        # One weights file of a repo: its directory's config.json, if any, comes along.
        folder = Path(sub).parent.as_posix()
        local = hub_file(repo, sub)
        config = hub_file_or_none(repo, f"{folder}/{CONFIG_NAME}" if folder != "." else CONFIG_NAME)
        directory = config.parent if config is not None else local.parent
        return load_moshi_dir(directory, ref=ref, weights=local, base=base, device=device, dtype=dtype)
    join = (lambda name: f"{sub}/{name}") if sub else (lambda name: name)
    config = hub_file_or_none(repo, join(CONFIG_NAME))
    kwargs = {"ref": ref, "base": base, "device": device, "dtype": dtype, "legacy_causal": legacy_causal}
    if config is not None and is_ours(read_json(config)):
        return load_ours(hub_folder(repo, sub), load_fn=load, **kwargs)
    if config is not None and isinstance(read_json(config).get("ttt_config"), dict):
        return load_inplace(hub_folder(repo, sub), ref=ref, base=base, device=device, dtype=dtype, load_fn=load)
    if hub_file_or_none(repo, join(TRAINING_CONFIG)) is not None:
        return load_legacy(hub_folder(repo, sub), load_fn=load, **kwargs)
    if sub:
        return load_moshi_dir(hub_folder(repo, sub), ref=ref, base=base, device=device, dtype=dtype)
    return load_moshi_hub(repo, ref=ref, device=device, dtype=dtype)


def load_mimi_codec(mimi_ref: str, lm_config: dict, device: torch.device | str = "cpu") -> MimiModel:
    """Builds the Mimi codec from a local safetensors file or an hf://owner/repo/file reference (moshi's config),
    or from a directory of ours (`moshi_ttt.data.codec.save_codec`).

    The number of codebooks follows the LM, as CheckpointInfo.get_mimi does.
    """
    if mimi_ref.startswith(HF_PREFIX):
        repo, sub = parse_hf_ref(mimi_ref)
        path = hub_file(repo, sub or loaders.MIMI_NAME)
    else:
        path = Path(mimi_ref)
        if is_codec_dir(path):  # one of our small Mimi-architecture codecs (e.g. the demo codec)
            return load_codec(path, device=device)
    check_weights_file(path)
    dep_q, n_q = int(lm_config.get("dep_q", 8)), int(lm_config.get("n_q", 8))
    return loaders.get_mimi(path, None, device=device, num_codebooks=max(dep_q, n_q - dep_q))
