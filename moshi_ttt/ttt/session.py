"""Per-session TTT options and observers: one value held by each TTT block's streaming state.

A streaming session of a model (scoring, the app, the training carry) may read with another mini-batch size or
persistence than the layers' TTTConfig, and may be observed (telemetry). All of that is one `SessionOptions` in the
state of each TTT block (`state.session`), written only through `configure`: the model itself never changes, and
the options travel with the state when the app swaps streaming states of a shared model in and out.
"""

from __future__ import annotations

import dataclasses
import typing as tp

import torch
from moshi.modules.streaming import State

from moshi_ttt.ttt.weights import AnyWeights


class Observer(tp.Protocol):
    """What a TTT block reports while it reads (telemetry.py's recorder is one)."""

    def inputs(self, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Called with a call's keys and values [B, H, T, D] before the inner loop reads them."""

    def update(self, w_start: AnyWeights, w_end: AnyWeights) -> None:
        """Called at every mini-batch the inner loop completes: its start weights W0 and the weights after it."""


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """The options of one TTT block for one streaming session."""

    mini_batch_size: int  # inner-loop mini-batch size b
    persistent: bool  # keep the fast weights from one forward call to the next (False: every call starts at W_base)
    observer: Observer | None = None  # telemetry; None: nothing observes this block


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


def configure(state: State, **changes: tp.Any) -> None:
    """Replaces fields (mini_batch_size, persistent, observer) of the `session` of a TTT block's state (TTTState,
    LegacyTTTState): the one writer of session options.

    Raises ValueError for a mini-batch size below 1, or changed after the session read its first token."""
    if "mini_batch_size" in changes:
        b = changes["mini_batch_size"]
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"mini_batch_size must be an integer >= 1, got {b!r}")
        if b != state.session.mini_batch_size and state.fixed_mini_batch_size:
            raise ValueError(
                f"this is a legacy TTT layer: its mini-batch size ({state.session.mini_batch_size}) is part of the "
                "checkpoint's math and cannot change"
            )
        if b != state.session.mini_batch_size and (bool((state.offset > 0).any()) or bool((state.position > 0).any())):
            raise ValueError("the mini-batch size of a session must be set before its first forward")
    if "persistent" in changes and not isinstance(changes["persistent"], bool):
        raise ValueError(f"persistent must be True or False, got {changes['persistent']!r}")
    state.session = dataclasses.replace(state.session, **changes)
