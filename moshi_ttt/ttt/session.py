"""Per-session TTT options and observers: one value held by each TTT block's streaming state.

A streaming session of a model (scoring, the app, the training carry) may read with another mini-batch size or
persistence than the layers' TTTConfig, and may be observed (telemetry). All of that is one `SessionOptions` in the
state of each TTT block (`state.session`), written only through `configure`: the model itself never changes, and
the options travel with the state when the app swaps streaming states of a shared model in and out.

Values come validated from `moshi_ttt.options.RunOptions` (scoring) or the layer's TTTConfig; `configure` checks only
what depends on the state (a legacy layer's fixed mini-batch size, a session that has already read).

Two kinds of reset, both per row and respecting moshi's exec_mask:
- `persistent=False` (the layer's TTTConfig, raw streaming such as moshi's LMGen): every forward call starts at W_base.
- `reset_every=N` (a scoring run with persistence off, docs/ARCHITECTURE.md "Persistence"): the fast weights go back
  to W_base each time a row has read N tokens since its last reset, wherever the calls start and end, so every mode
  and chunk size gives the same numbers (`reset_segments` cuts a call there).
"""

from __future__ import annotations

import dataclasses
import itertools
import typing as tp

import torch
from moshi.modules.streaming import State

from moshi_ttt.ttt.inplace_math import ChunkUpdate
from moshi_ttt.ttt.weights import AnyWeights


class Observer(tp.Protocol):
    """What a TTT block reports while it reads (telemetry.py's recorder is one)."""

    def inputs(self, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Called with a call's keys and values [B, H, T, D] before the inner loop reads them."""

    def update(self, w_start: AnyWeights, w_end: AnyWeights) -> None:
        """Called at every mini-batch the inner loop completes: its start weights W0 and the weights after it."""


class InPlaceObserver(tp.Protocol):
    """What an In-Place TTT layer reports while it reads (scoring/inplace_telemetry.py's recorder is one)."""

    def read(self, tokens: int) -> None:
        """Called before each part of a call is read, with its number of tokens."""

    def chunk(self, update: ChunkUpdate) -> None:
        """Called at every chunk the part completes, with what its update did to the fast weight."""


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """The options of one TTT block for one streaming session."""

    mini_batch_size: int  # inner-loop mini-batch size b
    persistent: bool  # keep the fast weights from one forward call to the next (False: every call starts at W_base)
    observer: Observer | InPlaceObserver | None = None  # telemetry; None: nothing observes this block
    reset_every: int | None = None  # back to W_base every N tokens a row reads (counted from its reset); None: never


class SessionOptionsView:
    """Read-only shortcuts for a state class with a `session: SessionOptions` field."""

    session: SessionOptions
    # True where the mini-batch size is part of the layer's trained math (legacy layers): `configure` refuses to
    # change it.
    fixed_mini_batch_size: tp.ClassVar[bool] = False

    @property
    def mini_batch_size(self) -> int:
        return self.session.mini_batch_size

    @property
    def persistent(self) -> bool:
        return self.session.persistent

    @property
    def reset_every(self) -> int | None:
        return self.session.reset_every


def configure(state: State, **changes: tp.Any) -> None:
    """Replaces fields (mini_batch_size, persistent, reset_every, observer) of the `session` of a TTT block's state
    (TTTState, LegacyTTTState, InPlaceState, whose mini-batch is its chunk): the one writer of session options.

    Raises ValueError for a change of a legacy layer's mini-batch size, a mini-batch size changed after the session
    read its first token, or a legacy layer's reset period that cuts its mini-batches."""
    b = changes.get("mini_batch_size", state.session.mini_batch_size)
    if b != state.session.mini_batch_size:
        if state.fixed_mini_batch_size:
            raise ValueError(
                f"this is a legacy TTT layer: its mini-batch size ({state.session.mini_batch_size}) is part of the "
                "checkpoint's math and cannot change"
            )
        if bool((state.offset > 0).any()) or bool((state.position > 0).any()):
            raise ValueError("the mini-batch size of a session must be set before its first forward")
    period = changes.get("reset_every", state.session.reset_every)
    if period is not None and state.fixed_mini_batch_size and period % b:
        raise ValueError(f"a legacy TTT layer reads whole mini-batches of {b} tokens: reset_every ({period}) must be "
                         f"a multiple of {b}")  # fmt: skip
    state.session = dataclasses.replace(state.session, **changes)


def reset_segments(state: State, tokens: int) -> list[int]:
    """Lengths of the parts of a call of `tokens` tokens, cut where an executing row has read `reset_every` tokens
    since its last reset (`periodic_reset` then resets it before the next part). One part without a period."""
    period = state.session.reset_every
    if period is None or tokens <= 1:
        return [tokens]
    cuts = {0, tokens}
    for offset, runs in zip(state.offset.tolist(), state.exec_mask.tolist(), strict=True):
        if runs:
            cuts.update(range((period - offset % period) % period, tokens, period))
    edges = sorted(cuts)
    return [stop - start for start, stop in itertools.pairwise(edges) if stop > start]


def periodic_reset(state: State) -> None:
    """Executing rows that have read `reset_every` tokens since their last reset go back to W_base (branch-free:
    moshi's LMGen may capture it in a CUDA graph). Nothing without a period."""
    period = state.session.reset_every
    if period is not None:
        state.reset(state.exec_mask & (state.offset >= period))
