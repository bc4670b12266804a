"""moshi-ttt: Test-Time Training layers inside Kyutai's Moshi, with exact streaming, chunked and full scoring."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic)

from moshi_ttt.compat.streaming import exact_streaming, widen_kv_caches
from moshi_ttt.config import LegacyConfig, TTTConfig
from moshi_ttt.data.checkpoints import LoadedCheckpoint, load, save
from moshi_ttt.ttt.apply import apply_ttt, set_streaming_options, ttt_blocks, ttt_states
from moshi_ttt.ttt.layer import TTTBlock, TTTState, drift
from moshi_ttt.ttt.ops import FastWeights, LinearWeights, ttt_linear, ttt_mlp
from moshi_ttt.ttt.state import FastWeightState

__all__ = [
    "FastWeightState",
    "FastWeights",
    "LegacyConfig",
    "LinearWeights",
    "LoadedCheckpoint",
    "TTTBlock",
    "TTTConfig",
    "TTTState",
    "apply_ttt",
    "drift",
    "exact_streaming",
    "load",
    "save",
    "set_streaming_options",
    "ttt_blocks",
    "ttt_linear",
    "ttt_mlp",
    "ttt_states",
    "widen_kv_caches",
]

# Scoring (issue 3).
from moshi_ttt.options import RunOptions  # noqa: E402
from moshi_ttt.scoring.teacher_forcing import ScoreResult, iter_score, iter_score_blocks, score  # noqa: E402

__all__ += ["RunOptions", "ScoreResult", "iter_score", "iter_score_blocks", "score"]
