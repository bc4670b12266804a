"""What the app's server settles before it listens: the Hub checkpoints it serves (flags and the environment, as a
Space sets it), whether it runs on ZeroGPU, and loading every model at start-up.

ZeroGPU (Hugging Face Spaces, the `spaces` package) runs each GPU-decorated call in a worker process forked from
the server, with a GPU for the call's duration only. Its documented pattern: load the models in the main process at
start-up and move them to "cuda" there (outside any decorated function, where CUDA is emulated); `spaces` packs
those tensors when Gradio launches (one copy per tensor, however many models hold it) and each worker moves them
onto its GPU as it starts. Models loaded lazily inside a decorated call would load from disk within the call's
allowance, and two 15 GB loads do not fit there. So, on ZeroGPU, `preload` loads every allowed checkpoint on the
CPU before `launch` and moves them to "cuda" together (`move_together`: a TTT checkpoint and its base keep one copy
of the base).
"""

from __future__ import annotations

import logging
import os
import re
import time
import typing as tp
from collections.abc import Mapping

import torch
from huggingface_hub import constants

from moshi_ttt.app import zerogpu as zerogpu_module
from moshi_ttt.app.models import ENV_CHECKPOINTS, ModelCache, needs_base
from moshi_ttt.data.checkpoints.hub import FORM, HF_PREFIX, HubRef, cached_snapshot
from moshi_ttt.data.checkpoints.shared import move_together, weight_bytes

logger = logging.getLogger(__name__)

# hf://owner/repo[@revision][/path] references served besides --checkpoint, separated by commas or whitespace (a
# Space's settings can name them: Variables). Loaded from the Hugging Face cache when HF_HUB_OFFLINE=1, as the CLI.
ENV_HUB_CHECKPOINTS = "MOSHI_TTT_HUB_CHECKPOINTS"
ENV_ZERO_GPU = "SPACES_ZERO_GPU"  # set to "true" by Hugging Face on ZeroGPU Spaces (what `spaces` itself reads)


def hub_checkpoints(flags: tp.Sequence[str] = (), env: Mapping[str, str] = os.environ) -> list[str]:
    """The Hub checkpoints to serve: the --checkpoint flags, then those of MOSHI_TTT_HUB_CHECKPOINTS.

    Raises:
        ValueError: an entry that is not an hf://owner/repo[@revision][/path] reference, named with where it came
            from.
    """
    named = [(ref, "--checkpoint") for ref in flags]
    named += [(ref, ENV_HUB_CHECKPOINTS) for ref in re.split(r"[,\s]+", env.get(ENV_HUB_CHECKPOINTS, "")) if ref]
    for ref, source in named:
        try:
            HubRef.parse(ref)
        except ValueError as e:
            if ref.startswith(HF_PREFIX):
                reason = str(e)  # names the entry and the form to write
            elif "://" in ref:
                reason = f"{ref!r} is not a Hub reference: only {FORM} is read, no other URL"
            else:
                reason = (f"{ref!r} is not a Hub reference ({FORM}); serve a local directory of checkpoints with "
                          f"--checkpoint-dir or {ENV_CHECKPOINTS}")  # fmt: skip
            raise ValueError(f"{source}: {reason}") from e
    return [ref for ref, _ in named]


def check_cached(refs: tp.Sequence[str], offline: bool | None = None) -> None:
    """With the Hub offline (HF_HUB_OFFLINE=1), checks that each reference's revision is in the local Hugging Face
    cache, so that a Space missing a file stops at start-up with the command to run, not at each visitor's run.

    Raises:
        FileNotFoundError: the first reference not cached, with the `hf download` command that caches it.
    """
    if not (constants.HF_HUB_OFFLINE if offline is None else offline):
        return
    for ref in refs:
        hub = HubRef.parse(ref)
        snapshot = cached_snapshot(hub)
        if snapshot is None or (hub.path and not (snapshot / hub.path).exists()):
            raise FileNotFoundError(
                f"{ref} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                f"run `{hub.download_command()}` with the same HF_HOME where there is network (on a Space, list the "
                "repo in preload_from_hub), or unset HF_HUB_OFFLINE"
            )


def on_zerogpu(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the server runs on a ZeroGPU Space (SPACES_ZERO_GPU true, read as the `spaces` package reads it)."""
    return env.get(ENV_ZERO_GPU, "").lower() in ("1", "t", "true")


def check_device(device: str, zerogpu: bool) -> None:
    """Refuses a CUDA device where there is none, before anything loads onto it (torch's own error would come as a
    traceback, at start-up or at the first run). On ZeroGPU the `spaces` package emulates CUDA at start-up.

    Raises:
        ValueError: the sentence to show.
    """
    if not device.startswith("cuda") or torch.cuda.is_available() or (zerogpu and zerogpu_module.HAS_SPACES):
        return
    if zerogpu:
        raise ValueError(
            f"{ENV_ZERO_GPU} is set but this machine has no GPU and no `spaces` package: unset {ENV_ZERO_GPU} off "
            "Hugging Face Spaces (or pip install spaces on a ZeroGPU Space)"
        )
    raise ValueError(f"--device {device}, but torch sees no CUDA GPU here: use --device cpu")


def preload(cache: ModelCache, device: str | None = None) -> dict[str, float]:
    """Loads every checkpoint of the cache's allow-list now, once each, in the allow-list's order (a TTT checkpoint
    over a base loaded before takes that base's tensors; an In-Place checkpoint in the fork's lora layout, which
    loads over the baseline each run chooses, is left to its first run); then, given a `device` other than the
    cache's, moves them all there together and makes it the cache's device.

    Args:
        cache: the server's models (loaded on its device, "cpu" on ZeroGPU).
        device: where the models go once loaded (ZeroGPU: "cuda"); None: they stay.
    Returns:
        The seconds each checkpoint took to load, by name.
    """
    seconds = {}
    for name in cache.names():
        if needs_base(cache.allow_list[name].ref):  # loads over the baseline a run chooses, at that run
            logger.warning("%s loads over the baseline each run chooses: not loaded at start-up", name)
            continue
        start = time.perf_counter()
        cache.get(name)
        seconds[name] = time.perf_counter() - start
        logger.info("loaded %s in %.1f s", name, seconds[name])
    loaded = [cache.get(name) for name in seconds]
    models = [module for ckpt in loaded for module in (ckpt.model, ckpt.mimi)]
    if device is not None and device != cache.device:
        move_together(models, device=device)
        cache.device = device
    held = weight_bytes(*(m for m in models if m is not None))
    logger.info("%d checkpoint(s) on %s, %.2f GiB of weights", len(loaded), cache.device, held / 2**30)
    return seconds
