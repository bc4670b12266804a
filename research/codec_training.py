"""A trained demo codec, first steps (issue 21): shift agreement and reconstruction of the demo codec, and a short
training of its encoder and decoder for both.

The shipped codec (demo_assets/codec) has a random encoder and decoder (only its codebooks are fit), so a sub-frame
shift of the audio changes its codes and its decoded audio is noise. Measured here, old codec vs trained:
- agreement: per codebook, the share of frames whose code is the same when the audio starts delta samples later
  (delta uniform in 1..1919, a fraction of the 1920-sample frame), on held-out clips in held-out voices;
- reconstruction: multi-scale log-mel L1 distance between the audio and decode(encode(audio)).

Training (from the shipped codec's weights; `train` says why in phases): the encoder side for shift invariance
(InfoNCE between the unquantised latents of two crops of the same audio delta samples apart), the codebooks refit
(moshi's k-means init and EMA), the decoder side for reconstruction (multi-scale log-mel L1) with the codes fixed.

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.codec_training --work W --minutes 12      # data, baseline figures, training, new figures
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from moshi.models.compression import MimiModel  # noqa: E402

from moshi_ttt.data.codec import load_codec, save_codec  # noqa: E402
from research.natural_corpus import Grammar, random_voice, speak  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FRAME = 1920
SAMPLE_RATE = 24000
MEL_SCALES = (512, 1024, 2048)  # n_fft of the multi-scale mel distance (hop n_fft / 4, 64 mel bands)


def mel_filters(n_fft: int, n_mels: int = 64, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular mel filterbank [n_mels, n_fft // 2 + 1] (HTK mel scale)."""

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, len(bins)), dtype=np.float32)
    for m in range(n_mels):
        lo, mid, hi = hz[m], hz[m + 1], hz[m + 2]
        fb[m] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0, None)
    return torch.from_numpy(fb)


_FILTERS = {n: mel_filters(n) for n in MEL_SCALES}


def mel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over scales of the L1 distance of log-mel spectrograms (natural log, floor 1e-5). a, b: [B, 1, N]."""
    total = a.new_zeros(())
    for n_fft, fb in _FILTERS.items():
        window = torch.hann_window(n_fft)
        specs = [
            torch.stft(x[:, 0], n_fft, n_fft // 4, window=window, return_complex=True).abs() ** 2 for x in (a, b)
        ]  # [B, n_fft / 2 + 1, frames]
        mels = [torch.log(torch.einsum("mf,bft->bmt", fb, s) + 1e-5) for s in specs]  # [B, n_mels, frames]
        total = total + (mels[0] - mels[1]).abs().mean()
    return total / len(_FILTERS)


def make_audio(seed: int, split: str, count: int, seconds: float) -> list[np.ndarray]:
    """`count` clips of ordinary sentences (natural_corpus: random voice of `split`, pauses), whole frames."""
    rng = random.Random(seed)
    clips = []
    for _ in range(count):
        audio, _ = speak(Grammar(rng), random_voice(rng, split), rng, seconds)
        audio = audio * (10 ** (rng.uniform(-30, -18) / 20) / max(float(np.sqrt(np.mean(audio**2))), 1e-6))
        clips.append(audio[: len(audio) // FRAME * FRAME].astype(np.float32))
    return clips


@torch.no_grad()
def agreement(mimi: MimiModel, clips: list[np.ndarray], seed: int = 0, shifts: int = 3) -> list[float]:
    """Per codebook, the share of frames with the same code when the audio is delayed by delta in 1..1919 samples
    (frames 1 .. T-2 compared, frame t with frame t: the same audio to within delta)."""
    rng = random.Random(seed)
    same, total = torch.zeros(mimi.num_codebooks), 0
    for audio in clips:
        x = torch.from_numpy(audio)[None, None]
        codes = mimi.encode(x)  # [1, K, T]
        for _ in range(shifts):
            delta = rng.randrange(1, FRAME)
            shifted = mimi.encode(torch.nn.functional.pad(x, (delta, 0))[..., : x.shape[-1]])
            T = codes.shape[-1]
            same += (codes[0, :, 1 : T - 1] == shifted[0, :, 1 : T - 1]).float().sum(-1)
            total += T - 2
    return (same / total).tolist()


@torch.no_grad()
def usage_bits(mimi: MimiModel, clips: list[np.ndarray]) -> list[float]:
    """Per codebook, the entropy (bits) of the codes over the clips' frames: agreement means something only with
    codes that carry information (a collapsed codebook agrees with itself everywhere at 0 bits; 8 bits at most)."""
    codes = torch.cat([mimi.encode(torch.from_numpy(a)[None, None])[0] for a in clips], dim=-1)  # [K, frames]
    bits = []
    for row in codes:
        p = torch.bincount(row, minlength=mimi.cardinality).float() / row.numel()
        bits.append(float(-(p[p > 0] * p[p > 0].log2()).sum()))
    return bits


@torch.no_grad()
def reconstruction(mimi: MimiModel, clips: list[np.ndarray]) -> float:
    """Mean multi-scale log-mel distance between each clip and decode(encode(clip))."""
    dists = []
    for audio in clips:
        x = torch.from_numpy(audio)[None, None]
        y = mimi.decode(mimi.encode(x))[..., : x.shape[-1]]
        dists.append(float(mel_distance(x, y)))
    return sum(dists) / len(dists)


def _crops(clips: list[np.ndarray], rng: random.Random, batch: int, frames: int) -> tuple[torch.Tensor, ...]:
    """Two views [B, 1, frames * 1920] of the same audio, the second starting delta in 1..1919 samples later."""
    seg, xa, xb = frames * FRAME, [], []
    for _ in range(batch):
        audio = rng.choice(clips)
        delta, o = rng.randrange(1, FRAME), rng.randrange(0, len(audio) - frames * FRAME - FRAME)
        xa.append(audio[o : o + seg])
        xb.append(audio[o + delta : o + delta + seg])
    return torch.from_numpy(np.stack(xa))[:, None], torch.from_numpy(np.stack(xb))[:, None]


def _encoding_params(model: MimiModel) -> tuple[list[str], list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Names of the parameters before the codes, those parameters, and the others (decoder side)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    encoding = [n for n, _ in named if n.startswith(("encoder", "downsample")) or "input_proj" in n]
    return encoding, [p for n, p in named if n in encoding], [p for n, p in named if n not in encoding]


def shift_contrast(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over all frames of a batch: frame t of view a must be nearer (cosine) to frame t of view b (the same
    audio delta samples later) than to any other frame of view b. Shift invariance without collapse: a constant
    latent cannot tell the frames apart. za, zb: [B, C, frames]."""
    a = torch.nn.functional.normalize(za.transpose(1, 2).flatten(0, 1), dim=-1)  # [B * frames, C]
    b = torch.nn.functional.normalize(zb.transpose(1, 2).flatten(0, 1), dim=-1)
    logits = a @ b.T / temperature  # [N, C] @ [C, N] -> [N, N]
    target = torch.arange(len(a))
    return 0.5 * (
        torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    )


def train(mimi: MimiModel, clips: list[np.ndarray], minutes: float, args, log, measure) -> MimiModel:
    """Trains a copy of `mimi` in three phases within `minutes` of wall time: 40% the encoder side for shift
    invariance (`shift_contrast`), then the codebooks refit on the new latents (moshi's k-means init and EMA), then
    60% the decoder side for reconstruction (multi-scale log-mel L1) with the codes fixed.

    Why not one joint loss (measured, `--minutes 0.5`): training the encoder through the straight-through RVQ with
    the mel loss, with or without a latent-distance consistency term, at lr 1e-3 or 1e-4, collapsed every codebook
    to 0-0.5 bits (every frame one code) within 15-40 steps; the decoder alone lowered the mel distance 5.93 -> 4.04
    in 0.4 min without touching the codes."""
    model = copy.deepcopy(mimi)
    rng = random.Random(args.seed)
    _, encoder, decoder = _encoding_params(model)
    start = time.perf_counter()

    # Phase 1: the encoder side, shift-invariant and discriminative frames.
    model.train()
    opt = torch.optim.AdamW(encoder, lr=args.encoder_lr, weight_decay=0.0)
    step = 0
    while time.perf_counter() - start < 0.4 * minutes * 60:
        xa, xb = _crops(clips, rng, args.batch, args.seg_frames)
        loss = shift_contrast(
            model._encode_to_unquantized_latent(xa), model._encode_to_unquantized_latent(xb), args.temperature
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log(f"encoder step {step} ({time.perf_counter() - start:.0f} s): contrast {loss.item():.3f}")
    log(f"encoder: {step} steps")

    # Phase 2: codebooks refit on the new latents (k-means at the first training-mode pass, then EMA passes).
    for buffer_name, buffer in model.quantizer.named_buffers():
        if buffer_name.endswith("_initialized"):
            buffer.zero_()
    with torch.no_grad():
        for _ in range(args.codebook_passes):
            xa, _ = _crops(clips, rng, 64, args.seg_frames)  # 64 x 12 frames: 3 per code for the k-means
            model(xa)
    log(f"codebooks refit: held-out {json.dumps(measure(model.eval()))}")

    # Phase 3: the decoder side with fixed codes (quantizer in eval mode: no EMA).
    model.eval()
    for p in encoder:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(decoder, lr=args.lr, weight_decay=0.0)
    step = 0
    while time.perf_counter() - start < minutes * 60:
        xa, _ = _crops(clips, rng, args.batch, args.seg_frames)
        with torch.no_grad():
            codes = model.encode(xa)
        loss = mel_distance(xa, model.decode(codes)[..., : xa.shape[-1]])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log(f"decoder step {step} ({time.perf_counter() - start:.0f} s): mel {loss.item():.3f}")
    log(f"decoder: {step} steps; total {time.perf_counter() - start:.0f} s")
    for p in encoder:
        p.requires_grad_(True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time of the training")
    parser.add_argument("--temperature", type=float, default=0.1, help="of the shift contrast (phase 1)")
    parser.add_argument("--codebook-passes", type=int, default=20, help="training-mode passes of phase 2")
    parser.add_argument("--lr", type=float, default=1e-3, help="decoder side and quantizer projections")
    parser.add_argument("--encoder-lr", type=float, default=1e-3, help="everything before the codes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seg-frames", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-clips", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = (args.work / "log.txt").open("a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    train_clips = make_audio(31, "train", args.train_clips, 8.0)
    heldout = make_audio(32, "heldout", 6, 8.0)
    old = load_codec(REPO / "demo_assets" / "codec")
    config = json.loads((REPO / "demo_assets" / "codec" / "config.json").read_text())

    def measure(mimi: MimiModel) -> dict:
        return {"agreement": agreement(mimi, heldout), "usage_bits": usage_bits(mimi, heldout),
                "mel_distance": reconstruction(mimi, heldout)}  # fmt: skip

    figures = {"old": measure(old)}
    silence = [float(mel_distance(torch.from_numpy(a)[None, None], torch.zeros(1, 1, len(a)))) for a in heldout]
    figures["zeros_mel_distance"] = sum(silence) / len(silence)
    log(f"old codec: {json.dumps(figures['old'])}; silence as output: {figures['zeros_mel_distance']:.3f}")
    new = train(old, train_clips, args.minutes, args, log, measure)
    figures["new"] = measure(new)
    figures["args"] = {k: str(v) for k, v in vars(args).items()}
    log(f"new codec: {json.dumps(figures['new'])}")
    save_codec(args.work / "codec", new, {k: v for k, v in config.items() if k not in ("format", "version")})
    (args.work / "figures.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
