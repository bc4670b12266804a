"""Training batches of audio codes: files read side by side, each in order, one TTT state row per file."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import soundfile as sf
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from moshi_ttt.compat.sequence import model_codes
from moshi_ttt.data.audio import encode, load_audio


class BatchSource(Protocol):
    """What `Trainer` reads batches from: `CodeBatcher` (files in order, state carried) or
    `moshi_ttt.training.clip_mix.ClipMixBatcher` (independent clips)."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Audio codes [B, K, T] (-1 where padded) and new_file [B] bool (rows whose TTT state restarts from W_base),
        or None when nothing is carried from one batch to the next (every row starts from W_base)."""
        ...

    def state(self) -> dict:
        """The position in the stream, JSON-serialisable (for exact resumes)."""
        ...

    def load_state(self, state: dict) -> None:
        """Continues from a `state()`."""
        ...


@dataclass
class RowCursor:
    """Where one batch row reads: which file (index into the file list) and from which step."""

    file: int
    step: int


class CodeBatcher:
    """Cuts each file's codes [8, T] into chunks read in order; rows take the next file when theirs ends.

    A row that starts a new file is flagged in `new_file`, so that its TTT state restarts from W_base. The order of
    files is a seeded shuffle per epoch; the whole position is `state()` / `load_state()` for exact resumes.
    The last chunk of a file is padded with moshi's zero token, which `LMModel.forward` masks out of the loss.
    """

    def __init__(self, files: list[torch.Tensor], batch_size: int, chunk_size: int, seed: int = 0):
        if not files:
            raise ValueError("no training files")
        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
        for i, codes in enumerate(files):
            if codes.dim() != 2 or codes.shape[1] == 0:
                raise ValueError(f"file {i}: codes must be [K, T] with T > 0, got {list(codes.shape)}")
        self.files = files
        self.digests = [codes_digest(codes) for codes in files]  # the data's identity, checked on resume
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.seed = seed
        self.epoch = 0
        self.queue_pos = 0
        self.rows: list[RowCursor | None] = [None] * batch_size

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _next_file(self) -> int:
        if self.queue_pos == len(self.files):
            self.epoch += 1
            self.queue_pos = 0
        file = self._order(self.epoch)[self.queue_pos]
        self.queue_pos += 1
        return file

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns audio codes [B, K, chunk] (-1 where padded) and new_file [B] bool."""
        chunks, new_file = [], []
        for r in range(self.batch_size):
            cursor = self.rows[r]
            fresh = cursor is None or cursor.step >= self.files[cursor.file].shape[1]
            if fresh:
                cursor = RowCursor(self._next_file(), 0)
                self.rows[r] = cursor
            codes = self.files[cursor.file][:, cursor.step : cursor.step + self.chunk_size]
            pad = self.chunk_size - codes.shape[1]
            chunks.append(torch.nn.functional.pad(codes, (0, pad), value=-1))
            new_file.append(fresh)
            cursor.step += self.chunk_size
        return torch.stack(chunks), torch.tensor(new_file)

    def state(self) -> dict:
        rows = [None if c is None else [c.file, c.step] for c in self.rows]
        return {"epoch": self.epoch, "queue_pos": self.queue_pos, "rows": rows, "seed": self.seed,
                "files": self.digests}  # fmt: skip

    def load_state(self, state: dict) -> None:
        if len(state["rows"]) != self.batch_size:
            raise ValueError(f"saved batcher has {len(state['rows'])} rows, this one {self.batch_size}")
        saved = state.get("files")  # absent in states saved before the data's identity was recorded
        if saved is not None and saved != self.digests:
            raise ValueError(f"the training data differ from the saved run's ({_data_difference(saved, self.digests)}):"
                             " a resume reads the saved files in the saved order; pass the same data")  # fmt: skip
        self.epoch, self.queue_pos, self.seed = state["epoch"], state["queue_pos"], state["seed"]
        self.rows = [None if r is None else RowCursor(*r) for r in state["rows"]]


def codes_digest(codes: torch.Tensor) -> str:
    """A short sha256 of audio codes [K, T] (shape and values): a training file's identity."""
    values = codes.detach().to("cpu", torch.long).contiguous()
    header = f"{list(values.shape)}".encode()
    return hashlib.sha256(header + b"\0" + values.numpy().tobytes()).hexdigest()[:32]


def _data_difference(saved: list[str], now: list[str]) -> str:
    if len(saved) != len(now):
        return f"{len(saved)} files then, {len(now)} now"
    changed = [i + 1 for i, (a, b) in enumerate(zip(saved, now, strict=True)) if a != b]
    return f"file(s) {', '.join(map(str, changed))} of {len(now)} differ"


def read_codes(path: str | Path) -> torch.Tensor:
    """Audio codes [K, T] (int64) of a safetensors file with a 'codes' tensor of non-negative integers.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, no 'codes', or codes that are not non-negative integers [K, T].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codes file {path} does not exist or is not a file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"codes file {path} is not a readable safetensors file: {e}") from e
    if "codes" not in tensors:
        raise ValueError(f"codes file {path} has no 'codes' tensor (it has {sorted(tensors)})")
    codes = tensors["codes"]
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes file {path} holds {codes.dtype} codes; audio codes are integers")
    if codes.dim() != 2 or codes.shape[1] == 0:
        raise ValueError(f"codes file {path}: codes must be [K, T] with T > 0, got {list(codes.shape)}")
    if bool((codes < 0).any()):
        raise ValueError(f"codes file {path} holds negative codes (min {int(codes.min())}); codes are >= 0")
    return codes.long()


def training_codes(model: LMModel, audio_codes: torch.Tensor) -> torch.Tensor:
    """Model input codes [B, 1 + n_q, T] for padded audio codes [B, 8, T] (-1 = padding, masked out of the loss)."""
    padded = audio_codes < 0
    codes = model_codes(model, audio_codes.clamp_min(0))
    return codes.masked_fill(padded.any(dim=1, keepdim=True), model.zero_token_id)


def cached_codes(paths: list[Path], mimi: MimiModel, codec_ref: str, cache_dir: Path) -> list[torch.Tensor]:
    """Audio codes [8, T] of each file, encoded once with `mimi` and cached by file content and codec.

    The cache key is sha256(codec_ref, file bytes): editing a file or changing the codec re-encodes it. Files are
    mono: a stereo file is a dialogue to evaluation (`moshi_ttt.data.dialogue`: left Moshi, right user), which
    this training does not support, so it is refused rather than mixed down.

    Raises:
        FileNotFoundError: a path that is not a file.
        ValueError: a file with more than one channel (or one `load_audio` refuses).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for path in tqdm(paths, desc="codes", unit="file", disable=len(paths) < 2):
        _check_mono(Path(path))
        digest = hashlib.sha256(codec_ref.encode() + b"\0" + Path(path).read_bytes()).hexdigest()[:32]
        cached = cache_dir / f"{digest}.safetensors"
        if cached.is_file():
            codes = load_file(str(cached))["codes"]
        else:
            codes = encode(mimi, load_audio(path, max_seconds=None))[0].cpu()  # [8, T]
            save_file({"codes": codes.contiguous()}, str(cached), metadata={"source": Path(path).name})
        files.append(codes.long())
    return files


def _check_mono(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist or is not a file")
    try:
        channels = sf.info(str(path)).channels
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return  # not audio soundfile reads: load_audio says why when it encodes the file
    if channels > 1:
        raise ValueError(
            f"{path} has {channels} channels: training reads mono files only (evaluation reads a stereo file as a "
            "dialogue, left Moshi and right user, and training on dialogues is not supported)"
        )
