"""`load()`: one entry point for our checkpoints, moshi's (local or Hub) and the older TTT fork's."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel

from moshi_ttt.data.checkpoints import shared
from moshi_ttt.data.checkpoints.common import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    LoadedCheckpoint,
    check_weights_file,
    read_json,
)
from moshi_ttt.data.checkpoints.hub import FORM, HF_PREFIX, HubRef, hub_file, hub_file_or_none, hub_folder
from moshi_ttt.data.checkpoints.inplace_format import FULL_NAME, LORA_NAME, is_inplace, load_inplace
from moshi_ttt.data.checkpoints.inplace_layout import CONSOLIDATED, STEP, consolidated_of, find_steps
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
    dtype: torch.dtype | None = torch.float32,
    legacy_causal: bool = False,
    load_mimi: bool = False,
    share: bool = True,
) -> LoadedCheckpoint:
    """Loads a checkpoint of any supported kind; the model comes back in eval mode.

    Models of one process loaded over the same base share its tensors, in any loading order (`shared.py`): a TTT
    checkpoint over `hf://kyutai/moshiko-pytorch-bf16` and that baseline hold one copy of the base weights, and
    the TTT checkpoint only adds its TTT tensors. Shared tensors are read-only: train a model loaded with
    share=False.

    Args:
        ref: a local directory or safetensors file, or `hf://owner/repo[@revision][/path]`. Kinds: ours
            (config.json with "format": "moshi-ttt"), the older TTT fork's (a directory with training_config.json),
            the In-Place TTT fork's (config.json with ttt_config.layer_frequency; `inplace_format.load_inplace` has
            its options), moshi's (CheckpointInfo: Hub repos, local copies, moshi-finetune outputs with LoRA or full
            weights). Hub references load offline (HF_HUB_OFFLINE=1 or no network) once their files are in the
            local Hugging Face cache (`hf download owner/repo`).
        base: where the base weights come from when the checkpoint holds only part of them (ours with a base,
            older TTT checkpoints with lora.safetensors, moshi-finetune LoRA): a local path or hf:// reference.
            None uses the base the checkpoint names.
        device, dtype: of the model; TTT fast-weight parameters are float32 whatever `dtype`. dtype None ("auto"):
            float32, and bfloat16 from 4e9 parameters on (Moshi 7B), on every device (`common.resolve_dtype`).
        legacy_causal: for legacy-mode checkpoints, the causal variant of the same weights (no future tokens of a
            mini-batch leak into earlier tokens' outputs).
        load_mimi: also build the Mimi codec from `mimi_ref` (may download it); one codec per file and device is
            shared by the checkpoints that name it.
        share: take the base tensors of a model this process already loaded, and offer this one's; False reads
            every file again and gives a model that shares nothing.
    Returns:
        The LoadedCheckpoint (model, config, codec reference, notes).
    Raises:
        FileNotFoundError: missing files, or a Hub reference that cannot be downloaded and is not in the local
            cache (the message says how to pre-download it).
        ValueError: pickle checkpoints, unknown/missing/mis-shaped keys (named), inconsistent configs.
    """
    ref = str(ref)
    key = shared.base_key(ref, base, device) if share else None
    ckpt = shared.take(key, dtype, ref) if key is not None else None
    if ckpt is None:
        ckpt = _load_new(ref, base=base, device=device, dtype=dtype, legacy_causal=legacy_causal, share=share)
        if key is not None and shared.is_plain(ckpt):
            shared.offer(key, ckpt)
    if load_mimi and ckpt.mimi_ref is not None:
        mimi = load_mimi_codec(ckpt.mimi_ref, ckpt.lm_config, device=device, share=share)
        ckpt = dataclasses.replace(ckpt, mimi=mimi)
    logger.info("loaded %s checkpoint %s", ckpt.kind, ref)
    return ckpt


def _load_new(ref: str, *, base: str | None, device, dtype, legacy_causal: bool, share: bool) -> LoadedCheckpoint:
    """`load` from the files (the base of a checkpoint that names one may still come from the pool)."""
    kwargs = {"base": base, "device": device, "dtype": dtype, "legacy_causal": legacy_causal, "share": share}
    if ref.startswith(HF_PREFIX):
        ckpt = _load_hub(ref, **kwargs)
    else:
        ckpt = _load_local(Path(ref), ref=ref, **kwargs)
    if ckpt.mimi_ref is not None and not ckpt.mimi_ref.startswith(HF_PREFIX) and not ref.startswith(HF_PREFIX):
        # Each format joins a relative codec path to the checkpoint's own folder (never the working directory);
        # made absolute here, lexically: resolving would follow a Hub snapshot's link to its blob, whose name lacks
        # the .safetensors that moshi's get_mimi reads the format from.
        ckpt = dataclasses.replace(ckpt, mimi_ref=os.path.abspath(ckpt.mimi_ref))
    return ckpt


def _load_local(
    path: Path, *, ref: str, base: str | None, device, dtype: torch.dtype | None, legacy_causal: bool, share: bool
) -> LoadedCheckpoint:
    if not path.exists():
        if "://" in ref or ref.lower().startswith("hf:"):  # a URL, or hf:// mistyped: Path() has already mangled it
            raise FileNotFoundError(
                f"checkpoint {ref!r} is neither a local path nor a Hub reference: write {FORM} for the Hugging Face "
                "Hub (no other URL is read: download the files and give their directory)"
            )
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        check_weights_file(path)  # refuses pickles whatever the suffix
        if path.suffix not in SAFETENSORS_SUFFIXES:
            raise ValueError(f"{path}: expected a .safetensors weights file or a checkpoint directory")
        if is_inplace(path):
            return load_inplace(path.parent, ref=ref, base=base, device=device, dtype=dtype, load_fn=load)
        return load_moshi_dir(path.parent, ref=ref, weights=path, base=base, device=device, dtype=dtype)
    path = _checkpoint_folder(path)
    config_path = path / CONFIG_NAME
    kwargs = {"ref": ref, "base": base, "device": device, "dtype": dtype, "legacy_causal": legacy_causal}
    if config_path.is_file() and is_ours(read_json(config_path)):
        return load_ours(path, load_fn=functools.partial(load, share=share), **kwargs)
    if is_codec_dir(path):
        raise ValueError(f"{path} is a codec (Mimi), not a language-model checkpoint: a checkpoint names it")
    if is_inplace(path):
        return load_inplace(
            path, ref=ref, base=base, device=device, dtype=dtype, load_fn=functools.partial(load, share=share)
        )
    if is_legacy(path):
        return load_legacy(path, load_fn=functools.partial(load, share=share), **kwargs)
    return load_moshi_dir(path, ref=ref, base=base, device=device, dtype=dtype)


def _checkpoint_folder(path: Path) -> Path:
    """The folder to load for a local directory: itself, or the `consolidated/` folder of a step folder of the
    In-Place fork's trainer (`checkpoint_000500/`, inplace_layout.py).

    Raises:
        ValueError: a folder without config.json that holds several saved steps (a run or its checkpoints/): names
            them and asks for one.
    """
    if (path / CONFIG_NAME).is_file():
        return path
    consolidated = consolidated_of(path)
    if consolidated is not None:
        return consolidated
    steps = find_steps(path)
    if len(steps) == 1:
        return steps[0].path
    if steps:
        shown = ", ".join(s.name for s in steps[:4]) + (f" and {len(steps) - 4} more" if len(steps) > 4 else "")
        raise ValueError(
            f"{path} is a folder of the In-Place fork's trainer with {len(steps)} saved steps ({shown}); give one "
            f"step's folder, e.g. {steps[-1].path.parent}"
        )
    if STEP.match(path.name):
        raise FileNotFoundError(
            f"{path} is named as a step folder of the In-Place fork's trainer but holds no {CONSOLIDATED}/"
            f"{CONFIG_NAME} (the trainer writes {CONSOLIDATED}/ with {CONFIG_NAME} and {LORA_NAME} or {FULL_NAME})"
        )
    return path


def inplace_over_base(ref: str) -> bool:
    """Whether `ref` (a local folder or hf:// reference) is an In-Place checkpoint in the fork's lora.safetensors
    layout: it holds only what it changes and loads over a base (`load(ref, base=...)`; without one, the fork's
    default, hf://kyutai/moshiko-pytorch-bf16). A Hub reference's config.json and lora.safetensors are downloaded
    (or read from the local cache) to tell; its consolidated.safetensors too when it has one.

    Raises:
        FileNotFoundError: a Hub reference that cannot be reached and is not cached (see `hub.hub_call`).
    """
    if not ref.startswith(HF_PREFIX):
        path = Path(ref)
        if not path.is_dir():
            return False
        try:
            path = _checkpoint_folder(path)  # as `load` reads it: a step folder, or a run holding one step
        except (ValueError, FileNotFoundError):
            return False  # `load` says what is wrong with it
        if (path / CONFIG_NAME).is_file() and is_ours(read_json(path / CONFIG_NAME)):
            return False
        return not (path / FULL_NAME).is_file() and (path / LORA_NAME).is_file() and is_inplace(path)
    hub = HubRef.parse(ref)
    if Path(hub.path).suffix:  # one file of a repo: loaded as moshi's weights
        return False
    config = hub_file_or_none(hub, hub.file(CONFIG_NAME))
    if config is None:
        return False
    raw = read_json(config)
    if is_ours(raw) or not isinstance(raw.get("ttt_config"), dict):  # as `_load_hub` tells the kinds apart
        return False
    return hub_file_or_none(hub, hub.file(LORA_NAME)) is not None and hub_file_or_none(hub, hub.file(FULL_NAME)) is None


def _load_hub(
    ref: str, *, base: str | None, device, dtype: torch.dtype | None, legacy_causal: bool, share: bool
) -> LoadedCheckpoint:
    hub = HubRef.parse(ref)
    suffix = Path(hub.path).suffix
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{ref} is a pickle/torch.save checkpoint; only safetensors files are accepted")
    if suffix in SAFETENSORS_SUFFIXES:
        # One weights file of a repo: its directory's config.json, if any, comes along.
        folder = Path(hub.path).parent.as_posix()
        local = hub_file(hub, hub.path)
        config = hub_file_or_none(hub, f"{folder}/{CONFIG_NAME}" if folder != "." else CONFIG_NAME)
        directory = config.parent if config is not None else local.parent
        return load_moshi_dir(directory, ref=ref, weights=local, base=base, device=device, dtype=dtype)
    config = hub_file_or_none(hub, hub.file(CONFIG_NAME))
    kwargs = {"ref": ref, "base": base, "device": device, "dtype": dtype, "legacy_causal": legacy_causal}
    load_fn = functools.partial(load, share=share)
    if config is not None and is_ours(read_json(config)):
        return load_ours(hub_folder(hub, hub.path), load_fn=load_fn, **kwargs)
    if config is not None and isinstance(read_json(config).get("ttt_config"), dict):
        return load_inplace(hub_folder(hub, hub.path), ref=ref, base=base, device=device, dtype=dtype, load_fn=load_fn)
    if hub_file_or_none(hub, hub.file(TRAINING_CONFIG)) is not None:
        return load_legacy(hub_folder(hub, hub.path), load_fn=load_fn, **kwargs)
    if hub.path:
        return load_moshi_dir(hub_folder(hub, hub.path), ref=ref, base=base, device=device, dtype=dtype)
    return load_moshi_hub(hub, ref=ref, device=device, dtype=dtype)


def load_mimi_codec(
    mimi_ref: str, lm_config: dict, device: torch.device | str = "cpu", share: bool = True
) -> MimiModel:
    """Builds the Mimi codec from a local safetensors file or an hf://owner/repo[@revision]/file reference (moshi's
    config), or from a directory of ours (`moshi_ttt.data.codec.save_codec`).

    The number of codebooks follows the LM, as CheckpointInfo.get_mimi does. With `share`, a codec already built
    from the same file for the same device and codebooks is returned (encoding does not change it).
    """
    if mimi_ref.startswith(HF_PREFIX):
        hub = HubRef.parse(mimi_ref)
        path = hub_file(hub, hub.path or loaders.MIMI_NAME)
    else:
        path = Path(mimi_ref)
        if is_codec_dir(path):  # one of our small Mimi-architecture codecs (e.g. the demo codec)
            return load_codec(path, device=device)
    check_weights_file(path)
    dep_q, n_q = int(lm_config.get("dep_q", 8)), int(lm_config.get("n_q", 8))
    codebooks = max(dep_q, n_q - dep_q)

    def build() -> MimiModel:
        return loaders.get_mimi(path, None, device=device, num_codebooks=codebooks)

    return shared.shared_mimi(path, codebooks, device, build) if share else build()
