"""Probe (issue 21): how much content agreement under random sub-frame shifts can a frame-rate quantizer get on a
deterministic shift-robust front end? An upper bound for the next codec design, no training of any network.

Front end, per 80 ms codec frame t (1920 samples at 24 kHz): log-mel (25 ms Hann windows, 10 ms hop) averaged over
a window of `width` ms centred on the frame's centre (t * 1920 + 960), optionally mean-and-variance normalised per
clip and mel band. Quantizer: residual k-means, 8 stages of 256 codes, fit on training-split clips
(`codec_training.make_audio(31, "train", ...)`, natural_corpus train voices); "split" variants quantise the features
with one codebook and, separately, with a 7-stage residual quantizer (Mimi's split RVQ, 1 + 7).

Measured with `research/codec_training.py`'s own functions (agreement, aligned_agreement, cross_agreement,
usage_bits: 3 random delays of 1..1919 samples per clip) on its held-out set (`make_audio(32, "heldout", 6, 8.0)`),
the shipped codec beside it on the same clips and delays; also here: aligned agreement on speech frames only (the
pauses are digital silence) and persistence (a code equal to the previous frame's). Table: OUT/table.md.

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.frontend_probe --out /tmp/i21c
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moshi_ttt.data.codec import load_codec  # noqa: E402
from research.codec_training import (  # noqa: E402
    FRAME,
    REPO,
    SAMPLE_RATE,
    agreement,
    aligned_agreement,
    cross_agreement,
    make_audio,
    mel_filters,
    usage_bits,
)

WIN, HOP, N_FFT = 600, 240, 1024  # 25 ms window, 10 ms hop (samples at 24 kHz)


def log_mel(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """[N] audio -> [n_mels, frames] natural-log mel power; mel frame k is centred on sample k * HOP."""
    spec = torch.stft(audio, N_FFT, HOP, WIN, torch.hann_window(WIN), center=True, return_complex=True).abs() ** 2
    return torch.log(mel_filters(N_FFT, n_mels) @ spec + 1e-6)


class FrontEnd:
    """Deterministic features per codec frame: the mean of the mel frames whose centres lie within width / 2 of the
    frame's centre (1920 / 240: a mel frame sits exactly there; edge mel frames repeated beyond the clip), then
    optionally per-clip normalisation."""

    def __init__(self, n_mels: int, width_ms: float, normalise: bool):
        self.n_mels, self.normalise = n_mels, normalise
        self.half = int(round(width_ms / 1000 * SAMPLE_RATE / 2 / HOP))  # mel frames either side

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:  # [N] -> [T, n_mels]
        mel = log_mel(audio, self.n_mels)
        T = audio.shape[-1] // FRAME
        centres = (torch.arange(T) * FRAME + FRAME // 2) // HOP  # the mel frame centred on each frame's centre
        idx = centres[:, None] + torch.arange(-self.half, self.half + 1)[None]  # 2 * half + 1 mel frames
        feats = mel[:, idx.clamp(0, mel.shape[-1] - 1)].mean(-1).T  # [T, n_mels]
        if self.normalise:
            feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-3)
        return feats


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns [k, D] centroids (empty clusters re-seeded at random)."""
    cents = x[torch.randint(len(x), (1,), generator=gen)]
    d2 = ((x - cents[0]) ** 2).sum(-1)
    for _ in range(k - 1):
        pick = torch.multinomial(d2.clamp(min=0) + 1e-12, 1, generator=gen)
        cents = torch.cat([cents, x[pick]])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(-1))
    for _ in range(iters):
        assign = torch.cdist(x, cents).argmin(-1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(cents).index_add_(0, assign, x)
        empty = counts == 0
        cents = torch.where(
            empty[:, None], x[torch.randint(len(x), (k,), generator=gen)], sums / counts.clamp(min=1)[:, None]
        )
    return cents


class Quantizer:
    """Residual k-means: stage j quantises what stages < j left; `split`: stage 1 alone on the features, stages
    2..8 a residual quantizer of the features themselves (Mimi's 1 + 7)."""

    def __init__(self, stages: int, size: int, split: bool):
        self.stages, self.size, self.split, self.books = stages, size, split, []

    def fit(self, x: torch.Tensor, iters: int, seed: int) -> Quantizer:
        gen = torch.Generator().manual_seed(seed)
        residual = x
        for j in range(self.stages):
            if self.split and j == 1:
                residual = x
            book = kmeans(residual, self.size, iters, gen)
            self.books.append(book)
            residual = residual - book[torch.cdist(residual, book).argmin(-1)]
        return self

    def codes(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [stages, T]
        out, residual = [], x
        for j, book in enumerate(self.books):
            if self.split and j == 1:
                residual = x
            c = torch.cdist(residual, book).argmin(-1)
            out.append(c)
            residual = residual - book[c]
        return torch.stack(out)


class ProbeCodec:
    """Duck-typed MimiModel for codec_training's measures: encode [1, 1, N] -> codes [1, K, N // 1920]."""

    def __init__(self, front: FrontEnd, quantizer: Quantizer):
        self.front, self.quantizer = front, quantizer
        self.num_codebooks, self.cardinality = quantizer.stages, quantizer.size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.codes(self.front(x[0, 0]))[None]


@torch.no_grad()
def speech_aligned_agreement(codec, clips: list[np.ndarray], seed: int = 0, shifts: int = 3) -> list[float]:
    """`aligned_agreement` (the same delays) over speech frames only: frames t whose 1920 samples in the original
    clip, and in the frame next to it holding the rest of the compared audio, are not all zero. The corpus's pauses
    are digital silence (~11% of the held-out frames), on which any deterministic encoder agrees with itself."""
    rng = random.Random(seed)
    same, total = torch.zeros(codec.num_codebooks), 0
    for audio in clips:
        x = torch.from_numpy(audio)[None, None]
        codes = codec.encode(x)
        loud = torch.from_numpy(np.abs(audio.reshape(-1, FRAME)).max(1) > 0)  # [T]
        for _ in range(shifts):
            delta = rng.randrange(1, FRAME)
            shifted = codec.encode(torch.nn.functional.pad(x, (delta, 0))[..., : x.shape[-1]])
            T, k = codes.shape[-1], int(delta > FRAME // 2)
            keep = loud[1 : T - 1 - k] & (loud[: T - 2 - k] if k else loud[2:T])  # the frame and its neighbour
            same += (codes[0, :, 1 : T - 1 - k] == shifted[0, :, 1 + k : T - 1])[:, keep].float().sum(-1)
            total += int(keep.sum())
    return (same / total).tolist()


@torch.no_grad()
def persistence(codec, clips: list[np.ndarray]) -> list[float]:
    """Per codebook, the share of frames whose code equals the previous frame's (no shift): what a model gets by
    repeating the last code, without any memory of an earlier reading."""
    same, total = torch.zeros(codec.num_codebooks), 0
    for audio in clips:
        codes = codec.encode(torch.from_numpy(audio)[None, None])[0]
        same += (codes[:, 1:] == codes[:, :-1]).float().sum(-1)
        total += codes.shape[-1] - 1
    return (same / total).tolist()


def measure(codec, clips: list[np.ndarray]) -> dict:
    return {
        "agreement": agreement(codec, clips),
        "cross_agreement": cross_agreement(codec, clips),
        "aligned_agreement": aligned_agreement(codec, clips),
        "speech_aligned_agreement": speech_aligned_agreement(codec, clips),
        "persistence": persistence(codec, clips),
        "usage_bits": usage_bits(codec, clips),
    }


def fmt(values: list[float], digits: int = 2) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/i21c"))
    parser.add_argument("--train-clips", type=int, default=30, help="training-split clips of ~8-13 s")
    parser.add_argument("--widths", type=float, nargs="+", default=[80.0, 160.0, 240.0], help="ms")
    parser.add_argument("--mels", type=int, default=80)
    parser.add_argument("--iters", type=int, default=25, help="Lloyd iterations per stage")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    train = [torch.from_numpy(a) for a in make_audio(31, "train", args.train_clips, 8.0)]
    heldout = make_audio(32, "heldout", 6, 8.0)
    print(f"train {sum(len(a) for a in train) / SAMPLE_RATE / 60:.1f} min, held-out {len(heldout)} clips", flush=True)
    results = {"shipped codec": measure(load_codec(REPO / "demo_assets" / "codec"), heldout)}
    variants = [(w, norm, False) for w in args.widths for norm in (False, True)]
    variants += [(w, True, True) for w in args.widths]
    for width, norm, split in variants:
        name = (
            f"log-mel {args.mels}, {width:.0f} ms{', clip-normalised' if norm else ''}{', split 1+7' if split else ''}"
        )
        front = FrontEnd(args.mels, width, norm)
        feats = torch.cat([front(a) for a in train])
        quantizer = Quantizer(8, 256, split).fit(feats, args.iters, seed=0)
        results[name] = measure(ProbeCodec(front, quantizer), heldout) | {"train_frames": len(feats)}
        r = results[name]
        print(f"{name} ({len(feats)} frames, {time.time() - start:.0f} s): agreement {fmt(r['agreement'])} | "
              f"cross {fmt(r['cross_agreement'])} | aligned {fmt(r['aligned_agreement'])} | "
              f"speech aligned {fmt(r['speech_aligned_agreement'])} | persistence {fmt(r['persistence'])} | "
              f"bits {fmt(r['usage_bits'])}", flush=True)  # fmt: skip
    results["seconds"] = time.time() - start
    (args.out / "figures.json").write_text(json.dumps(results, indent=1))
    keys = ("agreement", "cross_agreement", "aligned_agreement", "speech_aligned_agreement", "persistence",
            "usage_bits")  # fmt: skip
    lines = ["| variant | " + " | ".join(f"{k.replace('_', ' ')} cb1..8" for k in keys) + " |",
             "|---|" + "---|" * len(keys)]  # fmt: skip
    for name, r in results.items():
        if isinstance(r, dict):
            cells = [fmt(r[k]) for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n{results['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
