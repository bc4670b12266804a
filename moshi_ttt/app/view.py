"""What the app says around its figure: status line, headline, tables, help texts. Gradio-free, tested without a
server; app.py only places these strings and rows into components."""

from __future__ import annotations

import math

from moshi_ttt.app.engine import LiveUpdate
from moshi_ttt.data.audio import FRAME_RATE
from moshi_ttt.reports import headline

# One short explanation, shown collapsed under the title.
EXPLANATION = """\
**TTT (Test-Time Training)** layers keep a small neural network, the *fast weights* W, inside the model. While \
reading, every mini-batch of tokens takes one gradient step on W (learn to map each token's key to its value), so \
W is a memory of the clip that reaches further back than attention's window. W starts from the trained W_base for \
every clip; **drift** is how far it has moved, ||W − W_base|| / ||W_base||.

**mini_batch_size** b: tokens per inner-loop step. Smaller b updates W more often (finer memory, slower); the \
checkpoint was trained with its own b.

**Loss** is the teacher-forced cross-entropy of the next audio token (nats per codebook entry, lower is better). \
**TTT − baseline** below zero means TTT predicts better there. **slope / 1k tokens** is the least-squares trend of \
the loss over the clip, per 1,000 tokens (80 s): negative means the model predicts better the more it has heard.

**Modes** give the same numbers: *live token by token* reads one token per call as in real-time use, *chunked* \
reads chunks of 2 s, *whole sequence* reads the clip in one call (fastest; one update at the end).
"""

# What persistent_states=False does (options.py, docs/ARCHITECTURE.md "Persistence"): the UI shows it under the box.
PERSISTENCE_HELP = (
    "On: the fast weights carry through the whole clip. Off: they go back to W_base every attention window of the "
    "TTT model ({tokens} tokens, {seconds:.1f} s), counted from the start of the clip, the same in every mode: TTT "
    "then remembers nothing that attention could not see."
)


def persistence_help(context_tokens: int) -> str:
    """What persistent_states does, for a TTT model with an attention context of `context_tokens` (the same text in
    every mode: the reset period does not depend on it)."""
    return PERSISTENCE_HELP.format(tokens=context_tokens, seconds=context_tokens / FRAME_RATE)


def status_text(update: LiveUpdate | None, phase: str = "") -> str:
    """The progress line shown beside the plot (never over it)."""
    if update is None:
        return f"Working: {phase}"
    done, total = update.tokens_done, update.total_tokens
    where = f"{done} / {total} tokens ({done / FRAME_RATE:.1f} s of {total / FRAME_RATE:.1f} s of audio)"
    if update.stopped:
        return f"Stopped after {where}, {update.elapsed_s:.1f} s: the table and downloads cover that part only."
    if update.complete:
        return f"Done: {where} in {update.elapsed_s:.1f} s."
    return f"Scoring both models: {where}, {update.elapsed_s:.1f} s elapsed."


def headline_for(update: LiveUpdate) -> str:
    """The headline Markdown of a last update (after a Stop it says which part of the clip it covers)."""
    comparison = headline.headline(update.document)
    return "" if comparison is None else headline.headline_markdown(comparison)


def table_rows(rows: list[dict], columns: list[str], partial: bool) -> list[list]:
    """Rows of dicts as table rows in `columns` order, numbers rounded for the eye (percentages to 2 decimals, the
    rest to 4, non-finite as empty); the run name says "(partial)" after a stop."""
    out = [[_rounded(column, row.get(column)) for column in columns] for row in rows]
    if partial:
        for row in out:
            row[0] = f"{row[0]} (partial)"
    return out


def _rounded(column: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if not math.isfinite(value):
        return None
    digits = 2 if "%" in column else 1 if column in ("tokens/s", "peak MB") else 4
    return round(float(value), digits)
