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
import itertools
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from moshi.models.compression import MimiModel  # noqa: E402

from moshi_ttt.data.codec import build_codec, load_codec, save_codec  # noqa: E402
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
def aligned_agreement(mimi: MimiModel, clips: list[np.ndarray], seed: int = 0, shifts: int = 3) -> list[float]:
    """`agreement` at the nearest frame alignment: for a delay delta > 960 samples the delayed audio's frame t holds
    mostly the original frame t - 1, so it is compared with that one (what a memory copying a reading at another
    offset meets: the same codes, the index moved by at most one); the same delays as `agreement`."""
    rng = random.Random(seed)
    same, total = torch.zeros(mimi.num_codebooks), 0
    for audio in clips:
        x = torch.from_numpy(audio)[None, None]
        codes = mimi.encode(x)  # [1, K, T]
        for _ in range(shifts):
            delta = rng.randrange(1, FRAME)
            shifted = mimi.encode(torch.nn.functional.pad(x, (delta, 0))[..., : x.shape[-1]])
            T, k = codes.shape[-1], int(delta > FRAME // 2)
            same += (codes[0, :, 1 : T - 1 - k] == shifted[0, :, 1 + k : T - 1]).float().sum(-1)
            total += T - 2 - k
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
def cross_agreement(mimi: MimiModel, clips: list[np.ndarray]) -> list[float]:
    """Per codebook, the share of frames t where two *different* clips have the same code (clip i against clip
    i + 1, frames 1 .. T-2): near chance (the sum of squared code frequencies) for codes of the content, high for
    codes of the frame's position (a codec that learnt where a frame sits agrees with itself under shifts too)."""
    codes = [mimi.encode(torch.from_numpy(a)[None, None])[0] for a in clips]  # [K, T_i] each
    same, total = torch.zeros(mimi.num_codebooks), 0
    for a, b in itertools.pairwise(codes):
        T = min(a.shape[-1], b.shape[-1])
        same += (a[:, 1 : T - 1] == b[:, 1 : T - 1]).float().sum(-1)
        total += T - 2
    return (same / total).tolist()


@torch.no_grad()
def reconstruction(mimi: MimiModel, clips: list[np.ndarray]) -> float:
    """Mean multi-scale log-mel distance between each clip and decode(encode(clip))."""
    dists = []
    for audio in clips:
        x = torch.from_numpy(audio)[None, None]
        y = mimi.decode(mimi.encode(x))[..., : x.shape[-1]]
        dists.append(float(mel_distance(x, y)))
    return sum(dists) / len(dists)


def _crops(
    clips: list[np.ndarray],
    rng: random.Random,
    batch: int,
    frames: int,
    max_lag: int = 0,
    noise: bool = False,
    centred: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two views [B, 1, frames * 1920] of the same audio, the second starting lag * 1920 + delta samples later
    (delta in 1..1919, lag in 0..max_lag drawn once per batch): frame t + lag of view a holds the audio of frame t of
    view b. With lag > 0 a frame's position in its crop does not identify it (see `train`). With `noise`, each view
    gets its own white noise (25-45 dB below the crop's RMS) and gain (+-6 dB), as readings of a user's clip do."""
    lag = rng.randrange(0, max_lag + 1)
    seg, xa, xb = frames * FRAME, [], []
    for _ in range(batch):
        audio = rng.choice(clips)
        # centred: delta in -959..960 (view b's frame t holds mostly frame t's audio, never mostly t - 1's)
        delta = rng.randrange(1, FRAME) - (FRAME // 2 - 1 if centred else 0)
        o = rng.randrange(FRAME, len(audio) - (frames + lag + 2) * FRAME)
        views = [audio[o : o + seg], audio[o + lag * FRAME + delta : o + lag * FRAME + delta + seg]]
        if noise:
            gen = np.random.default_rng(rng.randrange(2**31))
            for i, v in enumerate(views):
                rms = max(float(np.sqrt(np.mean(v**2))), 1e-5)
                v = v * 10 ** (rng.uniform(-6, 6) / 20)
                views[i] = (v + gen.standard_normal(len(v)) * rms * 10 ** (-rng.uniform(25, 45) / 20)).astype(
                    np.float32
                )
        xa.append(views[0])
        xb.append(views[1])
    return torch.from_numpy(np.stack(xa))[:, None], torch.from_numpy(np.stack(xb))[:, None], lag


def _encoding_params(model: MimiModel) -> tuple[list[str], list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Names of the parameters before the codes, those parameters, and the others (decoder side)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    encoding = [n for n, _ in named if n.startswith(("encoder", "downsample")) or "input_proj" in n]
    return encoding, [p for n, p in named if n in encoding], [p for n, p in named if n not in encoding]


def shift_contrast(za: torch.Tensor, zb: torch.Tensor, temperature: float, neighbours: int = 0) -> torch.Tensor:
    """InfoNCE over all frames of a batch: frame t of view a must be nearer (cosine) to frame t of view b (the same
    audio delta samples later) than to any other frame of view b. Shift invariance without collapse: a constant
    latent cannot tell the frames apart. With `neighbours` = n, frames t +- 1..n of the same crop are left out of the
    negatives: at a shift of half a frame, the neighbour holds as much of frame t's audio as the positive does, and
    asking to tell them apart asks for latents that change from frame to frame (codes that do not survive a shift).
    za, zb: [B, C, frames]."""
    a = torch.nn.functional.normalize(za.transpose(1, 2).flatten(0, 1), dim=-1)  # [B * frames, C]
    b = torch.nn.functional.normalize(zb.transpose(1, 2).flatten(0, 1), dim=-1)
    logits = a @ b.T / temperature  # [N, C] @ [C, N] -> [N, N]
    if neighbours:
        frames = za.shape[-1]
        item, t = torch.arange(len(a)) // frames, torch.arange(len(a)) % frames
        gap = (t[:, None] - t[None, :]).abs()
        logits = logits.masked_fill((item[:, None] == item[None, :]) & (gap > 0) & (gap <= neighbours), -1e4)
    target = torch.arange(len(a))
    return 0.5 * (
        torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    )


def uniformity(z: torch.Tensor) -> torch.Tensor:
    """Wang & Isola's uniformity loss, log E exp(-2 |u - v|^2) over pairs of normalised frames of the batch: low when
    the frames spread over the sphere (so k-means finds many distinct clusters). z: [B, C, frames]."""
    u = torch.nn.functional.normalize(z.transpose(1, 2).flatten(0, 1), dim=-1)  # [N, C]
    return torch.pdist(u).pow(2).mul(-2).exp().mean().log()


def invariance_variance(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """VICReg's invariance and variance terms on the raw latents, the space the codebooks cut (k-means, Euclidean):
    the mean squared distance between the two views' frames (what decides whether a shifted frame keeps its code)
    plus a hinge on each channel's standard deviation over the batch's frames (>= 1: the frames stay spread).
    za, zb: [B, C, frames]."""
    a, b = za.transpose(1, 2).flatten(0, 1), zb.transpose(1, 2).flatten(0, 1)  # [N, C]
    spread = sum(torch.relu(1 - torch.sqrt(x.var(dim=0) + 1e-4)).mean() for x in (a, b))
    return (a - b).pow(2).sum(-1).mean() / a.shape[-1] + spread


def train(mimi: MimiModel, clips: list[np.ndarray], minutes: float, args, log, measure) -> MimiModel:
    """Trains a copy of `mimi` in three phases within `minutes` of wall time: `args.encoder_share` of it the encoder
    side for shift invariance (`shift_contrast`), then the codebooks refit on the new latents (moshi's k-means init
    and EMA), then the rest the decoder side for reconstruction (multi-scale log-mel L1) with the codes fixed.

    Why not one joint loss (measured, `--minutes 0.5`): training the encoder through the straight-through RVQ with
    the mel loss, with or without a latent-distance consistency term, at lr 1e-3 or 1e-4, collapsed every codebook
    to 0-0.5 bits (every frame one code) within 15-40 steps; the decoder alone lowered the mel distance 5.93 -> 4.04
    in 0.4 min without touching the codes.

    Why views with a lag (`--max-lag`, measured): with both views cut at the same frame grid (lag 0, the first run)
    the contrast loss stopped at ln 4 = 1.386 with a batch of 4 and the codebooks carried ~log2(12) bits for crops of
    12 frames: the encoder had learnt each frame's position in its crop (causal padding, the transformer's start),
    which is the same in both views, and not its content; `cross_agreement` shows it."""
    model = copy.deepcopy(mimi)
    rng = random.Random(args.seed)
    _, encoder, decoder = _encoding_params(model)
    start = time.perf_counter()

    # Phase 1: the encoder side, shift-invariant and discriminative frames.
    model.train()
    opt = torch.optim.AdamW(encoder, lr=args.encoder_lr, weight_decay=0.0)
    step = 0
    while time.perf_counter() - start < args.encoder_share * minutes * 60:
        xa, xb, lag = _crops(clips, rng, args.batch, args.seg_frames, args.max_lag, args.noise, args.centred)
        za, zb = model._encode_to_unquantized_latent(xa), model._encode_to_unquantized_latent(xb)
        za, zb = za[..., lag:], zb[..., : zb.shape[-1] - lag]  # frame t + lag of a <-> frame t of b
        loss = shift_contrast(za, zb, args.temperature, args.neighbours)
        if args.uniformity:
            loss = loss + args.uniformity * 0.5 * (uniformity(za) + uniformity(zb))
        if args.vicreg:
            loss = loss + args.vicreg * invariance_variance(za, zb)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log(f"encoder step {step} ({time.perf_counter() - start:.0f} s): loss {loss.item():.3f}")
    log(f"encoder: {step} steps")

    # Phase 2: codebooks refit on the new latents: the latents of `kmeans_crops` crops computed once, then
    # training-mode passes of the quantizer alone over batches of them (k-means init of level i at pass i, as moshi
    # allows one level per pass, then EMA).
    for buffer_name, buffer in model.quantizer.named_buffers():
        if buffer_name.endswith("_initialized"):
            buffer.zero_()
    for module in model.quantizer.modules():
        if hasattr(module, "_cached_initialized"):
            module._cached_initialized = False
        if hasattr(module, "_embedding"):
            module._embedding = None
    model.eval()
    with torch.no_grad():
        latents = []
        for _ in range(0, args.kmeans_crops, 16):
            xa, _, _ = _crops(clips, rng, 16, args.kmeans_frames)
            latents.append(model._encode_to_unquantized_latent(xa))  # [16, C, frames]
        latents = torch.cat(latents)  # [crops, C, frames]
        model.quantizer.train()
        for i in range(args.codebook_passes):
            idx = torch.randperm(len(latents), generator=torch.Generator().manual_seed(args.seed + i))
            model.quantizer(latents[idx[: args.kmeans_batch]], model.frame_rate)
        model.quantizer.eval()
    save_codec(args.work / "codec_refit", model, args.codec_config)  # the codes are final from here on
    log(f"codebooks refit on {latents.shape[0] * latents.shape[-1]} frames ({time.perf_counter() - start:.0f} s): "
        f"held-out {json.dumps(measure(model.eval()))}")  # fmt: skip

    # Phase 3: the decoder side with fixed codes (quantizer in eval mode: no EMA).
    model.eval()
    for p in encoder:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(decoder, lr=args.lr, weight_decay=0.0)
    step = 0
    while time.perf_counter() - start < minutes * 60:
        xa, _, _ = _crops(clips, rng, args.batch, args.seg_frames)
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
    parser.add_argument("--max-lag", type=int, default=0, help="phase 1: view b up to this many frames later")
    parser.add_argument("--noise", action="store_true", help="phase 1: own noise and gain per view")
    parser.add_argument("--uniformity", type=float, default=0.0, help="phase 1: weight of the uniformity term")
    parser.add_argument("--neighbours", type=int, default=0, help="phase 1: same-crop frames +-n not negatives")
    parser.add_argument("--centred", action="store_true", help="phase 1: shifts of -959..960, not 1..1919")
    parser.add_argument("--vicreg", type=float, default=0.0, help="phase 1: weight of `invariance_variance`")
    parser.add_argument("--context", type=int, default=0, help="the transformers' attention context (0: keep)")
    parser.add_argument("--encoder-share", type=float, default=0.4, help="share of the minutes for phase 1")
    parser.add_argument("--kmeans-crops", type=int, default=256, help="phase 2: crops whose latents are fit")
    parser.add_argument("--kmeans-frames", type=int, default=24, help="phase 2: frames per crop")
    parser.add_argument("--kmeans-batch", type=int, default=128, help="phase 2: crops per quantizer pass")
    parser.add_argument("--from-codec", type=Path, help="start from this codec (default: demo_assets/codec)")
    parser.add_argument("--measure-only", action="store_true", help="figures of --from-codec, no training")
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
    start_codec = load_codec(args.from_codec) if args.from_codec else old
    config = json.loads(((args.from_codec or REPO / "demo_assets" / "codec") / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("format", "version")}
    if args.context:  # a short context: the causal transformer cannot count frames from the start of the audio
        config["transformer"]["context"] = args.context
        start_codec, weights = build_codec(config), start_codec.state_dict()
        start_codec.load_state_dict(weights)

    def measure(mimi: MimiModel) -> dict:
        return {"agreement": agreement(mimi, heldout), "aligned_agreement": aligned_agreement(mimi, heldout),
                "usage_bits": usage_bits(mimi, heldout),
                "cross_agreement": cross_agreement(mimi, heldout),
                "mel_distance": reconstruction(mimi, heldout)}  # fmt: skip

    figures = {"old": measure(old)}
    silence = [float(mel_distance(torch.from_numpy(a)[None, None], torch.zeros(1, 1, len(a)))) for a in heldout]
    figures["zeros_mel_distance"] = sum(silence) / len(silence)
    log(f"old codec: {json.dumps(figures['old'])}; silence as output: {figures['zeros_mel_distance']:.3f}")
    if args.measure_only:
        figures["start"] = measure(start_codec)
        log(f"{args.from_codec}: {json.dumps(figures['start'])}")
        (args.work / "figures.json").write_text(json.dumps(figures, indent=1))
        return 0
    args.codec_config = config
    new = train(start_codec, train_clips, args.minutes, args, log, measure)
    figures["new"] = measure(new)
    figures["args"] = {k: str(v) for k, v in vars(args).items()}
    log(f"new codec: {json.dumps(figures['new'])}")
    save_codec(args.work / "codec", new, config)
    (args.work / "figures.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
