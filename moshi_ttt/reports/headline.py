"""Headline numbers of a baseline-vs-TTT comparison that mean something: whole clip, past the attention context,
per position bin and per reading of a repeated passage, with a caveat instead of a bold number on short clips.

Notation: T steps (tokens at 12.5 Hz), K = 8 audio codebooks. Losses are nats per valid (token, codebook) entry;
NaN marks invalid entries. Everything here takes plain arrays or results.json dicts and returns numbers or rows.

Why "past the context": inside the first attention window the baseline sees everything TTT sees, so any difference
there is not memory. Only at or after token `context` can the fast weights hold audio that attention no longer
reaches (ARCHITECTURE.md, "Results": `mean_loss_past_context`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moshi_ttt.data.audio import FRAME_RATE

CAVEAT_WINDOWS = 3  # a clip shorter than this many attention windows gets a caveat, not a bold percentage
MIN_CLIP_TOKENS = 125  # ... and so does any clip under 10 s, whatever the context
# "[reading 2: 21.280-35.903 s] text": one reading of the repeated passage, with its span in seconds.
_READING = re.compile(r"^\[reading\s+(\d+)(?::\s*([0-9.]+)\s*-\s*([0-9.]+)\s*s)?\s*\]", re.IGNORECASE)


@dataclass(frozen=True)
class Reading:
    """One reading of a passage that the clip repeats."""

    number: int  # 1 for the first reading
    start_s: float  # where it starts in the clip, seconds
    end_s: float  # where it ends (exclusive), seconds


def parse_readings(text: str) -> list[Reading]:
    """The readings a clip's transcript names: lines "[reading N: START-END s] ...", as in demo_assets/*.txt.

    Returns:
        the readings in order; [] when the text names none.
    Raises:
        ValueError: a reading line without its span, or with a span that is empty or out of order.
    """
    readings = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = _READING.match(line.strip())
        if match is None:
            continue
        if match.group(2) is None:
            raise ValueError(f"line {number} names reading {match.group(1)} without its span ('[reading N: A-B s]')")
        start, end = float(match.group(2)), float(match.group(3))
        if not end > start >= 0 or (readings and start < readings[-1].end_s):
            raise ValueError(f"line {number}: reading span {start}-{end} s is empty or overlaps the one before")
        readings.append(Reading(int(match.group(1)), start, end))
    return readings


def readings_for(audio_path: str | Path) -> list[Reading]:
    """Readings of the transcript next to an audio file (same stem, .txt); [] when there is none."""
    text = Path(audio_path).with_suffix(".txt")
    return parse_readings(text.read_text(encoding="utf-8")) if text.is_file() else []


def readings_of_known_clip(audio_path: str | Path, known_clips: list[str | Path]) -> list[Reading]:
    """Readings of an uploaded copy of a known clip: the transcript next to the file itself, else that of the known
    clip with the same bytes (an upload or an example is a renamed copy); [] when neither names readings."""
    own = readings_for(audio_path)
    if own:
        return own
    path = Path(audio_path)
    if not path.is_file():
        return []
    size, digest = path.stat().st_size, None
    for clip in map(Path, known_clips):
        if not clip.is_file() or clip.stat().st_size != size or not clip.with_suffix(".txt").is_file():
            continue
        digest = digest or hashlib.sha256(path.read_bytes()).hexdigest()
        if hashlib.sha256(clip.read_bytes()).hexdigest() == digest:
            return readings_for(clip)
    return []


def span_tokens(start_s: float, end_s: float, frame_rate: float = FRAME_RATE) -> tuple[int, int]:
    """Token range [a, b) of a span in seconds (the tokens whose frames start inside it)."""
    return math.ceil(start_s * frame_rate - 1e-6), math.ceil(end_s * frame_rate - 1e-6)


def mean_loss(loss, start: int = 0, stop: int | None = None) -> float:
    """Mean of the finite entries of loss [T] or [K, T] over steps [start, stop); NaN when there are none."""
    y = np.asarray(loss, dtype=np.float64)
    part = y[..., start:stop]
    part = part[np.isfinite(part)]
    return float(part.mean()) if part.size else float("nan")


def mean_loss_past_context(loss, context: int | None) -> float:
    """Mean loss over the steps at or after the attention context (NaN for a clip no longer than it)."""
    if context is None:
        return float("nan")
    return mean_loss(loss, start=context)


def improvement_pct(baseline: float | None, ttt: float | None) -> float:
    """100 (baseline - ttt) / baseline: positive when TTT predicts better; NaN when either is missing."""
    if baseline is None or ttt is None or not (math.isfinite(baseline) and math.isfinite(ttt)) or baseline <= 0:
        return float("nan")
    return 100.0 * (baseline - ttt) / baseline


def reading_losses(loss, readings: list[Reading], frame_rate: float = FRAME_RATE) -> list[dict]:
    """results.json "readings": {"start_s", "end_s", "mean_loss"} of each reading, from loss [T] or [K, T].

    A reading that runs past the scored tokens (a Stop, or a clip trimmed to the duration limit) keeps only its
    scored part: its "end_s" is where scoring ended and it carries "partial": true and "span_end_s" (the end its
    transcript names); a reading that starts after the scored tokens is left out.
    """
    tokens = np.asarray(loss).shape[-1]
    rows = []
    for reading in readings:
        a, b = span_tokens(reading.start_s, reading.end_s, frame_rate)
        if a >= tokens:
            break
        row = {"start_s": reading.start_s, "end_s": reading.end_s, "mean_loss": mean_loss(loss, a, min(b, tokens))}
        if b > tokens:
            row.update(end_s=round(tokens / frame_rate, 3), partial=True, span_end_s=reading.end_s)
        rows.append(row)
    return rows


def short_clip_caveat(tokens: int, context: int | None, frame_rate: float = FRAME_RATE) -> str | None:
    """A sentence for a clip too short for its improvement to mean much; None for a long enough clip."""
    need = max(MIN_CLIP_TOKENS, CAVEAT_WINDOWS * context) if context is not None else MIN_CLIP_TOKENS
    if tokens >= need:
        return None
    window = f"{CAVEAT_WINDOWS} attention windows ({need / frame_rate:.0f} s)" if context else "10 s"
    return (
        f"This clip is {tokens / frame_rate:.1f} s long, shorter than {window}: its improvement is mostly noise "
        "and says little about TTT memory."
    )


SILENT_CAVEAT = (
    "This clip is silent (scored because 'allow silence' is on): the losses measure how the models predict "
    "silence, which says nothing about TTT memory."
)


@dataclass(frozen=True)
class ReadingGain:
    """TTT against the baseline on one reading of the repeated passage."""

    number: int  # 1 for the first reading
    start_s: float
    end_s: float  # where the scored part of the reading ends
    improvement_pct: float  # positive: TTT's loss is lower
    partial: bool  # the scoring ended inside the reading (Stop, duration limit)


@dataclass(frozen=True)
class Headline:
    """The comparison of a TTT run with the baseline on one clip (improvements in %, positive: TTT better)."""

    tokens: int  # T of the clip (of its scored part after a Stop)
    context: int | None  # the TTT model's attention context in tokens (None: unbounded)
    baseline_loss: float  # mean loss over the scored tokens
    ttt_loss: float
    improvement_pct: float
    baseline_loss_past_context: float  # mean loss at or after token `context` (NaN if the clip is not longer)
    ttt_loss_past_context: float
    improvement_past_context_pct: float
    caveat: str | None  # set for a short or silent clip: show it instead of a bold percentage
    scope: str = "the whole clip"  # what the numbers cover: "the first 23.4 s of 60.3 s (stopped)" after a Stop
    readings: tuple[ReadingGain, ...] = ()  # per reading of a repeated passage, when the clip names them


def headline(document: dict, ttt_run: str = "ttt") -> Headline | None:
    """Headline of a results document (version 1 or 2) with a "baseline" and a `ttt_run` run; None without them."""
    runs = document.get("runs", {})
    if "baseline" not in runs or ttt_run not in runs:
        return None
    base, ttt = runs["baseline"], runs[ttt_run]
    context = ttt.get("context_tokens")
    tokens = int(ttt.get("tokens") or len(ttt.get("loss_per_token", [])))
    past = [_past_context(run, context) for run in (base, ttt)]
    audio = document.get("audio") or {}
    caveats = [short_clip_caveat(tokens, context), SILENT_CAVEAT if audio.get("silent") else None]
    return Headline(
        tokens=tokens,
        context=context,
        baseline_loss=_float(base.get("mean_loss")),
        ttt_loss=_float(ttt.get("mean_loss")),
        improvement_pct=improvement_pct(base.get("mean_loss"), ttt.get("mean_loss")),
        baseline_loss_past_context=past[0],
        ttt_loss_past_context=past[1],
        improvement_past_context_pct=improvement_pct(*past),
        caveat=" ".join(c for c in caveats if c) or None,
        scope=scope_of(audio, tokens),
        readings=tuple(reading_gains(document, ttt_run)),
    )


def scope_of(audio: dict, tokens: int, frame_rate: float = FRAME_RATE) -> str:
    """What a document's numbers cover: "the whole clip", or "the first N s of M s" after a Stop or a trim."""
    partial = audio.get("partial")
    if partial:
        total = partial.get("total_tokens") or tokens
        return f"the first {tokens / frame_rate:.1f} s of {total / frame_rate:.1f} s (stopped)"
    if audio.get("trimmed_from_s") is not None:
        return f"the first {tokens / frame_rate:.1f} s of {float(audio['trimmed_from_s']):.1f} s (duration limit)"
    return "the whole clip"


def reading_gains(document: dict, ttt_run: str = "ttt") -> list[ReadingGain]:
    """TTT's improvement on each reading the baseline and `ttt_run` records both list; [] without readings."""
    runs = document.get("runs", {})
    base, ttt = runs.get("baseline", {}).get("readings"), runs.get(ttt_run, {}).get("readings")
    if not base or not ttt or len(base) != len(ttt):
        return []
    return [
        ReadingGain(
            i, b["start_s"], b["end_s"], improvement_pct(b["mean_loss"], t["mean_loss"]), bool(b.get("partial"))
        )
        for i, (b, t) in enumerate(zip(base, ttt, strict=True), start=1)
    ]


def _past_context(run: dict, context: int | None) -> float:
    if run.get("mean_loss_past_context") is not None:
        return float(run["mean_loss_past_context"])
    if context is None or "loss_per_codebook" not in run:  # a version-1 record without the field
        return float("nan")
    return mean_loss_past_context(_array(run["loss_per_codebook"]), context)


def reading_rows(document: dict, ttt_run: str = "ttt") -> list[dict]:
    """Per-reading table: reading, span, baseline and TTT mean loss, improvement %; [] without readings. A reading
    cut by a Stop (or the duration limit) shows its scored span, marked "(partial)"."""
    runs = document.get("runs", {})
    base, ttt = runs.get("baseline", {}).get("readings"), runs.get(ttt_run, {}).get("readings")
    if not base or not ttt or len(base) != len(ttt):
        return []
    return [
        {
            "reading": i,
            "span (s)": f"{b['start_s']:.1f}-{b['end_s']:.1f}" + (" (partial)" if b.get("partial") else ""),
            "baseline loss": _round(b["mean_loss"], 4),
            "TTT loss": _round(t["mean_loss"], 4),
            "improvement %": _round(improvement_pct(b["mean_loss"], t["mean_loss"]), 2),
        }
        for i, (b, t) in enumerate(zip(base, ttt, strict=True), start=1)
    ]


def bin_rows(document: dict, ttt_run: str = "ttt", frame_rate: float = FRAME_RATE) -> list[dict]:
    """Per position bin: span (from 0 s; the last bin ends with the clip), baseline and TTT mean loss, improvement %;
    [] without both runs."""
    runs = document.get("runs", {})
    if "baseline" not in runs or ttt_run not in runs:
        return []
    base, ttt = runs["baseline"]["loss_per_bin"], runs[ttt_run]["loss_per_bin"]
    tokens = len(runs["baseline"]["loss_per_token"])
    ends = [*base["start"][1:], tokens] if base["start"] else []
    return [
        {
            "bin (s)": f"{start / frame_rate:.1f}-{end / frame_rate:.1f}",
            "baseline loss": _round(b, 4),
            "TTT loss": _round(t, 4),
            "improvement %": _round(improvement_pct(b, t), 2),
        }
        for start, end, b, t in zip(base["start"], ends, base["loss"], ttt["loss"], strict=True)
    ]


def change_words(pct: float, bold: bool = False) -> str:
    """TTT's change against the baseline in words: "6.33% lower", "9.58% higher (worse)", "no different"; "n/a" when
    unknown. `pct` is `improvement_pct` (positive: TTT's loss is lower)."""
    if not math.isfinite(pct):
        return "n/a"
    if round(abs(pct), 2) == 0:
        text = "no different"
    else:
        text = f"{abs(pct):.2f}% lower" if pct > 0 else f"{abs(pct):.2f}% higher (worse)"
    return f"**{text}**" if bold else text


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def headline_markdown(h: Headline) -> str:
    """The app's headline: TTT's loss against the baseline in words over what was scored, after the first attention
    window and per reading of a repeated passage; bold for a long enough clip, plain with the caveat otherwise."""
    bold = h.caveat is None
    lines = [
        f"TTT vs baseline, {h.scope}: TTT's loss is {change_words(h.improvement_pct, bold)} "
        f"({h.ttt_loss:.4f} vs {h.baseline_loss:.4f} nats per token)."
    ]
    if h.context is not None and h.tokens > h.context:
        lines.append(
            f"After the first attention window ({h.context / FRAME_RATE:.1f} s, where only TTT can still hold earlier "
            f"audio): {change_words(h.improvement_past_context_pct, bold)} "
            f"({h.ttt_loss_past_context:.4f} vs {h.baseline_loss_past_context:.4f} nats)."
        )
    elif h.context is not None:
        lines.append(f"The clip never gets past the first attention window ({h.context / FRAME_RATE:.1f} s).")
    if h.readings:
        parts = [
            f"{_ordinal(r.number)} ({r.start_s:.1f}-{r.end_s:.1f} s{', partial' if r.partial else ''}) "
            f"{change_words(r.improvement_pct, bold and r.number > 1 and not r.partial)}"
            for r in h.readings
        ]
        lines.append(
            "Per reading of the repeated passage (from the 2nd on, TTT can remember the earlier ones): "
            + "; ".join(parts) + "."
        )  # fmt: skip
    if h.caveat:
        lines.append(f"**Caveat:** {h.caveat}")
    return "\n\n".join(lines)


def headline_text(h: Headline) -> str:
    """One line for the CLI's summary."""
    parts = [f"TTT vs baseline: loss {change_words(h.improvement_pct)} over {h.scope}"]
    if math.isfinite(h.improvement_past_context_pct):
        parts.append(f"{change_words(h.improvement_past_context_pct)} past the context")
    text = ", ".join(parts)
    return f"{text} (caveat: {h.caveat})" if h.caveat else text


def _array(values) -> np.ndarray:
    return np.asarray([[np.nan if v is None else v for v in row] for row in values], dtype=np.float64)


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)
