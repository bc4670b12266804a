"""The options of one scoring run: built once at the edge (the app's controls, the CLI's flags, a library call),
validated once here, and passed down unchanged to the TTT layers' streaming sessions.

    slider -> app.inputs (raw JSON) -> RunOptions -> app.engine / evaluate -> scoring.iter_score
           -> ttt.apply.set_streaming_options -> each block's SessionOptions -> ttt.step -> ttt.ops

Persistence has one definition everywhere (docs/ARCHITECTURE.md, "Persistence"): with `persistent_states` on, the
fast weights carry through the whole file; off, they go back to W_base every `reset_every` tokens counted from the
start of the file (default: the model's attention context, so TTT then remembers nothing that attention could not
see). The resets sit at the same absolute positions whatever the mode or chunk size, so "full", "chunked" and
"stream" still give the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp
from dataclasses import dataclass

MODES = ("full", "chunked", "stream")
# What the model reads in its text stream while it is scored (docs/ARCHITECTURE.md, "Scoring"):
# "padding": moshi's text padding token at every step (what Moshi reads while silent in text);
# "zero": moshi's zero token (embedded as zeros: no text input), the older TTT fork's minimal-pair convention;
# "greedy": the model's own greedy text while it speaks the audio (its inner monologue: as moshi's LMGen produces it
# for a model without TTT or with persistent states; scoring/text_stream.py says when the two differ);
# "transcript": a transcript with word timestamps, laid out as moshi-finetune trains (scored: a text-stream loss).
TEXT_STREAMS = ("padding", "zero", "greedy", "transcript")
# The largest mini_batch_size, of a run and of a TTTConfig (config.py imports it): above Moshi's 3000-token
# attention context (one update per context window stays possible), 4 x the app's 1024 and 256 x the paper's 16. A
# layer's learnable_token_idx has b entries, and a full mini-batch's dual form builds [B * H, b, b] matrices; a call
# shorter than b costs nothing more in b (`position_factors` builds the factors it reads).
MAX_MINI_BATCH_SIZE = 4096


def _weight(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _whole(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> None:
    # bool is an int in Python, and JSON true is not a number anyone meant.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


@dataclass(frozen=True)
class RunOptions:
    """How to score one run; None takes the checkpoint's own value (its TTTConfig) or the documented default."""

    # "full" (one LMModel.forward), "chunked" (chunks of chunk_size tokens) or "stream" (one token at a time): the
    # same numbers, different speed and memory.
    mode: str = "chunked"
    # Tokens per forward call in "chunked" mode; None: min(250, model context), in whole TTT mini-batches. Must not
    # exceed the model's attention context.
    chunk_size: int | None = None
    # TTT inner-loop mini-batch size b for this run (In-Place layers: their chunk size), at most
    # MAX_MINI_BATCH_SIZE; None: each TTT layer's own (TTTConfig.mini_batch_size).
    mini_batch_size: int | None = None
    # Carry the fast weights through the whole file (True) or reset them every `reset_every` tokens (False);
    # None: the checkpoint's TTTConfig.persistent_states.
    persistent_states: bool | None = None
    # Tokens between two resets of the fast weights to W_base when persistent_states is False, counted from the
    # start of the file; None: the model's attention context. Giving it turns persistence off.
    reset_every: int | None = None
    # Record drift and inner-loop losses of the TTT layers (ScoreResult.telemetry).
    telemetry: bool = True
    # iter_score yields a partial result every `record_every` tokens (at chunk boundaries) and one at the end.
    record_every: int = 250
    # The text stream the model reads (TEXT_STREAMS above); "transcript" needs the text tokens given to scoring.
    text_stream: str = "padding"
    # moshi-finetune's loss weights (its TrainArgs, finetune/loss.py), for the weighted loss views reported beside
    # the plain mean: codebook 0 (semantic) weighs this many times an acoustic codebook (1.0: moshi-finetune's
    # default; the older TTT fork trained with 100), and text padding tokens weigh this much in the text loss (0.5:
    # moshi-finetune's default). They change reports only, never the per-token losses.
    first_codebook_weight_multiplier: float = 1.0
    text_padding_weight: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("chunk_size", "mini_batch_size", "reset_every"):
            if getattr(self, name) is not None:
                _whole(name, getattr(self, name), maximum=MAX_MINI_BATCH_SIZE if name == "mini_batch_size" else None)
        _whole("record_every", self.record_every)
        if self.persistent_states is not None and not isinstance(self.persistent_states, bool):
            raise ValueError(f"persistent_states must be true, false or None, got {self.persistent_states!r}")
        if self.reset_every is not None and self.persistent_states is True:
            raise ValueError("reset_every resets the fast weights, so persistent_states cannot be true with it")
        if not isinstance(self.telemetry, bool):
            raise ValueError(f"telemetry must be true or false, got {self.telemetry!r}")
        if not isinstance(self.text_stream, str) or self.text_stream not in TEXT_STREAMS:
            raise ValueError(f"text_stream must be one of {TEXT_STREAMS}, got {self.text_stream!r}")
        _weight("first_codebook_weight_multiplier", self.first_codebook_weight_multiplier)
        _weight("text_padding_weight", self.text_padding_weight)

    def replace(self, **changes: tp.Any) -> RunOptions:
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)

    def resets(self, layer_persistent: bool, context: int | None) -> int | None:
        """Tokens between resets for a layer whose checkpoint says `layer_persistent`, in a model with attention
        `context`; None: never reset.

        Raises:
            ValueError: persistence off in a model without an attention context and no `reset_every`.
        """
        persistent = self.persistent_states
        if persistent is None:
            persistent = layer_persistent and self.reset_every is None
        if persistent:
            return None
        if self.reset_every is not None:
            return self.reset_every
        if context is None:
            raise ValueError("the model has no attention context: give reset_every (tokens) to turn persistence off")
        return context


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RunOptions))


def run_options(options: RunOptions | None = None, **shortcuts: tp.Any) -> RunOptions:
    """`options` as given, or a RunOptions built from keyword shortcuts (None: the default); never both.

    Raises:
        ValueError: both, an unknown option, or a bad value.
        TypeError: `options` that is not a RunOptions.
    """
    given = {name: value for name, value in shortcuts.items() if value is not None}
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown run options {unknown}; expected some of {list(OPTION_NAMES)}")
    if options is None:
        return RunOptions(**given)
    if not isinstance(options, RunOptions):
        raise TypeError(f"options must be a RunOptions, got {type(options).__name__}")
    if given:
        raise ValueError(f"pass either a RunOptions or separate options, not both (got options and {sorted(given)})")
    return options
