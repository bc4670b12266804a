"""Dialogue files: a stereo file's channels as Moshi's and the user's audio streams, and the text stream of its
transcript, as the inputs of one scoring run.

moshi-finetune's convention (its README, "Prepare dataset"): a stereo file whose left channel is Moshi (the stream
the model predicts) and right channel the user, with the word timestamps of the Moshi channel in a `.json` beside
it. `CHANNEL_MAPS` names the ways to read a file; a mono file is always the Moshi stream alone, as before.

Notation: K = dep_q audio codebooks, T Mimi frames (12.5 Hz).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from moshi.models.compression import MimiModel

from moshi_ttt.data import alignments
from moshi_ttt.data import audio as audio_io
from moshi_ttt.data.stream import encode_streaming

logger = logging.getLogger(__name__)

# How a stereo file is read: "moshi-left" (moshi-finetune's convention: left = Moshi, right = user), "moshi-right"
# (the other way round) or "mix" (both channels mixed to mono and scored as Moshi's speech: the older behaviour).
CHANNEL_MAPS = ("moshi-left", "moshi-right", "mix")
DEFAULT_CHANNEL_MAP = "moshi-left"


@dataclass(frozen=True)
class DialogueAudio:
    """The audio streams of one file."""

    moshi: audio_io.Audio  # the channel the model predicts (the whole file when mono or mixed)
    user: audio_io.Audio | None  # the other channel of a stereo dialogue file, None for mono or mixed files
    channels: str  # how the file was read, for reports ("mono", "mix of 2 channels", "left: Moshi, right: user")


@dataclass(frozen=True)
class FileStreams:
    """What one file gives to scoring: the Moshi stream, the user stream, the transcript."""

    audio: DialogueAudio
    moshi_codes: torch.Tensor  # [1, K, T] long
    user_codes: torch.Tensor | None  # [1, K, T] long, None without a user channel
    words: list[alignments.Word] | None  # the transcript, None when the text stream is not a transcript

    @property
    def tokens(self) -> int:
        return int(self.moshi_codes.shape[-1])

    def score_inputs(self, model, tokenizer: alignments.TextTokenizer | None = None) -> dict:
        """`score(...)` keywords for `model`: `user_codes` when it reads a user stream, `text_tokens` [1, T] of the
        transcript (with the model's special text tokens) when there is one.

        Raises:
            ValueError: a transcript without a tokenizer.
        """
        device = next(model.parameters()).device
        inputs = {}
        if self.user_codes is not None and model.num_audio_codebooks > model.dep_q:
            inputs["user_codes"] = self.user_codes.to(device)
        if self.words is not None:
            if tokenizer is None:
                raise ValueError(
                    "the transcript text stream needs the model's text tokenizer (moshi's tokenizer_spm_32k_3.model)"
                )
            ids = alignments.TextIds.of(model)
            inputs["text_tokens"] = alignments.text_stream(self.words, self.tokens, tokenizer, ids)[None].to(device)
        return inputs

    def info(self) -> dict:
        """results.json "audio" fields of the streams (beside the file's own)."""
        return {"channels": self.audio.channels, "transcript_words": None if self.words is None else len(self.words)}


def read_dialogue(
    path: str | Path,
    channels: str = DEFAULT_CHANNEL_MAP,
    *,
    max_seconds: float | None = audio_io.DEFAULT_MAX_SECONDS,
    allow_silence: bool = False,
) -> DialogueAudio:
    """Reads an audio file as Moshi's stream and, for a stereo file, the user's.

    Args:
        path: any file libsndfile reads.
        channels: one of CHANNEL_MAPS (a mono file is read the same way whatever it says).
        max_seconds, allow_silence: as `audio.load_audio` (only the Moshi channel must not be silent).
    Returns:
        DialogueAudio at 24 kHz.
    Raises:
        FileNotFoundError: no such file.
        ValueError: one sentence for a bad channel map, a file of more than two channels to split, or the errors
            of `audio.load_audio`.
    """
    if channels not in CHANNEL_MAPS:
        raise ValueError(f"channels must be one of {CHANNEL_MAPS}, got {channels!r}")
    mixed = audio_io.load_audio(path, max_seconds=max_seconds, allow_silence=allow_silence or channels != "mix")
    if mixed.source_channels == 1 or channels == "mix":
        if mixed.silent and not allow_silence:  # as load_audio would have said
            raise ValueError(f"{mixed.name} is silent (no sample above -80 dBFS); allow silence to score it anyway.")
        label = "mono" if mixed.source_channels == 1 else f"mix of {mixed.source_channels} channels"
        return DialogueAudio(mixed, None, label)
    if mixed.source_channels != 2:
        raise ValueError(
            f"{mixed.name} has {mixed.source_channels} channels: a dialogue file has two (moshi-finetune's left = "
            "Moshi, right = user); score their mix with channels 'mix'"
        )
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [N, 2], checked by load_audio
    moshi_side = 0 if channels == "moshi-left" else 1
    streams = []
    for side in (moshi_side, 1 - moshi_side):
        samples = data[:, side]
        if rate != audio_io.SAMPLE_RATE:
            samples = soxr.resample(samples, rate, audio_io.SAMPLE_RATE, quality="HQ").astype(np.float32)
        silent = bool(np.abs(samples).max() < audio_io.SILENCE_THRESHOLD)
        tensor = torch.from_numpy(np.ascontiguousarray(samples))
        streams.append(audio_io.Audio(tensor, rate, 2, silent, mixed.name))
    if streams[0].silent and not allow_silence:
        raise ValueError(
            f"the Moshi channel ({'left' if moshi_side == 0 else 'right'}) of {mixed.name} is silent; allow silence "
            "to score it anyway, or check the channel map"
        )
    sides = ("left", "right") if moshi_side == 0 else ("right", "left")
    return DialogueAudio(streams[0], streams[1], f"{sides[0]}: Moshi, {sides[1]}: user")


def read_streams(
    path: str | Path,
    mimi: MimiModel,
    dep_q: int,
    channels: str = DEFAULT_CHANNEL_MAP,
    *,
    transcript: bool = False,
    max_seconds: float | None = audio_io.DEFAULT_MAX_SECONDS,
    allow_silence: bool = False,
) -> FileStreams:
    """A file's scoring inputs: its channels encoded with Mimi and, with `transcript`, its moshi-finetune alignments
    (`PATH.json`), checked against the audio.

    Args:
        mimi: the codec (not streaming); dep_q: the codebooks the model predicts (K).
        channels: one of CHANNEL_MAPS.
        transcript: read the alignments beside the file (text stream "transcript").
    Returns:
        FileStreams with codes [1, K, T] (both channels of a file have the same T).
    Raises:
        FileNotFoundError: no such audio or alignment file.
        ValueError: one sentence for bad audio, a bad channel map, an alignment that does not match the audio, or
            a transcript of a stereo file read with "moshi-right" (its words are the left channel's).
    """
    audio = read_dialogue(path, channels, max_seconds=max_seconds, allow_silence=allow_silence)
    if transcript and audio.user is not None and channels == "moshi-right":
        # moshi-finetune's alignments name only the left channel's speaker (alignments.MAIN_SPEAKER): its words
        # would become the text of the right channel's speech.
        raise ValueError(
            f"a transcript of {audio.moshi.name} holds the left channel's words ({alignments.MAIN_SPEAKER}), so it "
            "cannot be Moshi's text with channels 'moshi-right': use 'moshi-left' or another text stream"
        )
    moshi_codes = encode_streaming(mimi, audio.moshi)[:, :dep_q]  # [1, K, T], the reference encoding
    user_codes = None
    if audio.user is not None:
        user_codes = encode_streaming(mimi, audio.user)[:, :dep_q]  # [1, K, T]: both channels have the same length
    words = None
    if transcript:
        json_path = alignments.alignment_path(path)
        words = alignments.read_alignments(json_path)
        alignments.check_against_audio(words, audio.moshi.duration_s, json_path.name)
    return FileStreams(audio, moshi_codes, user_codes, words)
