"""Tokens per fast-weight update, the one control the app offers for it: what it is called, where it starts and which
values a model takes. Gradio-free.

The run's `mini_batch_size` (RunOptions) is the mini-batch of our TTT blocks and the chunk of the In-Place fork's
layers (`ttt.apply.set_streaming_options`): one number, named for what the chosen TTT model does with it.
- TTT blocks of ours: mini_batch_size 1 to 64, starting at the checkpoint's own;
- layers of the older TTT fork: the checkpoint's own mini-batch only (it is part of its math, `ttt/session.configure`);
- In-Place layers: the chunk size, 1 to `MAX_TOKENS` (the fork's runs use 256), starting at the checkpoint's own
  (at `MAX_TOKENS` for a larger one: the Run event takes no more);
- a model without TTT layers: any value of the control (it reads none);
- with persistent_states off, no more than the model's attention context, where the fast weights go back to W_base
  (`check_fits_window`).
Only the TTT run takes the chosen value: a baseline with TTT layers runs with its own (`engine.own_options`).
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

from moshi_ttt.app.inputs import InputError
from moshi_ttt.ttt.apply import ttt_blocks
from moshi_ttt.ttt.inplace import inplace_blocks

MAX_MINI_BATCH = 64  # TTT blocks of ours: the dual form's cost grows with b^2, and no checkpoint of ours is above
MAX_TOKENS = 1024  # the control's bound over every kind (In-Place chunks: 4 x the fork's 256)
DEFAULT = 16  # where the control starts for a model without TTT layers


@dataclass(frozen=True)
class UpdateSize:
    """What the tokens-per-update control means for one TTT model."""

    kind: str  # "mini_batch" (TTT blocks of ours), "legacy" (older fork, fixed), "chunk" (In-Place), "none"
    label: str  # the control's label for this model
    default: int | None  # the checkpoint's own value (None: it has no TTT layer)
    minimum: int
    maximum: int
    info: str  # the control's help text

    def check(self, value: int, checkpoint: str) -> int:
        """`value` when this model takes it.

        Raises:
            InputError: one sentence naming the checkpoint and the values it takes.
        """
        if self.minimum <= value <= self.maximum:
            return value
        if self.kind == "legacy":
            raise InputError(
                f"checkpoint {checkpoint!r} is a TTT checkpoint of the older fork: its mini-batch size "
                f"({self.default}) is part of its math; set {self.label} to {self.default}, got {value}."
            )
        raise InputError(
            f"{self.label} of checkpoint {checkpoint!r} must be between {self.minimum} and {self.maximum}, got {value}."
        )


def update_size(model: tp.Any) -> UpdateSize:
    """The control's meaning for `model` (a moshi LMModel, with or without TTT layers)."""
    inplace = inplace_blocks(model)
    if inplace:
        chunk = next(iter(inplace.values())).cfg.chunk_size
        info = f"In-Place TTT: the fast weight w_down takes one update per chunk; this checkpoint's chunk is {chunk}"
        if chunk > MAX_TOKENS:  # the Run event's spec refuses more (handlers.run_specs): say so rather than offer it
            info += f", above the app's {MAX_TOKENS}: runs here use at most {MAX_TOKENS}"
        return UpdateSize("chunk", "In-Place chunk size (tokens per update)", min(chunk, MAX_TOKENS), 1, MAX_TOKENS,
                          info)  # fmt: skip
    blocks = ttt_blocks(model)
    if not blocks:
        return UpdateSize("none", "TTT mini_batch_size", None, 1, MAX_TOKENS, "this model has no TTT layer")
    block = next(iter(blocks.values()))
    b = block.cfg.mini_batch_size
    if block.cfg.legacy is not None:
        return UpdateSize("legacy", "TTT mini_batch_size", b, b, b, f"fixed at {b} by this older-fork checkpoint")
    return UpdateSize("mini_batch", "TTT mini_batch_size", b, 1, MAX_MINI_BATCH,
                      f"tokens per inner-loop step; this checkpoint was trained with {b}")  # fmt: skip


def check_update_size(
    models: dict[str, tp.Any], value: int | None, persistent_states: bool | None = None
) -> int | None:
    """`value` when every model with TTT layers takes it (None: each checkpoint's own).

    Args:
        models: checkpoint name -> model (the run's TTT model: a baseline runs with its own settings).
        persistent_states: the run's persistence (None: each checkpoint's own); off, an update must fit in the
            attention window (`check_fits_window`).
    Raises:
        InputError: for the first model that refuses it.
    """
    for name, model in models.items():
        size = update_size(model)
        if size.kind == "none":
            continue
        if value is not None:
            size.check(value, name)
        check_fits_window(model, name, value if value is not None else size.default, persistent_states, size.label)
    return value


def check_fits_window(
    model: tp.Any,
    checkpoint: str,
    value: int | None,
    persistent_states: bool | None,
    label: str = "TTT mini_batch_size",
) -> None:
    """Refuses tokens per update above the attention context with persistence off: the fast weights go back to
    W_base every context tokens (options.RunOptions.resets), so no update of them ever completes, while the
    headline would still compare the run with the baseline as a TTT run.

    Args:
        value: tokens per update (a TTT mini-batch or an In-Place chunk).
        persistent_states: the run's persistence; None: the checkpoint's own.
        label: what the value is called (`UpdateSize.label`).
    Raises:
        InputError: one sentence naming the context and the value.
    """
    blocks = {**ttt_blocks(model), **inplace_blocks(model)}
    if persistent_states is None:
        persistent_states = all(block.cfg.persistent_states for block in blocks.values())
    context = getattr(model, "context", None)
    if not blocks or persistent_states or context is None or value is None or value <= context:
        return
    raise InputError(
        f"{label} {value} is more than the attention context of checkpoint {checkpoint!r} ({context} "
        f"tokens): with persistent_states off its fast weights go back to W_base every {context} tokens, before an "
        f"update of {value} completes; choose at most {context} or turn persistent_states on."
    )


COMPARE_LABELS = {  # the Compare tab's sizes control, by the kinds of the TTT models compared
    "chunk": "In-Place chunk sizes (tokens per update)",
    "mini_batch": "TTT mini_batch_size values",
    "mixed": "mini_batch_size or In-Place chunk sizes",  # also the spec's label, in the server's messages
}


def compare_label(sizes: tp.Iterable[UpdateSize]) -> str:
    """The Compare tab's label for the sizes of the chosen TTT models: what the number is to all of them."""
    kinds = {size.kind for size in sizes}
    if kinds == {"chunk"}:
        return COMPARE_LABELS["chunk"]
    return COMPARE_LABELS["mixed" if "chunk" in kinds else "mini_batch"]
