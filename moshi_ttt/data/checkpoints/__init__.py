"""Checkpoints: our format (save/load), moshi's own (CheckpointInfo, Hub, moshi-finetune LoRA or full) and the
older TTT fork's layout (loaded in legacy mode). Only safetensors are read; every key is checked by name."""

from moshi_ttt.data.checkpoints.common import LoadedCheckpoint
from moshi_ttt.data.checkpoints.loader import load, load_mimi_codec
from moshi_ttt.data.checkpoints.ours import save
from moshi_ttt.data.checkpoints.shared import code_format_differences, same_codec, weight_bytes

__all__ = [
    "LoadedCheckpoint",
    "load",
    "code_format_differences",
    "load_mimi_codec",
    "same_codec",
    "save",
    "weight_bytes",
]
