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

from moshi_ttt.app.models import ModelCache, needs_base
from moshi_ttt.data.checkpoints.hub import HubRef
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
            raise ValueError(f"{source}: {ref!r} is not a Hub checkpoint: {e}") from e
    return [ref for ref, _ in named]


def on_zerogpu(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the server runs on a ZeroGPU Space (SPACES_ZERO_GPU true, read as the `spaces` package reads it)."""
    return env.get(ENV_ZERO_GPU, "").lower() in ("1", "t", "true")


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
