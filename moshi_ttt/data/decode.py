"""Streaming decoding: Mimi codes in, the codec's reconstruction out, written to a wav file block by block.

The models read codes, not audio; the codec's decoder turns those codes back into the audio they stand for: what
the models hear. How close that is to the input depends on the codec (moshi's Mimi gives recognisable speech; a
codec whose decoder was never trained gives noise), so callers must not promise more.

Decoding mirrors the reference encoding (data/stream.py, `CodecStream`): moshi's Mimi in streaming mode
(`mimi.streaming(1)`, then `mimi.decode` per call) on `DECODE_FRAMES` whole frames per call; the last call padded
with code 0 to a whole call and its samples past the codes' frames dropped (Mimi's decoder is causal: padding after
the end changes no earlier sample), so every call has the same shape (moshi's CUDA graphs need that on a GPU); the
decoder transformer's ring KV cache widened so that every step sees exactly its attention window (moshi 0.2.13's ring
drops keys of the window once the clip passes it: 2e-4 off the whole-clip decode with one frame per call on a tiny
codec, 1e-3 with 25). Then it equals one whole-clip `mimi.decode` to float32 round-off (tests/test_decode.py), at
memory flat in the clip's length: each call's samples go to the file as they come.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch
from moshi.models.compression import MimiModel

from moshi_ttt.data.audio import FRAME_SIZE, SAMPLE_RATE
from moshi_ttt.data.stream import CodecStream

logger = logging.getLogger(__name__)

DECODE_FRAMES = 25  # Mimi frames per streaming decode call (2 s of audio), as data.stream.ENCODE_FRAMES
WAV_SUBTYPE = "PCM_16"  # 16-bit PCM: 48 kB per second of audio at 24 kHz


@dataclass(frozen=True)
class Reconstruction:
    """A clip decoded from its codes and written to a wav file (`decode_to_wav`)."""

    path: Path  # the wav file: mono, 16-bit PCM at `sample_rate`
    num_samples: int  # samples written: FRAME_SIZE per frame of codes
    sample_rate: int  # Hz (Mimi's 24 kHz)
    peak: float  # largest |sample| the decoder gave, before clipping to [-1, 1]
    clipped_samples: int  # samples beyond [-1, 1], written clipped to it
    decode_s: float  # seconds spent decoding and writing (and making the codes, when they come from a generator)

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate


def check_codes(mimi: MimiModel, codes: torch.Tensor, *, allow_empty: bool = False) -> torch.Tensor:
    """Checks codes [1, K, T] against the codec that is to decode them.

    Args:
        mimi: the codec.
        codes: integer codes, K at most the codec's number of codebooks, values in [0, cardinality).
        allow_empty: accept T = 0 (a block of codes that may be empty).
    Returns:
        The codes as long, on the codec's device.
    Raises:
        ValueError: one sentence naming what was expected and what was found.
    """
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"expected codes as a tensor [1, K, T], got {type(codes).__name__}")
    if codes.dim() != 3 or codes.shape[0] != 1:
        raise ValueError(f"expected codes [1, K, T] (one clip), got shape {list(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"expected integer codes, got {codes.dtype}")
    num_codebooks = codes.shape[1]
    if not 1 <= num_codebooks <= mimi.num_codebooks:
        raise ValueError(f"the codec decodes 1 to {mimi.num_codebooks} codebooks, got codes of {num_codebooks}")
    if codes.shape[2] == 0 and not allow_empty:
        raise ValueError("expected codes of at least one frame, got none")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= mimi.cardinality):
        raise ValueError(f"codes must lie in [0, {mimi.cardinality}) for this codec, got values from "
                         f"{int(codes.min())} to {int(codes.max())}")  # fmt: skip
    return codes.to(device=next(mimi.parameters()).device, dtype=torch.long)


class StreamDecoder(CodecStream):
    """moshi's streaming Mimi fed codes of any length; gives the audio of each whole call as soon as it is complete.

        with StreamDecoder(mimi) as decoder:
            for codes in blocks:                  # [1, K, n] long
                for samples in decoder.push(codes):
                    ...                           # [DECODE_FRAMES * 1920] float32 at 24 kHz
            last = decoder.finish()               # [f * 1920] or None

    `lock` and `exact_window`: see `CodecStream` (a codec that also encodes, as in the app, takes the same lock).
    """

    def __init__(
        self,
        mimi: MimiModel,
        *,
        frames_per_call: int = DECODE_FRAMES,
        lock: threading.Lock | None = None,
        exact_window: bool = True,
    ):
        if mimi.channels != 1:
            raise ValueError(f"expected a mono codec, got one of {mimi.channels} channels")
        super().__init__(mimi, frames_per_call=frames_per_call, lock=lock, exact_window=exact_window)
        self.buffer: torch.Tensor | None = None  # [1, K, n] codes not yet decoded; K fixed by the first push

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        with self._using(), torch.no_grad():
            return self.mimi.decode(codes)[0, 0].float()  # [1, K, f] -> [1, 1, f * FRAME_SIZE] -> [f * FRAME_SIZE]

    def push(self, codes: torch.Tensor) -> Iterator[torch.Tensor]:
        """Adds codes [1, K, n] (n may be 0; K as in the first push); yields samples [frames_per_call * 1920]
        float32 of every call they complete."""
        codes = check_codes(self.mimi, codes, allow_empty=True)
        if self.buffer is not None and codes.shape[1] != self.buffer.shape[1]:
            raise ValueError(f"expected codes of {self.buffer.shape[1]} codebooks as before, got {codes.shape[1]}")
        self.buffer = codes if self.buffer is None else torch.cat([self.buffer, codes], dim=-1)
        while self.buffer.shape[-1] >= self.frames_per_call:
            call, self.buffer = self.buffer[..., : self.frames_per_call], self.buffer[..., self.frames_per_call :]
            yield self._decode(call)

    def finish(self) -> torch.Tensor | None:
        """Samples [f * 1920] of the f frames left (padded with code 0 to a whole call, the samples past them
        dropped); None when nothing is left."""
        if self.buffer is None or self.buffer.shape[-1] == 0:
            return None
        frames_left = self.buffer.shape[-1]
        call = torch.nn.functional.pad(self.buffer, (0, self.frames_per_call - frames_left))  # code 0 after the end
        self.buffer = self.buffer[..., :0]
        return self._decode(call)[: frames_left * FRAME_SIZE]


def decode_blocks(
    mimi: MimiModel,
    blocks: Iterable[torch.Tensor],
    *,
    frames_per_call: int = DECODE_FRAMES,
    lock: threading.Lock | None = None,
    exact_window: bool = True,
) -> Iterator[torch.Tensor]:
    """Decodes blocks of codes [1, K, n] with moshi's streaming Mimi, yielding samples as they come.

    Args:
        mimi, frames_per_call, lock, exact_window: see `StreamDecoder`.
    Yields:
        samples [m] float32 at 24 kHz on the codec's device; 1920 per frame of codes in all.
    """
    decoder = StreamDecoder(mimi, frames_per_call=frames_per_call, lock=lock, exact_window=exact_window)
    yield from decoder.through(blocks)


def decode_to_wav(
    mimi: MimiModel,
    codes: torch.Tensor | Iterable[torch.Tensor],
    path: str | Path,
    *,
    frames_per_call: int = DECODE_FRAMES,
    lock: threading.Lock | None = None,
) -> Reconstruction:
    """Decodes codes with moshi's streaming Mimi into a mono 16-bit PCM wav file, call by call: memory stays flat in
    the clip's length (the decoded waveform is never held whole).

    The file appears at `path` only once complete (written under a temporary name beside it, then renamed); after
    an error nothing is left behind. Samples beyond [-1, 1] are clipped (`Reconstruction.clipped_samples` counts
    them): a codec whose decoder was not trained can give any amplitude.

    Args:
        mimi: a moshi MimiModel at 24 kHz, mono, not streaming.
        codes: codes [1, K, T] (T >= 1), or blocks of them [1, K, n] as they come (e.g. from
            `data.stream.encode_blocks` on the same codec: then give both the same `lock`).
        path: the wav file to write (its folder must exist; an existing file is replaced).
        frames_per_call: Mimi frames per decode call.
        lock: see `CodecStream` (a codec shared by several users).
    Returns:
        What was written.
    Raises:
        ValueError: bad codes (`check_codes`), no codes at all, a path not ending in .wav, or a decoder that gives
            NaN or infinite samples.
        FileNotFoundError: the folder of `path` does not exist.
    """
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise ValueError(f"the reconstruction is written as a .wav file, got {path.name!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} does not exist or is not a folder")
    blocks = [check_codes(mimi, codes)] if isinstance(codes, torch.Tensor) else codes
    start = time.perf_counter()
    num_samples, peak, clipped = 0, 0.0, 0
    handle, partial = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".wav", dir=path.parent)
    os.close(handle)
    try:
        decoded = decode_blocks(mimi, blocks, frames_per_call=frames_per_call, lock=lock)
        with (
            contextlib.closing(decoded),  # leaves the codec's streaming session at once, also after an error
            sf.SoundFile(partial, "w", samplerate=SAMPLE_RATE, channels=1, subtype=WAV_SUBTYPE, format="WAV") as out,
        ):
            for samples in decoded:
                if not torch.isfinite(samples).all():
                    raise ValueError(f"the codec's decoder gave NaN or infinite samples after "
                                     f"{num_samples / SAMPLE_RATE:.1f} s of audio")  # fmt: skip
                magnitude = samples.abs()
                peak = max(peak, float(magnitude.max()))
                clipped += int((magnitude > 1.0).sum())
                out.write(samples.clamp(-1.0, 1.0).cpu().numpy())  # [m] -> m frames of one channel
                num_samples += samples.shape[0]
        if num_samples == 0:
            raise ValueError("expected codes of at least one frame, got none")
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)  # left only after an error: the rename took it otherwise
    result = Reconstruction(path, num_samples, SAMPLE_RATE, peak, clipped, time.perf_counter() - start)
    logger.info("decoded %.1f s of audio to %s in %.1f s (%d samples clipped)", result.duration_s, path.name,
                result.decode_s, clipped)  # fmt: skip
    return result
