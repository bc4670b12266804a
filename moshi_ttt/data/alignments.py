"""Transcripts with word timestamps -> Moshi's text stream, laid out as moshi-finetune trains on them.

moshi-finetune (github.com/kyutai-labs/moshi-finetune) keeps, beside each `a.wav`, an `a.json`
`{"alignments": [[word, [start_s, end_s], speaker], ...]}` (its annotate.py writes the speaker "SPEAKER_MAIN" for
the left, Moshi, channel). Its `Interleaver` (finetune/data/interleaver.py, with the settings of its train.py:
`keep_main_only=True`, no audio delay, in-word padding = text padding) turns the words into one text token per
Mimi frame (12.5 Hz). `text_stream` below reproduces that layout:

- only the main speaker's words with a positive duration, sorted by start time;
- each word is tokenized alone (lines joined by the tokenizer's newline piece, no BOS);
- at frame t, every word starting before the end of the frame (start * 12.5 < t + 1) becomes the pending word,
  replacing what is left of the previous one;
- while a word has tokens pending, frame t gets its next token, and a padding token just before it becomes the
  end-of-padding token (moshi's `end_of_text_padding_id`); every other frame is the padding token.

Notation: T frames (Mimi tokens at 12.5 Hz).
"""

from __future__ import annotations

import json
import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch

MAIN_SPEAKER = "SPEAKER_MAIN"  # moshi-finetune's label for the words of the Moshi (left) channel
FRAME_RATE = 12.5  # Mimi frames per second
END_TOLERANCE_S = 1.0  # a word may end this long after the audio (word aligners overshoot a little)
LAYOUT = '{"alignments": [[word, [start_s, end_s], speaker], ...]}'


class TextTokenizer(tp.Protocol):
    """What is needed of a text tokenizer (moshi's sentencepiece `SentencePieceProcessor` has it)."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Word:
    """One aligned word of a transcript."""

    text: str
    start_s: float  # seconds from the start of the file
    end_s: float
    speaker: str


@dataclass(frozen=True)
class TextIds:
    """A model's special text tokens (moshi's LMModel attributes of the same names)."""

    text_padding_token_id: int  # padding: no new text at this frame
    end_of_text_padding_id: int  # the last padding frame before a word
    zero_token_id: int  # no input (embedded as zeros, not scored)

    @classmethod
    def of(cls, model) -> TextIds:
        """The ids of a moshi LMModel."""
        return cls(model.text_padding_token_id, model.end_of_text_padding_id, model.zero_token_id)


def alignment_path(audio_path: str | Path) -> Path:
    """Where moshi-finetune looks for an audio file's alignments: the same path with `.json`."""
    return Path(audio_path).with_suffix(".json")


def read_alignments(path: str | Path) -> list[Word]:
    """Reads a moshi-finetune alignment file.

    Returns:
        the words in file order.
    Raises:
        FileNotFoundError: no such file.
        ValueError: one sentence when the file is not in moshi-finetune's layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the transcript text stream expects {LAYOUT} beside the audio")
    try:
        entries = json.loads(path.read_text())["alignments"]
        words = [
            Word(text, start, end, speaker)
            for text, (start, end), speaker in entries
            if isinstance(text, str) and isinstance(speaker, str)
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path.name} is not a moshi-finetune alignment file: expected {LAYOUT}") from e
    if len(words) != len(entries):
        raise ValueError(f"{path.name} is not a moshi-finetune alignment file: expected {LAYOUT}")
    for index, word in enumerate(words):
        _check_times(word, index, path.name)
    return [Word(w.text, float(w.start_s), float(w.end_s), w.speaker) for w in words]


def _is_time(value) -> bool:
    """A JSON number that is a time: int or float, finite; not a bool (Python's bool is an int), not a string."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_times(word: Word, index: int, name: str) -> None:
    """Refuses word `index` when its times are not finite numbers or it ends before it starts (moshi-finetune's
    Interleaver would drop such a word silently; zero-length words are dropped by `text_stream`, as there)."""
    if not (_is_time(word.start_s) and _is_time(word.end_s)):
        raise ValueError(
            f"word {index} ({word.text!r}) of {name} has times {[word.start_s, word.end_s]!r}: expected two finite "
            f"numbers of seconds, as in {LAYOUT}"
        )
    if word.end_s < word.start_s:
        raise ValueError(
            f"word {index} ({word.text!r}) of {name} ends at {word.end_s} s before it starts at {word.start_s} s: "
            "the alignment is damaged"
        )


def check_against_audio(words: list[Word], duration_s: float, name: str, main_speaker: str = MAIN_SPEAKER) -> None:
    """Refuses an alignment that cannot belong to an audio of `duration_s` seconds.

    Raises:
        ValueError: times that are not finite numbers or a word that ends before it starts (`read_alignments` checks
            these too, for Words built in code), negative times, a word past the end of the audio, or words none of
            which is the main speaker's.
    """
    for index, word in enumerate(words):
        _check_times(word, index, name)
    if any(w.start_s < 0 or w.end_s < 0 for w in words):
        raise ValueError(f"{name} has negative timestamps: the alignment does not match the audio")
    late = [w for w in words if w.start_s >= duration_s or w.end_s > duration_s + END_TOLERANCE_S]
    if late:
        last = max(max(w.start_s, w.end_s) for w in late)
        raise ValueError(
            f"{name} has words up to {last:.2f} s but the audio lasts {duration_s:.2f} s: the alignment does not "
            "match the audio (expected every word inside it)"
        )
    if words and not any(w.speaker == main_speaker for w in words):
        found = ", ".join(sorted({w.speaker for w in words}))
        raise ValueError(
            f"none of the {len(words)} words of {name} is spoken by {main_speaker} (found {found}): expected "
            f"moshi-finetune's label {main_speaker} for the Moshi channel"
        )


def word_tokens(tokenizer: TextTokenizer, word: str) -> list[int]:
    """One word's text tokens as moshi-finetune's `tokenize(..., bos=False)`: each line encoded, lines joined by the
    tokenizer's newline piece."""
    lines = [tokenizer.encode(line) for line in word.strip().split("\n")]
    tokens = list(lines[0])
    for line in lines[1:]:
        tokens += [tokenizer.encode("\n")[-1], *line]
    return tokens


def text_stream(
    words: list[Word],
    num_frames: int,
    tokenizer: TextTokenizer,
    ids: TextIds,
    frame_rate: float = FRAME_RATE,
    main_speaker: str = MAIN_SPEAKER,
) -> torch.Tensor:
    """The text tokens [T] that moshi-finetune trains on for `words` over `num_frames` frames (module docstring).

    Args:
        words: the transcript (any order, any speakers: only `main_speaker`'s words with a positive duration count).
        num_frames: T, the audio's Mimi frames.
        tokenizer: the model's text tokenizer; ids: the model's special text tokens.
    Returns:
        [T] long.
    """
    kept = sorted((w for w in words if w.speaker == main_speaker and w.start_s < w.end_s), key=lambda w: w.start_s)
    # moshi-finetune builds a longer stream and crops it to the audio's frames (its InterleavedTokenizer passes the
    # frame count where a duration is expected), so a word starting in the frame after the audio still turns the
    # last frame into an end-of-padding token: one frame more reproduces that.
    tokens = [ids.text_padding_token_id] * (num_frames + 1)
    pending: list[int] = []  # tokens of the current word not yet written
    upcoming = iter(kept)
    word = next(upcoming, None)
    for t in range(num_frames + 1):
        while word is not None and word.start_s * frame_rate < t + 1:  # the word starts inside or before frame t
            pending = word_tokens(tokenizer, word.text)  # a new word drops what is left of the last one
            word = next(upcoming, None)
        if pending:
            if t > 0 and tokens[t - 1] == ids.text_padding_token_id:
                tokens[t - 1] = ids.end_of_text_padding_id
            tokens[t] = pending.pop(0)
    return torch.tensor(tokens[:num_frames], dtype=torch.long)


def load_text_tokenizer(path: str | Path):
    """moshi's sentencepiece text tokenizer (e.g. tokenizer_spm_32k_3.model of kyutai/moshiko-pytorch-bf16).

    Raises:
        FileNotFoundError: no such file; ValueError: not a sentencepiece model.
    """
    import sentencepiece

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text tokenizer {path} does not exist (expected moshi's sentencepiece .model file)")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path.name} is not a sentencepiece model (expected moshi's text tokenizer)") from e
