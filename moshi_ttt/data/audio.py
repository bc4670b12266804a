"""Audio in: read any file libsndfile reads, mix to mono, resample to 24 kHz, validate, encode with Mimi.

Two ways to read, with the same samples: `load_audio` (the whole file as one tensor, for short clips) and
`read_blocks` (block by block, memory flat in the file's length, for files of an hour and more; moshi_ttt.data.stream
encodes such blocks with moshi's streaming Mimi). Both first run `check_audio`, one pass over the file at its own
rate that finds what would stop a run half-way (damaged data, a file that ends before its header says, NaN samples,
silence) before any scoring starts.

Errors for bad input are one readable sentence (ValueError, or FileNotFoundError for a missing path): they are shown
as they are to CLI and app users.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
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
DEFAULT_MAX_SECONDS = 600.0  # longest file the app accepts by default (its public cap)
SILENCE_THRESHOLD = 1e-4  # peak |sample| below which a file counts as silent (-80 dBFS)
READ_BLOCK_S = 10.0  # seconds of the file read (and resampled) at a time by read_blocks and check_audio
RESAMPLE_QUALITY = "HQ"  # soxr quality; its streaming resampler gives the one-shot result, whatever the blocks
# libsndfile's header log when a file's data stops before its header says (a WAV/AIFF cut off mid-way: "data :
# 480000 (should be 239978)"; an Ogg stream without its last page).
_ENDS_EARLY = (re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE), "lacks an end-of-stream bit")


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


@dataclass(frozen=True)
class AudioInfo:
    """A checked audio file (`check_audio`): what `read_blocks` will read from it."""

    path: Path
    name: str  # file name, for messages and reports
    source_sample_rate: int  # the file's own rate, Hz
    source_channels: int  # channels mixed down to mono
    source_frames: int  # frames read at the file's rate (all of them, or the first max_seconds with trim)
    silent: bool  # every sample below SILENCE_THRESHOLD (only with allow_silence=True)
    trimmed_from_s: float | None = None  # the file's whole duration when only its start is read (trim=True)

    @property
    def duration_s(self) -> float:
        """Seconds read."""
        return self.source_frames / self.source_sample_rate

    @property
    def num_samples(self) -> int:
        """Samples at 24 kHz that read_blocks yields in all: soxr's length, n * 24000 / rate rounded half up."""
        rate = self.source_sample_rate
        return (2 * self.source_frames * SAMPLE_RATE + rate) // (2 * rate)

    @property
    def num_frames(self) -> int:
        """Mimi frames (tokens at 12.5 Hz) the audio encodes to."""
        return math.ceil(self.num_samples / FRAME_SIZE)


def _header(path: Path, max_seconds: float | None, trim: bool) -> tuple[sf._SoundFileInfo, int, float | None]:
    """The file's header, the frames to read and the whole duration when trimmed; one sentence for bad files."""
    name = path.name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file.")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"{name} could not be read as audio: it is not a format libsndfile understands.") from e
    if info.frames == 0 or info.samplerate <= 0:
        raise ValueError(f"{name} contains no audio samples.")
    pattern, ogg_note = _ENDS_EARLY
    cut = pattern.search(info.extra_info or "")
    if (cut and int(cut.group(2)) < int(cut.group(1))) or ogg_note in (info.extra_info or ""):
        raise ValueError(f"{name} ends early: its data stops before the length its header gives (a cut-off file).")
    duration_s = info.frames / info.samplerate
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive finite number, got {max_seconds}.")
    if max_seconds is not None and duration_s > max_seconds:
        if not trim:
            raise ValueError(f"{name} lasts {duration_s:.1f} s, longer than the limit of {max_seconds:g} s.")
        frames = math.floor(max_seconds * info.samplerate)
        if frames == 0:
            raise ValueError(f"{name}: the first {max_seconds:g} s hold no audio sample.")
        return info, frames, duration_s
    return info, info.frames, None


def _source_blocks(path: Path, frames: int, rate: int, block_s: float = READ_BLOCK_S) -> Iterator[np.ndarray]:
    """Mono float32 blocks [n] at the file's own rate, `frames` in all; one sentence when the data is damaged,
    stops early or holds NaN/inf."""
    name, done = path.name, 0
    blocksize = max(1, int(block_s * rate))
    try:
        for block in sf.blocks(str(path), blocksize=blocksize, frames=frames, dtype="float32", always_2d=True):
            if block.shape[0] == 0:
                break
            if not np.isfinite(block).all():
                raise ValueError(f"{name} contains NaN or infinite samples.")
            done += block.shape[0]
            yield block.mean(axis=1)  # [n, channels] -> [n]
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ValueError(
            f"{name} could not be decoded after {done / rate:.1f} s: the audio data is damaged or truncated."
        ) from e
    if done < frames:
        raise ValueError(f"{name} ends early: its header gives {frames / rate:.1f} s, its data stops at "
                         f"{done / rate:.1f} s.")  # fmt: skip


def check_audio(
    path: str | Path,
    *,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    allow_silence: bool = False,
    trim: bool = False,
) -> AudioInfo:
    """Checks an audio file in one pass at its own rate (memory flat in its length), before anything is scored.

    Args:
        path: the file (wav, flac, ogg, mp3, ...: whatever libsndfile reads).
        max_seconds: longest duration accepted (None: no cap).
        allow_silence: accept a file whose every sample is below SILENCE_THRESHOLD (it can still be scored).
        trim: read only the first `max_seconds` of a longer file (AudioInfo.trimmed_from_s says so) instead of
            refusing it.
    Returns:
        AudioInfo for `read_blocks`.
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: one sentence for a file that is unreadable or not audio, damaged, cut off, empty, silent, holds
            NaN samples, or is too long.
    """
    path = Path(path)
    info, frames, trimmed_from_s = _header(path, max_seconds, trim)
    peak = 0.0
    for block in _source_blocks(path, frames, info.samplerate):
        peak = max(peak, float(np.abs(block).max()))
    silent = peak < SILENCE_THRESHOLD
    if silent and not allow_silence:
        raise ValueError(f"{path.name} is silent (no sample above -80 dBFS); allow silence to score it anyway.")
    logger.info("checked %s: %.1f s, %d Hz, %d channel(s)", path.name, frames / info.samplerate, info.samplerate,
                info.channels)  # fmt: skip
    return AudioInfo(path, path.name, info.samplerate, info.channels, frames, silent, trimmed_from_s)


def read_blocks(info: AudioInfo, block_s: float = READ_BLOCK_S) -> Iterator[torch.Tensor]:
    """The checked file's audio as mono float32 blocks at 24 kHz, read and resampled block by block.

    The blocks concatenate to the same samples whatever `block_s` (soxr's streaming resampler gives its one-shot
    result), and to `load_audio`'s.

    Args:
        info: from `check_audio`.
        block_s: seconds of the file per block (the last one may be shorter; blocks may be empty).
    Yields:
        samples [n] float32 at SAMPLE_RATE.
    Raises:
        ValueError: one sentence if the file turns out damaged or cut off (changed since it was checked).
    """
    rate = info.source_sample_rate
    resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, "float32", RESAMPLE_QUALITY)
    for block in _source_blocks(info.path, info.source_frames, rate, block_s):
        yield torch.from_numpy(block if resampler is None else resampler.resample_chunk(block))
    if resampler is not None:
        yield torch.from_numpy(resampler.resample_chunk(np.zeros(0, np.float32), last=True))


def load_audio(
    path: str | Path,
    *,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    allow_silence: bool = False,
    trim: bool = False,
) -> Audio:
    """Reads a whole audio file (wav, flac, ogg, mp3, ...: whatever libsndfile reads), mixes it to mono, resamples it.

    For long files use `check_audio` and `read_blocks` (the same samples, block by block).

    Args:
        path: the file.
        max_seconds: longest duration accepted (None: no cap).
        allow_silence: accept a file whose every sample is below SILENCE_THRESHOLD (it can still be scored).
        trim: read only the first `max_seconds` of a longer file (Audio.trimmed_from_s says so) instead of refusing it.
    Returns:
        Audio at 24 kHz.
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: one sentence for a file that is unreadable or not audio, damaged, cut off, empty, silent, holds
            NaN samples, or is too long.
    """
    info = check_audio(path, max_seconds=max_seconds, allow_silence=allow_silence, trim=trim)
    samples = torch.cat(list(read_blocks(info)))  # [N]
    return Audio(samples, info.source_sample_rate, info.source_channels, info.silent, info.name, info.trimmed_from_s)


def mimi_input(mimi: MimiModel, samples: torch.Tensor) -> torch.Tensor:
    if samples.dim() != 1 or samples.shape[0] == 0:
        raise ValueError(f"expected a non-empty mono waveform [N], got shape {list(samples.shape)}")
    if mimi.sample_rate != SAMPLE_RATE or mimi.frame_size != FRAME_SIZE:
        raise ValueError(f"expected a 24 kHz Mimi with {FRAME_SIZE}-sample frames, got {mimi.sample_rate} Hz")
    device = next(mimi.parameters()).device
    return samples.to(device=device, dtype=torch.float32)[None, None]  # [1, 1, N]


def encode(mimi: MimiModel, audio: Audio | torch.Tensor) -> torch.Tensor:
    """Encodes a whole waveform at once (the last frame zero-padded, as moshi does), for short clips: memory grows
    with the clip (a 26.5-minute clip took 21 GB with the demo codec). `moshi_ttt.data.stream.encode_streaming`
    gives the reference codes.

    Args:
        mimi: a moshi MimiModel (its number of codebooks set, e.g. 8), not streaming.
        audio: Audio, or samples [N] at 24 kHz.
    Returns:
        codes [1, K, ceil(N / 1920)] long.
    """
    samples = audio.samples if isinstance(audio, Audio) else audio
    with torch.no_grad():
        return mimi.encode(mimi_input(mimi, samples))  # [1, K, T]
