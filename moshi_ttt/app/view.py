"""What the app says around its figure: status line, headline, tables, help texts. Gradio-free, tested without a
server; app.py only places these strings and rows into components."""

from __future__ import annotations

import math
import re

from moshi_ttt.app.engine import LiveUpdate
from moshi_ttt.data.audio import FRAME_RATE
from moshi_ttt.data.audio import SAMPLE_RATE as MIMI_SAMPLE_RATE
from moshi_ttt.data.decode import Reconstruction
from moshi_ttt.reports import headline

DEMO_MODELS = (
    "**The models here are tiny demo models**, not Moshi 7B: 1.6 M and 1.8 M parameters, trained for this page on "
    "synthetic speech (espeak-ng and flite voices; demo_assets/MANIFEST.md). They show the mechanism, not the quality "
    "of a real Moshi. Their memory is weak on natural speech: on held-out clips the 2nd and 3rd readings of a "
    "passage score about 3.4% below the baseline (3.6% on demo_repeat.wav), but new sentences at the same place "
    "in a clip score 2-3% below it too: most of the gain is adaptation to the voice and the clip, about one point "
    "is memory. It costs nothing where there is nothing to remember (plain speech and a 31-minute file score 1.5% "
    "and 1.4% better). "
    "The command line "
    "scores Moshi 7B itself, and its results.json opens here (**Open a results.json**, left)."
)


def intro_markdown(
    demo_models: bool, start_clip: str | None, context_tokens: int | None, mini_batch: int | None
) -> str:
    """The text at the top of the page: what the page shows in plain words, which models it serves, where to start.

    Args:
        demo_models: the app serves the demo assets' tiny models (else: the checkpoints given on its command line).
        start_clip: the demo clip to start with (its file name), None without one.
        context_tokens: the TTT checkpoint's attention context, tokens (None: unknown).
        mini_batch: its mini-batch size, tokens (None: unknown).
    """
    window = f" ({context_tokens / FRAME_RATE:g} s here)" if context_tokens else ""
    step = f"every {mini_batch / FRAME_RATE:g} s of audio" if mini_batch else "every few tokens"
    lines = [
        "## moshi-ttt: does a speech model that keeps learning while it listens remember what it heard?",
        "Two versions of Kyutai's Moshi speech model read the same audio and predict each next sound token: a "
        "**baseline**, and the same model with a **TTT layer**, a small network whose weights take a learning step "
        f"{step}, so that it can remember further back than attention can see{window}. Lower loss is better "
        "prediction.",
    ]
    lines.append(DEMO_MODELS if demo_models else "The models are the checkpoints this server was started with.")
    if start_clip:
        lines.append(
            f"**Start here:** pick **{start_clip}** under *Demo clips* (one passage read three times), press **Run**, "
            "and compare the TTT model's loss (red) with the baseline's (blue) on the 2nd and 3rd readings (shaded): "
            "where it is lower, the TTT layer remembers the 1st reading. Click the figure to hear that moment."
        )
    return "\n\n".join(lines)


# The longer explanation, shown collapsed under the introduction.
EXPLANATION = """\
**TTT (Test-Time Training)** layers keep a small neural network, the *fast weights* W, inside the model. While \
reading, every mini-batch of tokens takes one gradient step on W (learn to map each token's key to its value), so \
W is a memory of the clip that reaches further back than attention's window. W starts from the trained W_base for \
every clip; **drift** is how far it has moved, ||W − W_base|| / ||W_base||. The **inner loop** row shows how well \
W reconstructs each mini-batch before and after its step, as a fraction of what there is to learn (the target's \
variance).

**mini_batch_size** b: tokens per inner-loop step. Smaller b updates W more often (finer memory, slower); the \
checkpoint was trained with its own b. **persistent_states** off resets W every attention window.

**Loss** is the teacher-forced cross-entropy of the next audio token (nats per codebook entry, lower is better). \
**TTT − baseline** below zero means TTT predicts better there. **slope / 1k tokens** is the least-squares trend of \
the loss over the clip, per 1,000 tokens (80 s): negative means the model predicts better the more it has heard. \
**Per codebook**: Mimi's codebook 0 is *semantic* (distilled from a speech model), codebooks 1-7 *acoustic* detail.

**In-Place TTT** checkpoints (of the In-Place fork, AlufRon/moshi_in_place) keep no TTT layer of their own: the \
fast weight is the down-projection w_down of some MLPs, updated once per *chunk* of tokens (the mini_batch_size \
control becomes the chunk size). Their rows 3 and 4 show, on log axes, w_down's drift per chunk (relative, and \
absolute with the raw, clipped and lr-scaled update and the step float32 kept), and above the figure one sentence \
per layer says whether the updates survived float32 rounding.

**Modes** give the same numbers: *live token by token* reads one token per call as in real-time use, *chunked* \
reads chunks of 2 s, *whole sequence* reads the clip in one call (fastest; one update at the end). \
**Compare settings** scores several settings on one clip, each exactly as a run of its own would.
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


# "What the models hear": the chosen clip's codes decoded back to audio by the codec (app/reconstruction.py). The
# decoded audio is as good as the codec's decoder: these texts promise no speech quality.
RECONSTRUCTION_TITLE = "What the models hear (the codec's reconstruction)"
RECONSTRUCTION_HELP = (
    "The models never hear the waveform: they read the codes the codec (Mimi) gives for it. This decodes those "
    "codes back to audio with the codec's own decoder: the clip chosen above, as the Run button with these settings "
    "encodes it (the baseline's codec, at most Max duration). How close it sounds to your clip depends on the "
    "codec: moshi's Mimi gives recognisable speech; the demo codec's small decoder, trained to give back the mel "
    "spectrogram, gives rough, speech-like audio; a codec whose decoder was never trained gives noise."
)
RECONSTRUCTION_BUTTON = "Decode the codes"
RECONSTRUCTION_WORKING = "Working: encoding the clip and decoding its codes…"


def reconstruction_note(result: Reconstruction, codec: str) -> str:
    """What the decoded audio is, under its player.

    Args:
        result: the wav written.
        codec: the baseline checkpoint whose codec decoded it.
    """
    note = (f"Decoded {result.duration_s:.1f} s of codes with the codec of {plain(repr(codec))} in "
            f"{result.decode_s:.1f} s.")  # fmt: skip
    if result.clipped_samples:
        share = 100 * result.clipped_samples / max(result.num_samples, 1)
        note += (f" The decoder went past full scale (peak {result.peak:.2g}) at {share:.2g}% of the samples, "
                 "clipped in the file.")  # fmt: skip
    return note


def reconstruction_refused(message: str) -> str:
    """The note when nothing was decoded (the same sentence as Gradio's error toast)."""
    return f"Not decoded: {message}"


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


def table_rows(rows: list[dict], columns: dict[str, str] | list[str], partial: bool) -> list[list]:
    """Rows of dicts as table rows, numbers rounded for the eye, non-finite as empty; improvements (keys with "%")
    in words ("6.33% lower", "9.58% higher (worse)") when the columns map labels to keys, rounded to 2 decimals when
    they are listed as keys. The run name says "(partial)" after a stop.

    Args:
        rows: dicts, e.g. `reports.results.summary_rows`.
        columns: {column label: key} (the words form) or the keys themselves, in table order.
        partial: mark the first cell of each row "(partial)".
    """
    words = isinstance(columns, dict)
    keys = list(columns.values()) if words else list(columns)
    out = []
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key)
            if words and "%" in key and isinstance(value, (int, float)):
                cells.append(headline.change_words(float(value)))
            else:
                cells.append(_rounded(key, value))
        out.append(cells)
    if partial:
        for row in out:
            row[0] = f"{row[0]} (partial)"
    return out


def _rounded(column: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, int):
        return value
    if not math.isfinite(value):
        return None
    digits = 2 if "%" in column else 1 if column in ("tokens/s", "peak MB") else 4
    return round(float(value), digits)


def audio_notes(audio: dict) -> list[str]:
    """What happened to the file before scoring: trimmed to the duration limit, mixed down to mono, resampled to
    Mimi's 24 kHz. [] for a 24 kHz mono file scored whole.

    Args:
        audio: a results document's "audio" record ("duration_s", "sample_rate", "channels", "trimmed_from_s").
    """
    notes = []
    whole = audio.get("trimmed_from_s")
    if whole is not None and audio.get("duration_s") is not None:
        notes.append(f"Scored the first {audio['duration_s']:.1f} s of {whole:.1f} s (the duration limit).")
    changes = []
    channels = audio.get("channels")
    if isinstance(channels, int) and channels > 1:
        changes.append(f"mixed its {channels} channels down to mono")
    rate = audio.get("sample_rate")
    if isinstance(rate, (int, float)) and rate != MIMI_SAMPLE_RATE:
        changes.append(f"resampled it from {rate / 1000:g} kHz to {MIMI_SAMPLE_RATE / 1000:g} kHz")
    if changes:
        notes.append(f"Before encoding, the app {' and '.join(changes)} (what Mimi reads).")
    return notes


def notes_markdown(document: dict) -> str:
    """The notes shown under the downloads: the audio's (`audio_notes`) and each run's (checkpoints, findings)."""
    notes = audio_notes(document.get("audio") or {})
    notes += [n for run_notes in ((document.get("config") or {}).get("notes") or {}).values() for n in run_notes]
    return "\n\n".join(n for n in notes if n)


def plain(text: str) -> str:
    """`text` escaped for Markdown, so that it shows as it is (no HTML, links or emphasis of its own): for text from
    users, such as the names in a reopened results.json."""
    return re.sub(r"([\\`*_\[\]<>#|!])", r"\\\1", text)


READING_COLUMNS = {"reading": "reading", "span (s)": "span (s)", "baseline loss": "baseline loss",
                   "TTT loss": "TTT loss", "TTT vs baseline": "improvement %"}  # fmt: skip


def readings_markdown(document: dict) -> str:
    """The per-reading table of a document as Markdown (a caption and a table; "" without readings)."""
    rows = table_rows(headline.reading_rows(document), READING_COLUMNS, False)
    caption = "**Per reading of the repeated passage** (TTT can remember a passage from its 2nd reading on)"
    return markdown_table(list(READING_COLUMNS), rows, caption)


def markdown_table(columns: list[str], rows: list[list], caption: str = "") -> str:
    """Rows as a Markdown table under an optional caption, each cell escaped (`plain`); "" without rows.

    The app shows its tables whose every row matters (readings, codebooks, compared settings) as Markdown: Gradio's
    Dataframe renders only the rows it thinks are in view, and left rows out of a table below the fold.
    """
    if not rows:
        return ""
    head = "| " + " | ".join(plain(c) for c in columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join("" if c is None else plain(str(c)) for c in row) + " |\n" for row in rows)
    return f"{caption}\n\n{head}{body}" if caption else head + body
