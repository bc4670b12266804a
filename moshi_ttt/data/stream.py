"""Streaming encoding: audio blocks in, Mimi codes out as they come, with moshi's streaming Mimi.

moshi's server encodes live audio this way: `with mimi.streaming(1): mimi.encode(frames)` on whole frames, the
convolutions and the encoder transformer carrying their state from one call to the next. Memory stays flat in the
length of the audio; encoding a 26.5-minute clip in one call took 21 GB with the demo codec (the encoder
transformer attends over the whole clip at once).

The reference encoding of moshi_ttt (the CLI, the app, `encode_streaming` and the tests all use it):
- Mimi calls of `ENCODE_FRAMES` whole frames (2 s). The last call is zero-padded to a whole call and its codes past
  the audio's ceil(N / 1920) frames are dropped: Mimi is causal, so padding after the end changes no earlier code,
  and every call has the same shape (moshi's CUDA graphs need that on a GPU).
- The encoder transformer's ring KV cache widened to `context + steps per call - 1`
  (compat.streaming.widen_kv_caches), so every step sees exactly its attention window, as in the whole-clip
  forward: moshi 0.2.13's ring (capacity = context) drops keys at the far end of the window once the audio passes
  the window (10 s), more keys the longer the call.
Streamed codes differ from whole-clip codes (`audio.encode`) at a small share of tokens: convolutions of other
shapes round differently and flip near ties of the residual quantizer, and a flipped codebook changes the residual
of the later ones. bench/long_file.py measures that share on speech, also against moshi's server-style encoding
(one frame per call, the ring as it is). The streamed codes are the reference: they are what moshi produces in use.

`CodecStream` is the streaming session both directions share (calls of whole frames, the widened windows, a shared
codec's state per user); `moshi_ttt.data.decode` decodes codes back to audio with it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import typing as tp
from collections.abc import Iterable, Iterator
from contextlib import ExitStack

import torch
from moshi.models.compression import MimiModel

from moshi_ttt.compat.streaming import start_streaming, widen_kv_caches
from moshi_ttt.data.audio import FRAME_SIZE, SAMPLE_RATE, Audio, AudioInfo, mimi_input, read_blocks

logger = logging.getLogger(__name__)

ENCODE_FRAMES = 25  # Mimi frames per streaming encode call (2 s of audio; 0.4% of the one-frame calls' time each)
_Stream = tp.TypeVar("_Stream", bound="CodecStream")  # a subclass's own type (typing.Self is Python 3.11+)


class CodecStream:
    """moshi's Mimi in streaming mode, called on `frames_per_call` whole frames at a time: the base of
    `StreamEncoder` here and of `moshi_ttt.data.decode.StreamDecoder`.

    With a `lock` (a codec shared by several runs, as in the app), the codec's streaming state is installed only
    while the lock is held, and saved between calls: runs (encoding or decoding) interleave call by call without
    seeing each other's state.
    """

    def __init__(
        self,
        mimi: MimiModel,
        *,
        frames_per_call: int,
        lock: threading.Lock | None = None,
        exact_window: bool = True,
    ):
        """
        Args:
            mimi: a moshi MimiModel at 24 kHz with 1920-sample frames, not streaming.
            frames_per_call: Mimi frames per call (the codes depend on it a little: module docstring).
            lock: taken around every use of the codec; its streaming state lives here in between.
            exact_window: widen the transformers' KV caches (module docstring); False: moshi's ring as it is
                (its server's behaviour with frames_per_call=1).
        """
        if mimi.sample_rate != SAMPLE_RATE or mimi.frame_size != FRAME_SIZE:
            raise ValueError(f"expected a 24 kHz Mimi with {FRAME_SIZE}-sample frames, got {mimi.sample_rate} Hz")
        if frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {frames_per_call}")
        self.mimi = mimi
        self.frames_per_call = frames_per_call
        self.lock = lock
        self.exact_window = exact_window
        self.device = next(mimi.parameters()).device
        self.stack = ExitStack()
        self.state: dict | None = None  # the codec's streaming state between calls when a lock is given

    def __enter__(self: _Stream) -> _Stream:
        with self._using():
            self.stack.enter_context(start_streaming(self.mimi, 1))
            if self.exact_window:
                # The encoder's and the decoder's transformers run at the encoder frame rate (25 Hz for Mimi).
                steps_per_frame = max(1, round(self.mimi.encoder_frame_rate / self.mimi.frame_rate))
                widen_kv_caches(self.mimi, self.frames_per_call * steps_per_frame)
        return self

    def __exit__(self, *exc) -> None:
        with self._using():
            self.stack.close()
        self.state = None

    @contextlib.contextmanager
    def _using(self):
        """Holds the lock with this stream's streaming state installed (no lock: the state stays installed)."""
        if self.lock is None:
            yield
            return
        with self.lock:
            if self.state is not None:
                self.mimi.set_streaming_state(self.state)
            try:
                yield
            finally:
                state = self.mimi.get_streaming_state()
                self.state = state if any(v is not None for v in state.values()) else None
                self.mimi.set_streaming_state(dict.fromkeys(state))

    def through(self, blocks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Opens the session, pushes every block, finishes it: each output as it comes (a subclass's `push` and
        `finish`: codes of samples, or samples of codes). Closing the generator leaves the session."""
        with self:
            for block in blocks:
                yield from self.push(block)
            last = self.finish()
        if last is not None:
            yield last


class StreamEncoder(CodecStream):
    """moshi's streaming Mimi fed blocks of any length; gives the codes of each whole call as soon as it is complete.

        with StreamEncoder(mimi) as encoder:
            for samples in blocks:                # [n] float32 at 24 kHz
                for codes in encoder.push(samples):
                    ...                           # [1, K, ENCODE_FRAMES]
            last = encoder.finish()               # [1, K, f] or None

    `lock` and `exact_window`: see `CodecStream`.
    """

    def __init__(
        self,
        mimi: MimiModel,
        *,
        frames_per_call: int = ENCODE_FRAMES,
        lock: threading.Lock | None = None,
        exact_window: bool = True,
    ):
        super().__init__(mimi, frames_per_call=frames_per_call, lock=lock, exact_window=exact_window)
        self.call_samples = frames_per_call * FRAME_SIZE
        self.buffer = torch.zeros(0, dtype=torch.float32, device=self.device)  # [n] samples not yet encoded
        self.samples_in = 0  # samples pushed
        self.frames_out = 0  # frames of codes given out

    def _encode(self, samples: torch.Tensor) -> torch.Tensor:
        with self._using(), torch.no_grad():
            return self.mimi.encode(samples[None, None])  # [1, 1, call] -> [1, K, frames_per_call]

    def push(self, samples: torch.Tensor) -> Iterator[torch.Tensor]:
        """Adds samples [n] float32 at 24 kHz; yields codes [1, K, frames_per_call] of every call they complete."""
        if samples.dim() != 1:
            raise ValueError(f"expected a mono waveform [N], got shape {list(samples.shape)}")
        self.samples_in += samples.shape[0]
        self.buffer = torch.cat([self.buffer, samples.to(device=self.device, dtype=torch.float32)])
        while self.buffer.shape[0] >= self.call_samples:
            call, self.buffer = self.buffer[: self.call_samples], self.buffer[self.call_samples :]
            self.frames_out += self.frames_per_call
            yield self._encode(call)

    def finish(self) -> torch.Tensor | None:
        """Codes [1, K, f] of the samples left (zero-padded to a whole call, the frames past the audio dropped);
        None when nothing is left."""
        frames_left = math.ceil(self.samples_in / FRAME_SIZE) - self.frames_out
        if frames_left <= 0:
            return None
        call = torch.nn.functional.pad(self.buffer, (0, self.call_samples - self.buffer.shape[0]))
        self.buffer = self.buffer[:0]
        self.frames_out += frames_left
        return self._encode(call)[..., :frames_left]


def encode_blocks(
    mimi: MimiModel,
    blocks: Iterable[torch.Tensor],
    *,
    frames_per_call: int = ENCODE_FRAMES,
    lock: threading.Lock | None = None,
    exact_window: bool = True,
) -> Iterator[torch.Tensor]:
    """Encodes sample blocks [n] (float32, 24 kHz) with moshi's streaming Mimi, yielding codes as they come.

    Args:
        mimi, frames_per_call, lock, exact_window: see `StreamEncoder`.
    Yields:
        codes [1, K, f] long on the codec's device; ceil(N / 1920) frames in all for N samples.
    """
    encoder = StreamEncoder(mimi, frames_per_call=frames_per_call, lock=lock, exact_window=exact_window)
    yield from encoder.through(blocks)


def encode_file(mimi: MimiModel, info: AudioInfo, **kwargs) -> torch.Tensor:
    """All the codes of a checked file (`audio.check_audio`), read and encoded block by block: codes [1, K, T].

    For the codes as they come, `encode_blocks(mimi, read_blocks(info))`.
    """
    return torch.cat(list(encode_blocks(mimi, read_blocks(info), **kwargs)), dim=-1)


def encode_streaming(mimi: MimiModel, audio: Audio | torch.Tensor) -> torch.Tensor:
    """Encodes with moshi's streaming Mimi, the reference encoding of moshi_ttt (this module).

    Returns:
        codes [1, K, ceil(N / 1920)] long; the last frame is zero-padded.
    """
    samples = audio.samples if isinstance(audio, Audio) else audio
    mimi_input(mimi, samples)  # the same checks as `audio.encode`
    return torch.cat(list(encode_blocks(mimi, [samples])), dim=-1)
