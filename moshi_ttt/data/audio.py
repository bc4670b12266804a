"""Audio in: read any file libsndfile reads, mix to mono, resample to 24 kHz, validate, encode with Mimi.

Errors for bad input are one readable sentence (ValueError, or FileNotFoundError for a missing path): they are shown
as they are to CLI and app users.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from moshi.models.compression import MimiModel

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24_000  # Mimi's sample rate, Hz
FRAME_SIZE = 1920  # samples per Mimi frame (80 ms at 24 kHz, 12.5 Hz)
FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # Mimi tokens per second (12.5)
DEFAULT_MAX_SECONDS = 600.0  # longest file accepted by default (the app's cap; the CLI can raise it)
SILENCE_THRESHOLD = 1e-4  # peak |sample| below which a file counts as silent (-80 dBFS)


@dataclass(frozen=True)
class Audio:
    """A mono waveform at 24 kHz, ready for Mimi."""

    samples: torch.Tensor  # [N] float32 in [-1, 1] at SAMPLE_RATE
    source_sample_rate: int  # the file's own rate, Hz
    source_channels: int  # channels mixed down to mono
    silent: bool  # every sample below SILENCE_THRESHOLD (only with allow_silence=True)
    name: str  # file name, for messages and reports
    trimmed_from_s: float | None = None  # the file's whole duration when only its start was read (trim=True)

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        """Mimi frames (tokens at 12.5 Hz) this audio encodes to."""
        return math.ceil(self.samples.shape[0] / FRAME_SIZE)


def load_audio(
    path: str | Path,
    *,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    allow_silence: bool = False,
    trim: bool = False,
) -> Audio:
    """Reads an audio file (wav, flac, ogg, mp3, ...: whatever libsndfile reads), mixes it to mono, resamples it.

    Args:
        path: the file.
        max_seconds: longest duration accepted (None: no cap).
        allow_silence: accept a file whose every sample is below SILENCE_THRESHOLD (it can still be scored).
        trim: read only the first `max_seconds` of a longer file (Audio.trimmed_from_s says so) instead of refusing it.
    Returns:
        Audio at 24 kHz.
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: one sentence for a file that is unreadable or not audio, empty, silent, or too long.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file.")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"{name} could not be read as audio: it is not a format libsndfile understands.") from e
    if info.frames == 0 or info.samplerate <= 0:
        raise ValueError(f"{name} contains no audio samples.")
    duration_s = info.frames / info.samplerate
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive finite number, got {max_seconds}.")
    frames, trimmed_from_s = -1, None  # -1: the whole file
    if max_seconds is not None and duration_s > max_seconds:
        if not trim:
            raise ValueError(f"{name} lasts {duration_s:.1f} s, longer than the limit of {max_seconds:g} s.")
        frames, trimmed_from_s = math.floor(max_seconds * info.samplerate), duration_s
    try:
        data, sample_rate = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)  # [N, channels]
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ValueError(f"{name} could not be decoded: the audio data is damaged or truncated.") from e
    if data.shape[0] == 0:
        raise ValueError(f"{name} contains no audio samples.")
    if not np.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or infinite samples.")
    mono = data.mean(axis=1)  # [N]
    if sample_rate != SAMPLE_RATE:
        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    silent = bool(np.abs(mono).max() < SILENCE_THRESHOLD)
    if silent and not allow_silence:
        raise ValueError(f"{name} is silent (no sample above -80 dBFS); allow silence to score it anyway.")
    logger.info("loaded %s: %.1f s, %d Hz, %d channel(s)", name, duration_s, sample_rate, data.shape[1])
    samples = torch.from_numpy(np.ascontiguousarray(mono))
    return Audio(samples, sample_rate, data.shape[1], silent, name, trimmed_from_s)


def _mimi_input(mimi: MimiModel, samples: torch.Tensor) -> torch.Tensor:
    if samples.dim() != 1 or samples.shape[0] == 0:
        raise ValueError(f"expected a non-empty mono waveform [N], got shape {list(samples.shape)}")
    if mimi.sample_rate != SAMPLE_RATE or mimi.frame_size != FRAME_SIZE:
        raise ValueError(f"expected a 24 kHz Mimi with {FRAME_SIZE}-sample frames, got {mimi.sample_rate} Hz")
    device = next(mimi.parameters()).device
    return samples.to(device=device, dtype=torch.float32)[None, None]  # [1, 1, N]


def encode(mimi: MimiModel, audio: Audio | torch.Tensor) -> torch.Tensor:
    """Encodes a whole waveform at once (the last frame zero-padded, as moshi does).

    Args:
        mimi: a moshi MimiModel (its number of codebooks set, e.g. 8), not streaming.
        audio: Audio, or samples [N] at 24 kHz.
    Returns:
        codes [1, K, ceil(N / 1920)] long.
    """
    samples = audio.samples if isinstance(audio, Audio) else audio
    with torch.no_grad():
        return mimi.encode(_mimi_input(mimi, samples))  # [1, K, T]


def encode_streaming(mimi: MimiModel, audio: Audio | torch.Tensor) -> torch.Tensor:
    """Encodes frame by frame (1920 samples each) inside `mimi.streaming`, as a real-time client would.

    Returns:
        codes [1, K, ceil(N / 1920)] long; the last frame is zero-padded.
    """
    samples = audio.samples if isinstance(audio, Audio) else audio
    x = _mimi_input(mimi, samples)  # [1, 1, N]
    pad = -x.shape[-1] % FRAME_SIZE
    x = torch.nn.functional.pad(x, (0, pad))  # [1, 1, T * 1920]
    codes = []
    with torch.no_grad(), mimi.streaming(1):
        for start in range(0, x.shape[-1], FRAME_SIZE):
            codes.append(mimi.encode(x[..., start : start + FRAME_SIZE]))  # [1, K, 1]
    return torch.cat(codes, dim=-1)
